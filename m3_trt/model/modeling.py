"""MiniMax-M3-VL torch reference, written to be exported.

Architecture. A decoder of ``num_hidden_layers`` pre-norm blocks over token embeddings into
which the vision tower's projected image/video tokens are spliced at placeholder ids. Each block:
Gemma RMSNorm (``x·(1+w)`` in fp32) → GQA attention with per-head QK RMSNorm and partial RoPE on
the first ``rotary_dim`` channels → residual → RMSNorm → MLP → residual. Attention is ``full``
(causal) or ``sparse``: a lightning indexer (``index_n_heads`` == KV heads, one shared key head)
scores every past key, max-pools the scores into blocks of ``index_block_size`` keys, forces the
local block(s) in with ``+inf`` and keeps the top ``index_topk_blocks`` blocks per (query, KV
group); attention then reads only those blocks (token-causal inside them). The MLP is ``dense``
(SwiGLU-OAI over fused gate‖up rows) or ``sparse``: an MoE with sigmoid routing, a correction
bias used only for choosing, renormalised weights times ``routed_scaling_factor``, SwiGLU-OAI
experts and one shared expert. A final RMSNorm and an untied LM head give the logits.

The two plugin-shaped pieces sit behind one function each (``m3_trt.plugins``): the indexer's
block selection + block-sparse attention, and the MoE. ``kernels`` picks their implementation
(``reference`` = the readable spec, ``torch`` = the linear-memory CPU path, ``triton``).

Legend: B batch, S new tokens, T cache slots (== positions), Hq/G query/KV heads, D head dim.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from m3_trt.model.cache import LayerCache, StaticCache, write_idx, write_kv
from m3_trt.model.config import M3Config, TextConfig
from m3_trt.plugins.swiglu_moe.reference import swiglu_oai  # the one SwiGLU-OAI (dense MLP, shared expert, experts)
from m3_trt.plugins.registry import OPERATORS
from m3_trt.model.vision import Projector, VisionTower, vision_position_ids, vision_segment_ids

# reference: the readable spec; torch: linear-memory CPU path; triton: GPU kernels (interpreter on CPU);
# portable: static shapes in standard ops (ONNX --plugins none); custom_op: one torch.library node
# per plugin (ONNX --plugins m3).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # working dtypes by name
KERNELS = ("reference", "torch", "triton", "portable", "custom_op")


# -- plugin dispatch ----------------------------------------------------------------------------

def _op(name: str, impl: str):
    """The public dispatcher of plugin ``name`` with ``impl`` bound (``plugins/registry.py``)."""
    op = OPERATORS[name]
    if impl == "portable":  # plain functions (no custom-op node), static shapes
        return op.portable
    if impl == "custom_op":  # the dispatchers run through torch.ops.m3.<name>: one node per plugin
        impl = "torch"
    return lambda *a, **k: op.fn(*a, impl=impl, **k)


# -- building blocks ----------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Gemma-style: normalise in fp32, scale by ``1 + weight``, cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


def rope_cos_sin(pos_BS: torch.Tensor, cfg: TextConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rot = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float, device=pos_BS.device) / rot))
    freqs = pos_BS[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x_BHSD: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``R = cos.shape[-1]`` channels (rotate-half convention), pass the rest."""
    rot = cos_BSR.shape[-1]
    c, s = cos_BSR[:, None], sin_BSR[:, None]
    xr, xp = x_BHSD[..., :rot], x_BHSD[..., rot:]
    x1, x2 = xr.chunk(2, dim=-1)
    return torch.cat([xr * c + torch.cat((-x2, x1), dim=-1) * s, xp], dim=-1)


class DenseMLP(nn.Module):
    def __init__(self, cfg: TextConfig, inter: int):
        super().__init__()
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu_oai(self.gate_up_proj(x), alpha=self.alpha, limit=self.limit))


class Router(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_local_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_local_experts))


class Experts(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        E, F_, D = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F_, D))  # w13_EFD: gate rows, then up rows
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))         # w2_EDF


