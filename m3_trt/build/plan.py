"""The build plan: ranks, what is sharded how, per-rank memory, and whether it fits.

Everything is computed from the config and the target alone (the model is built on the ``meta``
device and sliced with :mod:`m3_trt.model.shard`), so a plan needs only ``config.json``.

Per-rank memory terms (bytes):

* **weights** — each parameter's rank slice. With ``weight_dtype = fp8`` the Linear weights of
  the decoder layers (attention, indexer, dense MLP, experts, shared expert; not the router) are
  1 byte each plus fp32 scales: per output channel (one per row, per expert) unless the
  checkpoint carries block scales (``scale_block = (br, bc)``: one per ``br × bc`` block).
  Everything else (embedding, LM head, norms, router, vision tower, projector) is stored in the
  activation ``dtype``. Per-tensor activation scales (one fp32 per Linear) are left out (< 1 MiB).
* **kv_cache** — for ``max_batch × max_seq_len``: K and V of the rank's KV heads on every layer,
  plus the indexer's single key head on sparse layers (replicated on every rank), in
  ``kv_cache_dtype``.
* **activations** — one forward of ``max_num_tokens`` tokens: ``tokens × (4·hidden + (Hq_l +
  2·G_l)·head_dim + ffn_l) × bytes(dtype)`` where ``ffn_l`` is the widest per-rank MLP
  intermediate (dense ``2·I/tp``, or MoE ``2·Fs/tp + min(top_k, E_l)·2·F/moe_tp``: worst case,
  every token's experts on this rank), plus fp32 logits ``max_batch × vocab``.
* **reserve** — ``runtime_reserve_gib`` (CUDA context, library workspaces).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from m3_trt.model.config import M3Config
from m3_trt.model.pieces import CHUNK_ELEMS
from m3_trt.model.shard import Layout, check_divisible, local_experts, local_heads, shard_tensor
from m3_trt.build.targets import BYTES, Target
from m3_trt.quant.fp8 import fp8_scale_shape, is_fp8_weight

GIB = 1024**3


@dataclass
class RankPlan:
    rank: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    experts: tuple[int, int]
    weight_bytes: dict[str, int]  # by storage dtype, plus "fp8_scales"
    kv_cache_bytes: int
    activation_bytes: int
    reserve_bytes: int

    @property
    def weights_total(self) -> int:
        return sum(self.weight_bytes.values())

    @property
    def terms(self) -> dict[str, int]:
        return {"weights": self.weights_total, "kv_cache": self.kv_cache_bytes,
                "activations": self.activation_bytes, "reserve": self.reserve_bytes}

    @property
    def total(self) -> int:
        return sum(self.terms.values())


@dataclass
class Plan:
    target: Target
    layout: Layout
    notes: list[str]
    ranks: list[RankPlan]
    budget_bytes: int
    sharding: dict[str, str] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return all(r.total <= self.budget_bytes for r in self.ranks)

    @property
    def too_large(self) -> str | None:
        """The largest term of the worst rank when the plan does not fit, else None."""
        if self.fits:
            return None
        worst = max(self.ranks, key=lambda r: r.total)
        name, val = max(worst.terms.items(), key=lambda kv: kv[1])
        over = worst.total - self.budget_bytes
        alone = " (alone larger than the GPU)" if val > self.budget_bytes else ""
        return (f"{name} {val / GIB:.2f} GiB{alone} is the largest term on rank {worst.rank}; the rank needs "
                f"{worst.total / GIB:.2f} GiB of {self.budget_bytes / GIB:.2f} GiB ({over / GIB:.2f} GiB over)")

    def to_dict(self) -> dict:
        return {"target": self.target.name, "layout": asdict(self.layout), "notes": self.notes,
                "sharding": self.sharding, "budget_bytes": self.budget_bytes, "fits": self.fits,
                "too_large": self.too_large,
                "ranks": [{**asdict(r), "terms": r.terms, "total": r.total} for r in self.ranks]}

    def text(self) -> str:
        t, lay = self.target, self.layout
        lines = [f"plan: target {t.name} ({t.description}) -> {lay.world} rank(s), {lay.name()}",
                 f"  dtypes: activations {t.dtype}, weights {t.weight_dtype}, kv cache {t.kv_cache_dtype}; "
                 f"max batch {t.max_batch}, input {t.max_input_len}, seq {t.max_seq_len}, "
                 f"tokens/pass {t.max_num_tokens}, images {t.max_images}"]
        lines += [f"  sharding: {k}: {v}" for k, v in self.sharding.items()]
        lines += [f"  note: {n}" for n in self.notes]
        for r in self.ranks:
            w = ", ".join(f"{k} {v / GIB:.3f}" for k, v in r.weight_bytes.items())
            lines.append(f"  rank {r.rank}: q heads [{r.q_heads[0]},{r.q_heads[1]}) kv heads [{r.kv_heads[0]},"
                         f"{r.kv_heads[1]}) experts [{r.experts[0]},{r.experts[1]}) | weights {r.weights_total / GIB:.3f}"
                         f" GiB ({w}) | kv cache {r.kv_cache_bytes / GIB:.3f} GiB | activations "
                         f"{r.activation_bytes / GIB:.3f} GiB | reserve {r.reserve_bytes / GIB:.2f} GiB | total "
                         f"{r.total / GIB:.3f} GiB")
        lines.append(f"  fits: {'yes' if self.fits else 'NO'} (budget {self.budget_bytes / GIB:.1f} GiB per GPU)"
                     + ("" if self.fits else f" -- {self.too_large}"))
        return "\n".join(lines)


def _meta_state(cfg: M3Config) -> dict[str, torch.Tensor]:
    from m3_trt.model.modeling import M3ForConditionalGeneration

    with torch.device("meta"):
        return dict(M3ForConditionalGeneration(cfg).state_dict())


def weight_bytes(state: dict[str, torch.Tensor], cfg: M3Config, target: Target, lay: Layout, r: int,
                 scale_block: tuple[int, int] | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, t in state.items():
        s = shard_tensor(name, t, cfg.text, lay, r)
        if target.weight_dtype == "fp8" and is_fp8_weight(name, s):
            out["fp8"] = out.get("fp8", 0) + s.numel()
            n_scales = 1
            for d in fp8_scale_shape(tuple(s.shape), scale_block):
                n_scales *= d
            out["fp8_scales"] = out.get("fp8_scales", 0) + 4 * n_scales
        else:
            dt = target.dtype if target.weight_dtype == "fp8" else target.weight_dtype
            out[dt] = out.get(dt, 0) + BYTES[dt] * s.numel()
    return out


def kv_cache_bytes(cfg: M3Config, target: Target, lay: Layout, r: int) -> int:
    t = cfg.text
    _, kv = local_heads(t, lay, r)
    B, T, b = target.max_batch, target.max_seq_len, BYTES[target.kv_cache_dtype]
    per_layer = 2 * B * len(kv) * T * t.head_dim * b
    n_sparse = sum(lt == "minimax_m3_sparse" for lt in t.layer_types)
    return t.num_hidden_layers * per_layer + n_sparse * B * T * t.index_head_dim * b


def activation_bytes(cfg: M3Config, target: Target, lay: Layout, r: int) -> int:
    t = cfg.text
    q, kv = local_heads(t, lay, r)
    E_l = len(local_experts(t, lay, r))
    widths = []
    if "dense" in t.mlp_layer_types:
        widths.append(2 * t.dense_intermediate_size // lay.tp)
    if "sparse" in t.mlp_layer_types:
        widths.append(2 * t.shared_intermediate_size // lay.tp
                      + min(t.num_experts_per_tok, E_l) * 2 * t.intermediate_size // lay.moe_tp)
    per_token = 4 * t.hidden_size + (len(q) + 2 * len(kv)) * t.head_dim + max(widths)
    return target.max_num_tokens * per_token * BYTES[target.dtype] + target.max_batch * t.vocab_size * 4


def make_plan(cfg: M3Config, target: Target, scale_block: tuple[int, int] | None = None) -> Plan:
    """Resolve ``target`` against ``cfg``; raises ValueError for a split the model cannot take."""
    lay = Layout.of(target.tp, target.ep)
    notes = check_divisible(cfg.text, lay)
    t = cfg.text
    if target.max_seq_len > t.max_position_embeddings:
        raise ValueError(f"target max_seq_len={target.max_seq_len} exceeds the model's max_position_embeddings="
                         f"{t.max_position_embeddings}")
    if lay.tp == 1 and lay.world > 1:
        notes.append(f"attention, dense MLP and shared expert replicated on all {lay.world} ranks (tp=1)")
    if target.weight_dtype == "fp8":
        notes.append("FP8 scales: " + (f"checkpoint blocks {scale_block[0]}x{scale_block[1]}" if scale_block
                                       else "per output channel (checkpoint has no block scales)"))
    state = _meta_state(cfg)
    ranks = []
    for r in range(lay.world):
        q, kv = local_heads(t, lay, r)
        ex = local_experts(t, lay, r)
        ranks.append(RankPlan(
            rank=r, q_heads=(q.start, q.stop), kv_heads=(kv.start, kv.stop), experts=(ex.start, ex.stop),
            weight_bytes=weight_bytes(state, cfg, target, lay, r, scale_block),
            kv_cache_bytes=kv_cache_bytes(cfg, target, lay, r), activation_bytes=activation_bytes(cfg, target, lay, r),
            reserve_bytes=int(target.runtime_reserve_gib * GIB)))
    Hq, G = t.num_attention_heads, t.num_key_value_heads
    sharding = {
        "attention": f"TP{lay.tp}: {Hq // lay.tp} q heads/rank, {len(local_heads(t, lay, 0)[1])} KV head(s)/rank, "
                     f"o_proj rows split -> all-reduce" if lay.tp > 1 else "replicated",
        "indexer": "q heads follow the KV heads, k_proj replicated" if t.has_sparse_layers else "none",
        "dense_mlp+shared_expert": f"column/row split over {lay.tp} -> all-reduce" if lay.tp > 1 else "replicated",
        "routed_experts": f"EP{lay.ep}: {t.num_local_experts // lay.ep} contiguous experts/rank"
                          + (f", intermediate split {lay.moe_tp}x" if lay.moe_tp > 1 else "")
                          + "; router replicated; partial sums -> all-reduce",
        "embedding+lm_head+vision": "replicated",
    }
    return Plan(target=target, layout=lay, notes=notes, ranks=ranks,
                budget_bytes=int(target.gpu_memory_gib * GIB), sharding=sharding)


# One conversion process without its piece: python + torch + the checkpoint reader (measured
# ~0.8 GiB RSS on Linux x86-64), rounded up.
WORKER_BASE_BYTES = 1 * GIB


def host_available_bytes() -> int:
    """``MemAvailable`` from ``/proc/meminfo`` (physical memory where that file is absent)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# Bytes a conversion process holds per value of the chunk it converts: the chunk in fp32 (4), the
