"""The network route's numeric check: each component's network-writing code, run on the torch
shadow network (:mod:`network_shadow`), against the torch component it replaces.

Legend: B batch, S new tokens, T cache slots (``max_seq_len``), G KV heads, D head dim, Di indexer
head dim, Dm hidden, V vocabulary.

Why a shadow and not the engine: TensorRT-RTX builds engines on a CPU-only host but cannot
deserialize them without a GPU, so the engine itself cannot run here. ``check_component`` runs
*the same* ``write_*`` calls that built the engine on ``ShadowNetwork`` (every ``add_*`` evaluated
in torch, in the dtype the strongly typed network gives it; TensorRT's native attention, RoPE and
KV-cache update by their documented semantics) and compares the outputs with the torch component
(``export/onnx/components.py``, the same module the ONNX export is verified against) on fixed-seed
inputs. What it proves: the graph logic (reshapes, masks, cache slots, block choice, dense MoE,
weights read from the right tensors) equals the reference; what it cannot prove: TensorRT's own
kernels, which only a GPU run shows.

Cases per decoder layer (positions contiguous per row, as the network route requires; cache slots
before the start hold random values, slots after it zeros): a prefill of up to 40 tokens from 0, one
decode step at 40, and a chunk of 5 that ends the cache (every earlier slot filled, so a sparse
layer's indexer must choose among all ``T / index_block_size`` blocks); the batch is
``min(2, max_batch)``. Embedding: random ids; head: random
hidden states. Verdict: relative L2 error of every float output within
``TOLERANCES[("trt_network_shadow", dtype)]`` and the indexer's block choices equal exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from m3_trt.export.onnx import components as C
from m3_trt.export.tensorrt.network_model import shadow_run
from m3_trt.model.modeling import DTYPES
from m3_trt.tolerances import TOLERANCES, max_abs, rel_err

STAGE = "trt_network_shadow"
SEED = 0


def cases(max_seq_len: int) -> list[tuple[str, int, int]]:
    """``(case, start slot, S)`` for a decoder layer, clipped to the cache."""
    T = max_seq_len
    return [("prefill", 0, min(40, T)), ("decode", min(40, T - 1), 1), ("chunk", max(0, T - 5), min(5, T))]


@contextmanager
def reference_kernels(module: torch.nn.Module) -> Iterator[None]:
    """The readable reference implementations in ``module`` for the duration (an export may have
    switched the shared model to its plugin kernels); restored after."""
    saved = [(m, m.kernels) for m in module.modules() if hasattr(m, "kernels")]
    try:
        for m, _ in saved:
            m.kernels = "reference"
        yield
    finally:
        for m, k in saved:
            m.kernels = k


def layer_feeds(cfg, sparse: bool, dtype: torch.dtype, B: int, T: int, start: int, S: int, gen):
    """Seeded inputs of one decoder-layer component: ``S`` new tokens at ``start`` over a ``T``-slot cache
    (slots past ``start + S`` zero, like a real cache); returns (feeds, the indexer cache without its head axis)."""
    x = torch.randn(B, S, cfg.hidden_size, generator=gen).to(dtype)
    pos = (torch.arange(S) + start)[None].expand(B, S).contiguous()
    kc = torch.randn(B, cfg.num_key_value_heads, T, cfg.head_dim, generator=gen).to(dtype)
    vc = torch.randn(B, cfg.num_key_value_heads, T, cfg.head_dim, generator=gen).to(dtype)
    ic = torch.randn(B, T, cfg.index_head_dim, generator=gen).to(dtype)
    for c in (kc, vc):
        c[:, :, start + S:] = 0  # unwritten slots hold zeros, like a real cache
    ic[:, start + S:] = 0
    feeds = dict(hidden=x, position_ids=pos, k_cache=kc, v_cache=vc)
    if sparse:
        feeds["idx_cache"] = ic[:, None].clone()  # the network route's one IO change: a unit head axis
    return feeds, ic


def _pairs(model, reference, name: str, dtype: str, max_seq_len: int, B: int) -> Iterator[tuple[str, dict, dict]]:
    """``(case, network outputs, reference outputs)`` by output name, for component ``name``."""
    gen = torch.Generator().manual_seed(SEED)
    cfg = model.config.text
    tdt = DTYPES[dtype]
    if name == "embedding":
        ids = torch.randint(0, cfg.vocab_size, (B, 7), generator=gen)
        yield "ids", shadow_run(model, name, {"input_ids": ids}, dtype=dtype, max_seq_len=max_seq_len), \
            {"inputs_embeds": C.Embedding(reference)(ids)}
        return
    if name == "head":
        h = torch.randn(B, 7, cfg.hidden_size, generator=gen).to(tdt)
        logits, normed = C.Head(reference)(h)
        yield "hidden", shadow_run(model, name, {"hidden": h}, dtype=dtype, max_seq_len=max_seq_len), \
            {"logits": logits, "final_norm": normed}
        return
    index = int(name.removeprefix("layer_"))
    comp = C.DecoderLayerComponent(reference, index)
    for case, start, S in cases(max_seq_len):
        feeds, ic = layer_feeds(cfg, comp.sparse, tdt, B, max_seq_len, start, S, gen)
        with reference_kernels(comp):
            ref = comp(feeds["hidden"], feeds["position_ids"], feeds["k_cache"].clone(), feeds["v_cache"].clone(),
                       ic.clone() if comp.sparse else None)
        out = shadow_run(model, name, feeds, dtype=dtype, max_seq_len=max_seq_len)
        if comp.sparse:
            out["idx_cache_out"] = out["idx_cache_out"][:, 0]
        names = ["hidden_out", "k_cache_out", "v_cache_out"] + (["idx_cache_out", "block_idx"] if comp.sparse else [])
        yield case, out, dict(zip(names, ref))


def check_component(model, name: str, *, dtype: str, max_seq_len: int, max_batch: int = 2,
                    reference=None) -> dict:
    """Shadow-run component ``name`` ('embedding' | 'layer_<i>' | 'head') written from ``model``'s
    weights and compare with the torch component of ``reference`` (default: ``model``).

    ``model`` needs only that component's weights in memory (a :class:`PieceModel` piece will do).
    Returns ``{"ok", "tolerance", "max_rel_err", "cases": {case: {output: {"rel_err", "max_abs"} |
    {"equal"}}}}``; the caller decides what a failure does.
    """
    if (STAGE, dtype) not in TOLERANCES:
        raise ValueError(f"no shadow tolerance for dtype {dtype!r} (m3_trt/tolerances.py, stage {STAGE!r})")
    tol = TOLERANCES[(STAGE, dtype)]
    reference = model if reference is None else reference
    B = min(2, max_batch)
    result: dict = {"ok": True, "tolerance": tol, "metric": "relative L2 error; block_idx exact",
                    "batch": B, "seed": SEED, "cases": {}}
    worst = 0.0
    with torch.no_grad():
        for case, out, ref in _pairs(model, reference, name, dtype, max_seq_len, B):
            rows = {}
            for key, r in ref.items():
                o = out[key]
                if not r.is_floating_point():
                    same = o.shape == r.shape and torch.equal(o.to(r.dtype), r)
                    rows[key] = {"equal": bool(same)}
                    result["ok"] &= bool(same)
                    continue
                err = rel_err(o, r) if o.shape == r.shape else float("inf")
                rows[key] = {"rel_err": err, "max_abs": max_abs(o, r) if o.shape == r.shape else float("inf")}
                worst = max(worst, err)
                result["ok"] &= err <= tol
            result["cases"][case] = rows
    result["max_rel_err"] = worst
    return result


def failures(result: dict) -> list[str]:
    """``case/output: what`` for every failed comparison of a ``check_component`` result."""
    bad = []
    for case, rows in result["cases"].items():
        for key, row in rows.items():
            if "equal" in row and not row["equal"]:
                bad.append(f"{case}/{key}: differs")
            elif "rel_err" in row and not row["rel_err"] <= result["tolerance"]:
                bad.append(f"{case}/{key}: rel err {row['rel_err']:.3e} > {result['tolerance']:.1e}")
    return bad