class MoE(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.kernels = "reference"
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = DenseMLP(cfg, cfg.shared_intermediate_size)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        c = self.cfg
        y = _op("swiglu_moe", self.kernels)(
            x_BSD.reshape(-1, D), self.gate.weight, self.gate.e_score_correction_bias,
            self.experts.gate_up_proj, self.experts.down_proj,
            self.shared_experts.gate_up_proj.weight, self.shared_experts.down_proj.weight,
            top_k=c.num_experts_per_tok, routed_scaling=c.routed_scaling_factor,
            alpha=c.swiglu_alpha, limit=c.swiglu_limit)
        return y.reshape(B, S, D)


class Indexer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.index_head_dim, bias=False)
        self.q_norm = RMSNorm(cfg.index_head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.index_head_dim, cfg.rms_norm_eps)

    def project(self, x_BSD, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Indexer queries ``[B, Hi, S, Di]`` and keys ``[B, S, Di]`` after norm + RoPE."""
        B, S, _ = x_BSD.shape
        Di = self.cfg.index_head_dim
        q = self.q_norm(self.q_proj(x_BSD).view(B, S, -1, Di)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x_BSD).view(B, S, 1, Di)).transpose(1, 2)
        # transformers slices the text RoPE tables to the indexer head width
        q, k = apply_rope(q, cos[..., :Di], sin[..., :Di]), apply_rope(k, cos[..., :Di], sin[..., :Di])
        return q, k[:, 0]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, sparse: bool):
        super().__init__()
        self.cfg = cfg
        self.kernels = "reference"
        Hq, G, D, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(H, Hq * D, bias=False)
        self.k_proj = nn.Linear(H, G * D, bias=False)
        self.v_proj = nn.Linear(H, G * D, bias=False)
        self.o_proj = nn.Linear(Hq * D, H, bias=False)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.indexer = Indexer(cfg) if sparse else None

    def forward(self, x_BSD, cos, sin, pos_BS, cache: LayerCache | None, return_block_idx: bool = False):
        """Attention output; with ``return_block_idx`` also the indexer's ``block_idx_BGSK`` (None on full layers)."""
        B, S, _ = x_BSD.shape
        c = self.cfg
        block_idx = None
        D = c.head_dim
        q = apply_rope(self.q_norm(self.q_proj(x_BSD).view(B, S, -1, D)).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_norm(self.k_proj(x_BSD).view(B, S, -1, D)).transpose(1, 2), cos, sin)
        v = self.v_proj(x_BSD).view(B, S, -1, D).transpose(1, 2)
        if cache is not None:
            cache.k_BGTD = k = write_kv(cache.k_BGTD, k, pos_BS)
            cache.v_BGTD = v = write_kv(cache.v_BGTD, v, pos_BS)
        scale = D ** -0.5
        if self.indexer is None:
            T = k.shape[2]
            keep = torch.arange(T, device=q.device)[None, None, None, :] <= pos_BS[:, None, :, None]
            rep = c.num_kv_groups
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                 attn_mask=keep, scale=scale)
        else:
            iq, ik = self.indexer.project(x_BSD, cos, sin)
            if cache is not None:
                cache.idx_k_BTD = ik = write_idx(cache.idx_k_BTD, ik, pos_BS)
            block_idx = _op("indexer_topk", self.kernels)(
                iq, ik, pos_BS, block_size=c.index_block_size, topk=c.index_topk_blocks,
                local_blocks=c.index_local_blocks)
            out = _op("block_sparse_attention", self.kernels)(
                q, k, v, block_idx, pos_BS, block_size=c.index_block_size, scale=scale)
        out = self.o_proj(out.transpose(1, 2).reshape(B, S, -1))
        return (out, block_idx) if return_block_idx else out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, i: int):
        super().__init__()
        self.self_attn = Attention(cfg, sparse=cfg.layer_types[i] == "minimax_m3_sparse")
        self.mlp = MoE(cfg) if cfg.mlp_layer_types[i] == "sparse" else DenseMLP(cfg, cfg.dense_intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, pos_BS, cache: LayerCache | None = None, return_block_idx: bool = False):
        a, block_idx = self.self_attn(self.input_layernorm(x), cos, sin, pos_BS, cache, return_block_idx=True)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return (x, block_idx) if return_block_idx else x


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class M3Inner(nn.Module):
    def __init__(self, cfg: M3Config):
        super().__init__()
        self.vision_tower = VisionTower(cfg.vision)
        self.multi_modal_projector = Projector(cfg)
        self.language_model = TextModel(cfg.text)


