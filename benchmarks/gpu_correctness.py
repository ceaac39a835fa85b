"""Correctness of the three Triton kernels against their references (the ``check`` section of
``benchmarks/kernels.py``): fp32 and bf16, prefill and decode, the indexer by exact block sets,
a 64-bit-offset prefill case, and a negative control per check (a known-wrong result that the
same metric must flag). Verdicts use ``tests/tolerances.py`` (on ``PYTHONPATH``).
"""

from __future__ import annotations

import traceback

import torch
import torch.nn.functional as F
from gpu_common import MOE_KW, Profile, Steps, _moe_args, attn_inputs, moe_weights
from tolerances import TOLERANCES, max_abs, rel_err

from m3_trt.plugins.block_sparse_attention import block_sparse_attention
from m3_trt.plugins.indexer_topk import indexer_topk
from m3_trt.plugins.indexer_topk.reference import pack_ascending
from m3_trt.plugins.swiglu_moe import swiglu_moe


def _tol(dtype) -> float:
    return TOLERANCES[("kernel", "fp32" if dtype == torch.float32 else "bf16")]


def _verdict(err: float, bad_err: float, tol: float) -> dict:
    """``pass``: within tolerance (NaN never passes) and the negative control (a known-wrong
    result, computed by the reference: it shows the metric catches the fault) lands over 10x the
    tolerance (fp32: 1e-4, bf16: 0.2 relative)."""
    detected = bad_err > 10 * tol
    return dict(rel_err=err, tolerance=tol, negative_control_rel_err=bad_err, negative_control_detected=detected,
                within_tolerance=err <= tol, passed=bool(err <= tol and detected))


