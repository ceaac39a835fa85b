"""One rank of the reference model, built from the reference's own blocks on sliced weights.

``RankModel`` subclasses :class:`m3_trt.model.modeling.M3ForConditionalGeneration` and keeps its parameter
names (sliced per :mod:`.shard`), its ``forward`` (embedding, RoPE, the layer loop, final norm, LM
head), ``embed`` / vision path and ``generate`` compatibility; only the decoder layers differ:

* attention: the reference ``Attention`` built for the rank's heads (a config with ``Hq/tp`` query
  heads, the rank's KV heads and as many indexer heads); ``o_proj`` holds the rank's columns, so
  its output is a partial sum → **all-reduce** (when ``tp > 1``);
* dense MLP / shared expert: ``DenseMLP`` with the rank's slice of the gate‖up rows and the
  matching ``down_proj`` columns → partial sum → all-reduce;
* routed experts (``RankMoE``): the router is replicated, so every rank computes the same top-k
  choice for every token; each rank applies only its contiguous expert range (and its slice of
  each expert's intermediate dimension) and the partial outputs are combined by one
  **all-reduce**. This is the documented first version of dispatch/combine: every rank already
  holds every token after the attention all-reduce, so no token moves before the experts; an
  all-to-all dispatch (tokens sent to the ranks owning their experts) is the bandwidth-saving
  replacement for large batches;
* embedding, vision tower, projector, final norm and LM head are replicated.

All ranks produce identical logits, so greedy decoding stays in lock-step without a broadcast.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from m3_trt.model.cache import StaticCache
from m3_trt.model.config import M3Config, TextConfig
from m3_trt.model.modeling import Attention, DenseMLP, M3ForConditionalGeneration, RMSNorm, Router
from m3_trt.model.vision import Projector, VisionTower
from m3_trt.model.shard import Layout, check_divisible, local_experts, local_heads, shard_state


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def local_text_config(cfg: TextConfig, lay: Layout, r: int) -> TextConfig:
    """The attention shape of rank ``r`` (everything else unchanged)."""
    q, kv = local_heads(cfg, lay, r)
    return replace(cfg, num_attention_heads=len(q), num_key_value_heads=len(kv), index_n_heads=len(kv))


class RankExperts(nn.Module):
    def __init__(self, n_experts: int, inter: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter, hidden))  # w13_EFD, local experts
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))          # w2_EDF


class RankMoE(nn.Module):
    """Replicated router, the rank's expert range, partial outputs combined by all-reduce."""

    def __init__(self, cfg: TextConfig, lay: Layout, r: int):
        super().__init__()
        self.cfg, self.lay = cfg, lay
        self.experts_range = local_experts(cfg, lay, r)
        self.gate = Router(cfg)
        self.experts = RankExperts(len(self.experts_range), cfg.intermediate_size // lay.moe_tp, cfg.hidden_size)
        self.shared_experts = DenseMLP(cfg, cfg.shared_intermediate_size // lay.tp)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        from m3_trt.plugins.swiglu_moe.reference import route, swiglu_oai

        B, S, D = x_BSD.shape
        c = self.cfg
        x = x_BSD.reshape(-1, D)
        weights_TK, experts_TK = route(x, self.gate.weight, self.gate.e_score_correction_bias, c.num_experts_per_tok)
        out = torch.zeros_like(x)
        for j, e in enumerate(self.experts_range):
            tok, slot = torch.where(experts_TK == e)
            if tok.numel() == 0:
                continue
            h = swiglu_oai(F.linear(x[tok], self.experts.gate_up_proj[j]), alpha=c.swiglu_alpha, limit=c.swiglu_limit)
            out.index_add_(0, tok, (F.linear(h, self.experts.down_proj[j]) * weights_TK[tok, slot, None]).to(out.dtype))
        out = out * c.routed_scaling_factor
        if self.lay.tp > 1:  # sharded shared expert: its partial sum rides on the same all-reduce
            out = out + self.shared_experts(x)
        if self.lay.world > 1:
            out = _all_reduce(out)
        if self.lay.tp == 1:
            out = out + self.shared_experts(x)
        return out.reshape(B, S, D)


class RankDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, local: TextConfig, i: int, lay: Layout, r: int):
        super().__init__()
        self.tp = lay.tp
        self.self_attn = Attention(local, sparse=cfg.layer_types[i] == "minimax_m3_sparse")
        self.mlp = (RankMoE(cfg, lay, r) if cfg.mlp_layer_types[i] == "sparse"
                    else DenseMLP(cfg, cfg.dense_intermediate_size // lay.tp))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, pos_BS, cache=None):
        a = self.self_attn(self.input_layernorm(x), cos, sin, pos_BS, cache)
        if self.tp > 1:
            a = _all_reduce(a)
        x = x + a
        m = self.mlp(self.post_attention_layernorm(x))
        if self.tp > 1 and isinstance(self.mlp, DenseMLP):
            m = _all_reduce(m)
        return x + m


class RankModel(M3ForConditionalGeneration):
    """Rank ``rank`` of ``layout``; same names/forward as the reference, sliced weights."""

    def __init__(self, cfg: M3Config, layout: Layout, rank: int):
        nn.Module.__init__(self)
        check_divisible(cfg.text, layout)
        self.config, self.layout, self.rank = cfg, layout, rank
        self.local_text = local_text_config(cfg.text, layout, rank)
        t = cfg.text
        inner = nn.Module()
        inner.vision_tower = VisionTower(cfg.vision)
        inner.multi_modal_projector = Projector(cfg)
        lm = nn.Module()
        lm.cfg = t
        lm.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        lm.layers = nn.ModuleList(RankDecoderLayer(t, self.local_text, i, layout, rank)
                                  for i in range(t.num_hidden_layers))
        lm.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        inner.language_model = lm
        self.model = inner
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)

    @classmethod
    def from_state(cls, cfg: M3Config, layout: Layout, rank: int, state: dict[str, torch.Tensor],
                   dtype: torch.dtype = torch.float32, kernels: str = "reference") -> "RankModel":
        with torch.device("meta"):
            m = cls(cfg, layout, rank)
        m = m.to_empty(device="cpu")
        missing, unexpected = m.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"rank {rank} weights do not match {layout.name()}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return m.to(dtype).eval().set_kernels(kernels)

    @classmethod
    def on_meta(cls, cfg: M3Config, layout: Layout, rank: int, kernels: str = "reference") -> "RankModel":
        """Rank ``rank`` with every parameter on ``meta`` (shapes only, no memory); fill one decoder
        layer at a time with :meth:`loaded_layer` (the streaming per-rank export)."""
        with torch.device("meta"):
            m = cls(cfg, layout, rank)
        return m.eval().set_kernels(kernels)

    @contextmanager
    def loaded_layer(self, i: int, state: dict[str, torch.Tensor], dtype: torch.dtype) -> Iterator[RankDecoderLayer]:
        """Decoder layer ``i`` holding the tensors of ``state`` (this rank's tensors of the layer, by
        full name ``model.language_model.layers.<i>.…``), floating ones cast to ``dtype`` (no copy when
        already in it: the tensors are assigned, not copied into new storage); yields the layer.

        Every parameter and buffer of the layer must be given and nothing else (``ValueError``
        naming the keys). On exit the layer is replaced by a fresh one on ``meta``, so modules a
        caller swapped in (FP8 wrappers) go with it and memory stays at one layer.
        """
        lm = self.model.language_model
        prefix = f"model.language_model.layers.{i}."
        layer = lm.layers[i]
        kernels = layer.self_attn.kernels
        try:
            local = {k[len(prefix):]: v.to(dtype) if v.is_floating_point() else v
                     for k, v in state.items() if k.startswith(prefix)}
            stray = sorted(k for k in state if not k.startswith(prefix))
            want = set(layer.state_dict(keep_vars=True))
            missing, unexpected = sorted(want - set(local)), sorted(set(local) - want)
            if missing or unexpected or stray:
                raise ValueError(f"rank {self.rank} layer {i}: weights do not match {self.layout.name()}: missing "
                                 f"{[prefix + k for k in missing][:5]}, unexpected "
                                 f"{([prefix + k for k in unexpected] + stray)[:5]}")
            layer.load_state_dict(local, assign=True)  # shapes checked; meta tensors replaced
            yield layer
        finally:
            with torch.device("meta"):
                fresh = RankDecoderLayer(self.config.text, self.local_text, i, self.layout, self.rank)
            for m in fresh.modules():
                if isinstance(m, Attention):
                    m.kernels = kernels
            lm.layers[i] = fresh.eval()

    @classmethod
    def from_full(cls, model: M3ForConditionalGeneration, layout: Layout, rank: int, **kw) -> "RankModel":
        state = shard_state(model.state_dict(), model.config.text, layout, rank)
        return cls.from_state(model.config, layout, rank, {k: v.clone() for k, v in state.items()}, **kw)

    def new_cache(self, batch: int, max_len: int) -> StaticCache:
        return StaticCache.allocate(self.local_text, batch, max_len, dtype=self.lm_head.weight.dtype,
                                    device=self.lm_head.weight.device)