class M3ForConditionalGeneration(nn.Module):
    """The whole model; parameter names equal transformers' in-memory names."""

    def __init__(self, cfg: M3Config):
        super().__init__()
        self.config = cfg
        self.model = M3Inner(cfg)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, kernels: str = "reference",
                        progress=None) -> "M3ForConditionalGeneration":
        from m3_trt.model.checkpoint import SafetensorsCheckpoint, load_into

        cfg = M3Config.from_pretrained(path)
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu").to(torch.float32)
        report = load_into(model, SafetensorsCheckpoint(path), progress=progress)
        if cfg.tie_word_embeddings and "lm_head.weight" in report.missing:
            model.lm_head.weight = model.model.language_model.embed_tokens.weight
            report.missing.remove("lm_head.weight")
        report.raise_for_problems()
        model.load_report = report
        return model.to(dtype).eval().set_kernels(kernels)

    def set_kernels(self, kernels: str) -> "M3ForConditionalGeneration":
        if kernels not in KERNELS:
            raise ValueError(f"kernels={kernels!r}: choose one of {', '.join(KERNELS)}")
        for m in self.modules():
            if isinstance(m, (Attention, MoE)):
                m.kernels = kernels
        return self

    def new_cache(self, batch: int, max_len: int) -> StaticCache:
        return StaticCache.allocate(self.config.text, batch, max_len, dtype=self.lm_head.weight.dtype,
                                    device=self.lm_head.weight.device)

    # -- vision -----------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Projected, merged tokens ``[sum(t·h·w)/merge², Dt]`` for all images, in order."""
        vc = self.config.vision
        if pixel_values.dim() != 2 or pixel_values.shape[1] != vc.patch_dim:
            raise ValueError(f"pixel_values must be [N, {vc.patch_dim}], got {tuple(pixel_values.shape)}")
        grid = torch.as_tensor(image_grid_thw).reshape(-1, 3)
        n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
        if n != pixel_values.shape[0]:
            raise ValueError(f"image_grid_thw {grid.tolist()} describes {n} patches, pixel_values has "
                             f"{pixel_values.shape[0]}")
        if bool(((grid[:, 1] % vc.spatial_merge_size) != 0).any() | ((grid[:, 2] % vc.spatial_merge_size) != 0).any()):
            raise ValueError(f"image_grid_thw {grid.tolist()}: h and w must be multiples of {vc.spatial_merge_size}")
        tower = self.model.vision_tower
        feats = tower(pixel_values, vision_position_ids(grid, vc.spatial_merge_size), vision_segment_ids(grid))
        return self.model.multi_modal_projector(feats)

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_grid_thw=None,
              pixel_values_videos=None, video_grid_thw=None) -> torch.Tensor:
        """Token embeddings with image/video tokens spliced in at their placeholder ids."""
        embeds = self.model.language_model.embed_tokens(input_ids)
        for pixels, grid, token, what in ((pixel_values, image_grid_thw, self.config.image_token_id, "image"),
                                          (pixel_values_videos, video_grid_thw, self.config.video_token_id, "video")):
            if pixels is None:
                continue
            embeds = self.splice(embeds, input_ids, self.get_image_features(pixels, grid), token, what)
        return embeds

    @staticmethod
    def splice(embeds: torch.Tensor, input_ids: torch.Tensor, feats: torch.Tensor, token: int,
               what: str = "image") -> torch.Tensor:
        """``embeds`` with ``feats`` (one row per placeholder, in order) at the ``token`` positions."""
        mask = input_ids == token
        if int(mask.sum()) != feats.shape[0]:
            raise ValueError(f"{what} placeholders in input_ids: {int(mask.sum())}, {what} tokens "
                             f"given: {feats.shape[0]}")
        return embeds.masked_scatter(mask[..., None].expand_as(embeds), feats.to(embeds.dtype))

    # -- text -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, pixel_values=None, image_grid_thw=None,
                cache: StaticCache | None = None, *, pixel_values_videos=None, video_grid_thw=None,
                inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_hidden: bool = False, logits_at: torch.Tensor | None = None):
        """``(logits [B, S, V], cache)``; with ``return_hidden`` also the per-layer hidden states.

        ``logits_at [B]`` (int): only row ``b``'s position ``logits_at[b]`` goes through the head,
        so logits are ``[B, 1, V]`` (a batched step needs one row per sequence, not the padding).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [B, S], got {tuple(input_ids.shape)}")
            V = self.config.text.vocab_size
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
                raise ValueError(f"input_ids out of range [0, {V})")
            inputs_embeds = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        x = inputs_embeds
        B, S, _ = x.shape
        start = cache.length if cache is not None else 0
        if cache is not None:
            cache.check_room(S)
        if position_ids is None:
            position_ids = (torch.arange(S, device=x.device) + start)[None].expand(B, S)
        lm = self.model.language_model
        cos, sin = rope_cos_sin(position_ids, self.config.text, x.dtype)
        hidden = [x]
        for i, layer in enumerate(lm.layers):
            x = layer(x, cos, sin, position_ids, cache.layers[i] if cache is not None else None)
            hidden.append(x)
        if cache is not None:
            cache.length = start + S
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]
        logits = self.lm_head(lm.norm(x))
        return (logits, cache, hidden) if return_hidden else (logits, cache)