def check_indexer(p: Profile, device: str, dtype, mode: str) -> dict:
    """Exact block sets vs the reference; a row may differ only by swapping blocks whose float64
    scores lie within 1e-4 relative of the row's weakest selected block (a numerical tie)."""
    a, c = p.attn, p.check
    B, S, T = (1, c["prefill"], c["prefill"]) if mode == "prefill" else (c["decode_batch"], 1, c["decode"])
    _, _, _, iq, ik, pos = attn_inputs(a, B, S, T, dtype, device, smooth=False)
    if B > 1:
        pos = pos - torch.arange(B, device=device)[:, None] * (T // (2 * B))  # rows at different positions
    kw = dict(block_size=a["block"], topk=a["topk"], local_blocks=a["local"])
    out = indexer_topk(iq, ik, pos, **kw, impl=p.impl)
    ref = indexer_topk(iq.float(), ik.float(), pos, **kw, impl="reference")
    bad_rows = _rows_beyond_ties(out, ref, iq, ik, pos, a["block"], a["local"])
    # negative control: one row's last selected block moved to a neighbour
    wrong = out.clone().long()
    row = wrong[0, 0, -1]
    last = int((row >= 0).sum()) - 1
    row[last] = (row[last] + 1) % -(-T // a["block"]) if last > 0 else -1
    detected = bool(_rows_beyond_ties(pack_ascending(wrong), ref, iq, ik, pos, a["block"], a["local"]))
    same = bool(torch.equal(out, ref))
    return dict(shape=dict(B=B, S=S, T=T), rows=out.numel() // out.shape[-1], rows_identical=same,
                rows_differing=int((out != ref).any(-1).sum()), rows_differing_beyond_ties=len(bad_rows),
                negative_control_detected=detected, passed=bool(not bad_rows and detected))


def _rows_beyond_ties(out, ref, q, k, pos, bs, local):
    rows = (out != ref).any(-1).nonzero().tolist()
    if not rows or len(rows) > 512:  # past a few hundred differing rows it is no tie: all count
        return rows
    T = k.shape[1]
    N = -(-T // bs)
    bad = []
    for b, h, s in rows:
        sc = (q[b, h, s].double() @ k[b].double().T)
        sc = sc.masked_fill(torch.arange(T, device=sc.device) > pos[b, s], float("-inf"))
        sc = F.pad(sc, (0, N * bs - T), value=float("-inf")).view(N, bs).amax(-1)
        for j in range(local):
            sc[max(int(pos[b, s]) // bs - j, 0)] = float("inf")
        a_set = {int(x) for x in out[b, h, s] if x >= 0}
        r_set = {int(x) for x in ref[b, h, s] if x >= 0}
        kth = min(sc[list(r_set)].tolist()) if r_set else 0.0
        margin = 1e-4 * (abs(kth) + 1.0) if kth not in (float("inf"), float("-inf")) else 0.0
        if len(a_set) != len(r_set) or any(abs(sc[x].item() - kth) > margin for x in a_set ^ r_set):
            bad.append((b, h, s))
    return bad


def check_attention(p: Profile, device: str, dtype, mode: str) -> dict:
    """Rel. error vs the fp32 dense-mask reference on the same (dtype-rounded) values; the
    negative control shifts every selected block to its right neighbour."""
    a, c = p.attn, p.check
    B, S, T = (1, c["prefill"], c["prefill"]) if mode == "prefill" else (c["decode_batch"], 1, c["decode"])
    q, k, v, iq, ik, pos = attn_inputs(a, B, S, T, dtype, device)
    kw = dict(block_size=a["block"], scale=a["D"] ** -0.5)
    # blocks chosen by the indexer's reference (the kernel is judged on its own above)
    idx = indexer_topk(iq, ik, pos, block_size=a["block"], topk=a["topk"], local_blocks=a["local"], impl="reference")
    out = block_sparse_attention(q, k, v, idx, pos, **kw, impl=p.impl)
    ref = block_sparse_attention(q.float(), k.float(), v.float(), idx, pos, **kw, impl="reference")
    n = -(-T // a["block"])
    shifted = pack_ascending(torch.where(idx >= 0, (idx.long() + 1) % n, -1))
    bad = block_sparse_attention(q.float(), k.float(), v.float(), shifted, pos, **kw, impl="reference")
    return dict(shape=dict(B=B, S=S, T=T), max_abs=max_abs(out, ref), out_finite=bool(out.isfinite().all()),
                **_verdict(rel_err(out, ref), rel_err(bad, ref), _tol(dtype)))


def check_attention_big_offsets(p: Profile, device: str) -> dict:
    """64-bit offsets at scale: q is a view with the batch stride of a ``[B, Hq, big_len, D]``
    prefill (B = 5 at 64K: the last row starts past 2^31 elements), holding ``big_queries``
    queries; judged per batch row against the reference on a compact copy."""
    a, c = p.attn, p.check
    B, L, Sq = c["big_batch"], c["big_len"], c["big_queries"]
    dtype = torch.bfloat16
    q_full = torch.empty(B, a["Hq"], L, a["D"], device=device, dtype=dtype)
    q = q_full[:, :, L - Sq:]
    q.copy_(torch.randn(q.shape, device=device, dtype=dtype))
    _, k, v, iq, ik, pos = attn_inputs(a, B, Sq, L, dtype, device)
    kw = dict(block_size=a["block"], scale=a["D"] ** -0.5)
    # blocks chosen by the indexer's reference (the kernel is judged on its own above)
    idx = indexer_topk(iq, ik, pos, block_size=a["block"], topk=a["topk"], local_blocks=a["local"], impl="reference")
    out = block_sparse_attention(q, k, v, idx, pos, **kw, impl=p.impl)
    ref = block_sparse_attention(q.float(), k.float(), v.float(), idx, pos, **kw, impl="reference")
    errs = [rel_err(out[b], ref[b]) for b in range(B)]
    tol = _tol(dtype)
    last_offset = (B - 1) * q.stride(0) + (L - Sq) * q.stride(2)
    return dict(shape=dict(B=B, L=L, queries=Sq), last_row_element_offset=last_offset,
                beyond_int32=last_offset >= 2**31, rel_err_per_batch_row=errs, tolerance=tol,
                passed=bool(all(e <= tol for e in errs)))


def check_moe(p: Profile, device: str, dtype, T: int, w16: dict, w32: dict) -> dict:
    """Rel. error vs the fp32 reference on the same values; negative control: the routed experts'
    scaling left out (``routed_scaling`` 1 instead of 2)."""
    w = w32 if dtype == torch.float32 else w16
    x = torch.randn(T, p.moe["D"], device=device, dtype=torch.bfloat16).to(dtype)
    kw = dict(MOE_KW, top_k=p.moe["top_k"])
    out = swiglu_moe(*_moe_args(w, x), **kw, impl=p.impl)
    ref = swiglu_moe(*_moe_args(w32, x.float()), **kw, impl="reference")
    bad = swiglu_moe(*_moe_args(w32, x.float()), **dict(kw, routed_scaling=1.0), impl="reference")
    return dict(tokens=T, max_abs=max_abs(out, ref), **_verdict(rel_err(out, ref), rel_err(bad, ref), _tol(dtype)))


def check_moe_no_host_sync(p: Profile, w16: dict) -> dict:
    """CUDA only: one Triton MoE call under ``torch.cuda.set_sync_debug_mode("error")``, which
    raises at any device-to-host synchronisation (CUDA graphs and TensorRT enqueue need none)."""
    x = torch.randn(16, p.moe["D"], device="cuda", dtype=torch.bfloat16)
    kw = dict(MOE_KW, top_k=p.moe["top_k"])
    swiglu_moe(*_moe_args(w16, x), **kw, impl=p.impl)  # compile and allocate outside the watch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        swiglu_moe(*_moe_args(w16, x), **kw, impl=p.impl)
        synced = None
    except RuntimeError as e:
        synced = f"{str(e)[:300]} | {traceback.format_exc(limit=-6)[-1200:]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return dict(tokens=16, host_sync=synced, passed=synced is None)


def run_checks(p: Profile, device: str, steps: Steps) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references in true fp32
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for mode in ("prefill", "decode"):
            torch.manual_seed(1)
            steps("correctness", f"indexer_{mode}_{tag}", lambda: check_indexer(p, device, dtype, mode))
            torch.manual_seed(2)
            steps("correctness", f"attention_{mode}_{tag}", lambda: check_attention(p, device, dtype, mode))
    torch.manual_seed(3)
    steps("correctness", "attention_64bit_offsets_bf16", lambda: check_attention_big_offsets(p, device))
    # bf16 weights and fp32 copies of the same values (the fp32 check and every reference use them)
    torch.manual_seed(4)
    held = {}

    def make():
        held["w16"] = moe_weights(p.moe, torch.bfloat16, device)
        held["w32"] = {k: t.float() for k, t in held["w16"].items()}
        return dict(bytes=sum(t.numel() * t.element_size() for w in held.values() for t in w.values()))

    steps("setup", "moe_check_weights", make)
    if held:
        for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            for T in p.check["moe_tokens"]:
                steps("correctness", f"moe_T{T}_{tag}", lambda: check_moe(p, device, dtype, T, held["w16"], held["w32"]))
        if device == "cuda":
            steps("correctness", "moe_no_host_sync_bf16", lambda: check_moe_no_host_sync(p, held["w16"]))
    held.clear()


