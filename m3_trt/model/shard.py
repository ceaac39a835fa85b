"""How each parameter of the reference model is split across ranks (a table, not code paths).

Layout (``Layout``): ``world`` ranks. Attention, the dense MLP and the shared expert are
tensor-parallel over ``tp`` ranks (``tp`` is 1 = replicated, or ``world``); the routed experts
are expert-parallel over ``ep`` groups of contiguous expert ranges, each expert's intermediate
dimension split ``moe_tp = world / ep`` ways. Rank ``r`` has ``tp_rank = r`` (or 0),
``ep_rank = r % ep`` and ``moe_tp_rank = r // ep`` (TensorRT-LLM's mapping).

Attention heads: rank ``tp_rank`` owns query heads ``[tp_rank·Hq/tp, (tp_rank+1)·Hq/tp)``. KV
heads: ``G/tp`` per rank when ``tp <= G``; when ``tp > G`` each rank holds the one KV head its
query heads belong to (KV-head replication ``tp/G``), which needs ``tp % G == 0``. The indexer's
query heads follow the KV heads (one selection per KV group); its single key head is replicated.

Legend for the rules: rows = output features (dim 0 of a Linear weight), cols = input features.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from m3_trt.model.config import TextConfig


@dataclass(frozen=True)
class Layout:
    world: int = 1
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        if self.tp not in (1, self.world):
            raise ValueError(f"tp={self.tp}: must be 1 (replicated) or the world size {self.world}")
        if self.world % self.ep:
            raise ValueError(f"ep={self.ep} does not divide the world size {self.world}")

    @classmethod
    def of(cls, tp: int, ep: int) -> "Layout":
        return cls(world=max(tp, ep), tp=tp, ep=ep)

    @property
    def moe_tp(self) -> int:
        return self.world // self.ep

    def tp_rank(self, r: int) -> int:
        return r if self.tp > 1 else 0

    def ep_rank(self, r: int) -> int:
        return r % self.ep

    def moe_tp_rank(self, r: int) -> int:
        return r // self.ep

    def name(self) -> str:
        return f"W{self.world}-TP{self.tp}-EP{self.ep}" + (f"-moeTP{self.moe_tp}" if self.moe_tp > 1 else "")


def check_divisible(cfg: TextConfig, lay: Layout) -> list[str]:
    """Raises ValueError for a layout the model cannot be split into; returns notes for the plan."""
    notes = []
    Hq, G, tp = cfg.num_attention_heads, cfg.num_key_value_heads, lay.tp
    if Hq % tp:
        raise ValueError(f"{Hq} attention heads do not divide over tp={tp}")
    if tp > G:
        if tp % G:
            raise ValueError(f"{G} KV heads over tp={tp}: tp must be a multiple of the KV heads to replicate them")
        notes.append(f"KV heads: {G} < tp {tp} -> each KV head (and its indexer head) replicated on {tp // G} "
                     f"ranks; 1 KV head per rank")
    elif G % tp:
        raise ValueError(f"{G} KV heads do not divide over tp={tp}")
    for what, n in (("dense_intermediate_size", cfg.dense_intermediate_size),
                    ("shared_intermediate_size", cfg.shared_intermediate_size)):
        if n % tp:
            raise ValueError(f"{what}={n} does not divide over tp={tp}")
    if cfg.num_local_experts % lay.ep:
        raise ValueError(f"{cfg.num_local_experts} experts do not divide over ep={lay.ep}")
    if cfg.intermediate_size % lay.moe_tp:
        raise ValueError(f"expert intermediate_size={cfg.intermediate_size} does not divide over moe_tp={lay.moe_tp}")
    return notes


def local_heads(cfg: TextConfig, lay: Layout, r: int) -> tuple[range, range]:
    """Query heads and KV heads (== indexer heads) owned by rank ``r``."""
    Hq, G, tp, t = cfg.num_attention_heads, cfg.num_key_value_heads, lay.tp, lay.tp_rank(r)
    q = range(t * Hq // tp, (t + 1) * Hq // tp)
    if tp <= G:
        kv = range(t * G // tp, (t + 1) * G // tp)
    else:
        g = q.start // (Hq // G)
        kv = range(g, g + 1)
    return q, kv


def local_experts(cfg: TextConfig, lay: Layout, r: int) -> range:
    n = cfg.num_local_experts // lay.ep
    e = lay.ep_rank(r)
    return range(e * n, (e + 1) * n)


def _rows(t: torch.Tensor, heads: range, width: int, dim: int = 0) -> torch.Tensor:
    return t.narrow(dim, heads.start * width, len(heads) * width)


def _halves(t: torch.Tensor, part: int, nparts: int, dim: int) -> torch.Tensor:
    """Split each of the gate‖up halves along ``dim`` and keep part ``part`` of both."""
    h = t.shape[dim] // 2
    n = h // nparts
    return torch.cat([t.narrow(dim, part * n, n), t.narrow(dim, h + part * n, n)], dim=dim)


def _cols(t: torch.Tensor, part: int, nparts: int, dim: int = -1) -> torch.Tensor:
    n = t.shape[dim] // nparts
    return t.narrow(dim, part * n, n)


# (regex on the in-memory name, rule). Anything unmatched is replicated.
RULES: tuple[tuple[str, str], ...] = (
    (r"\.self_attn\.q_proj\.weight$", "q_rows"),
    (r"\.self_attn\.(k_proj|v_proj)\.weight$", "kv_rows"),
    (r"\.self_attn\.o_proj\.weight$", "q_cols"),
    (r"\.self_attn\.indexer\.q_proj\.weight$", "index_rows"),
    (r"\.mlp\.(shared_experts\.)?gate_up_proj\.weight$", "tp_halves"),
    (r"\.mlp\.(shared_experts\.)?down_proj\.weight$", "tp_cols"),
    (r"\.mlp\.experts\.gate_up_proj$", "expert_halves"),
    (r"\.mlp\.experts\.down_proj$", "expert_cols"),
)
_COMPILED = tuple((re.compile(p), rule) for p, rule in RULES)


def rule_for(name: str) -> str:
    if not name.startswith("model.language_model.layers."):
        return "replicated"  # embedding, vision tower, projector, final norm, LM head
    for rx, rule in _COMPILED:
        if rx.search(name):
            return rule
    return "replicated"


def shard_tensor(name: str, t: torch.Tensor, cfg: TextConfig, lay: Layout, r: int) -> torch.Tensor:
    """Rank ``r``'s slice of parameter ``name`` (a view where possible; works on ``meta`` tensors)."""
    rule = rule_for(name)
    if rule == "replicated":
        return t
    q, kv = local_heads(cfg, lay, r)
    D = cfg.head_dim
    if rule == "q_rows":
        return _rows(t, q, D)
    if rule == "kv_rows":
        return _rows(t, kv, D)
    if rule == "q_cols":
        return _rows(t, q, D, dim=1)
    if rule == "index_rows":
        return _rows(t, kv, cfg.index_head_dim)
    if rule == "tp_halves":
        return _halves(t, lay.tp_rank(r), lay.tp, dim=0)
    if rule == "tp_cols":
        return _cols(t, lay.tp_rank(r), lay.tp)
    ex = local_experts(cfg, lay, r)
    t = t.narrow(0, ex.start, len(ex))
    if rule == "expert_halves":
        return _halves(t, lay.moe_tp_rank(r), lay.moe_tp, dim=1)
    return _cols(t, lay.moe_tp_rank(r), lay.moe_tp, dim=2)


def shard_state(state: dict[str, torch.Tensor], cfg: TextConfig, lay: Layout, r: int) -> dict[str, torch.Tensor]:
    return {k: shard_tensor(k, v, cfg, lay, r) for k, v in state.items()}