# ranks' cut copies (4), their cast (2-4) and the per-channel FP8 quantization's temporaries
# (``w.float()``, ``|w|``, ``w / scale``: 4 each, not all alive at once) — 16 rounds that up.
CHUNK_BYTES_PER_VALUE = 16


def largest_chunk(cfg: M3Config) -> tuple[str, int]:
    """The parameter whose chunk (values read and converted at once by
    :func:`m3_trt.build.rank_weights.convert_piece`) is largest, and that chunk's values.

    Chunks are :data:`m3_trt.model.pieces.CHUNK_ELEMS` values of dim-0 rows, whole experts of an
    expert stack (at least one), and whole 2-D weights an FP8 checkpoint may store as FP8 (the plan
    is made from the config alone, so it assumes they are).
    """
    best, n = "", 0
    for name, t in _meta_state(cfg).items():
        shape = tuple(t.shape)
        per_row = math.prod(shape[1:]) if shape else 1
        rows = shape[0] if shape else 1
        if len(shape) == 2 and is_fp8_weight(name, t):
            size = rows * per_row
        else:
            size = max(1, min(rows, CHUNK_ELEMS // max(per_row, 1))) * per_row
        if size > n:
            best, n = name, size
    return best, n


def host_memory(cfg: M3Config, workers: int = 1, available: int | None = None) -> dict:
    """Host memory a build converting ``workers`` pieces at once needs, and whether the host has it.

    Each converting process holds its base (:data:`WORKER_BASE_BYTES`) plus its largest chunk
    (:func:`largest_chunk`) at :data:`CHUNK_BYTES_PER_VALUE` bytes per value — the conversion reads a
    piece chunk by chunk, never whole, so neither the depth nor a piece's size counts; with
    ``workers`` > 1 the main process only appends the workers' spool files (its base).
    """
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be >= 1")
    name, values = largest_chunk(cfg)
    per_worker = WORKER_BASE_BYTES + CHUNK_BYTES_PER_VALUE * values
    need = per_worker * workers + (WORKER_BASE_BYTES if workers > 1 else 0)
    avail = host_available_bytes() if available is None else available
    return {"workers": workers, "largest_chunk": name, "largest_chunk_values": values,
            "per_worker_bytes": per_worker, "need_bytes": need, "available_bytes": avail, "fits": need <= avail,
            "text": f"host memory: {workers} worker(s) x {per_worker / GIB:.2f} GiB (largest chunk: {name}, "
                    f"{values / 1e6:.1f} M values) = {need / GIB:.2f} GiB of {avail / GIB:.2f} GiB available"}
