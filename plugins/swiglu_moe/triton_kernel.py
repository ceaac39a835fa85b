"""Triton kernels for the SwiGLU-OAI MoE: grouped GEMMs over expert-sorted tokens.

Legend: T tokens, D hidden, E experts, F intermediate, K experts per token, M = T * K routed
(token, slot) pairs, BM rows per tile, P = padded pair count (each expert's pairs rounded up to BM).

Flow: routing in torch (the reference's ``route``); ``align_by_expert`` sorts the pairs by expert
and pads every expert's run to a multiple of BM (vLLM's ``moe_align_block_size`` idea), so each
row tile belongs to exactly one expert and empty experts own no tile. It runs on the device
without a host sync (no ``.item()``, no ``bincount`` or ``repeat_interleave`` that size their
output from data, as CUDA graphs and TensorRT enqueue need): the tile count is the static bound
``cdiv(M, BM) + min(E, M)`` and the tiles past the real ones get expert id ``E``, for which the
kernels run an empty K loop and store nothing. Then

1. ``_gate_up_kernel``, grid ``(P / BM, F / BN)``: gathers the tile's token rows of ``x``
   straight from ``x_TD`` (no permuted copy), computes the gate and up halves of
   ``x @ w13[e].T`` side by side and applies SwiGLU-OAI (clamps, alpha, ``up + 1``) in the
   epilogue, writing ``h_PF``;
2. ``_down_kernel``, grid ``(P / BM, D / BN)``: ``h @ w2[e].T`` times the pair's routing weight,
   stored at the pair's own slot of ``y_MD`` (a scatter by pair id, deterministic);
3. torch sums ``y`` over the K slots and applies ``routed_scaling``.

The shared expert is the same two kernels with one expert, every token routed to it, weight 1.
Row offsets are int64 (``rows * stride`` of ``h_PF`` passes int32 at ~700K routed pairs).
In the interpreter every dot runs in fp32 (bf16 ``tl.dot`` is wrong there); on GPU fp32 inputs
use IEEE dots. One config per launch (autotune with several configs fails in the interpreter).
Import lazily: ``TRITON_INTERPRET`` is read when ``@triton.jit`` runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import interpreting
from .reference import route


@triton.jit
def _gate_up_kernel(
    x_ptr, w13_ptr, ids_ptr, tile_e_ptr, h_ptr,
    M, F, Dm, K_TOP, E, alpha, limit,
    sxt, sxd, swe, swf, swd, shp, shf,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    # int32 row ids across the K loop: int64 rows there spill (132 bytes in an sm_90 build, against
    # 4); the store below widens them, the only product (rows * shp) that can pass 2^31.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_e_ptr + pid_m).to(tl.int64)
    # Tiles past the real ones (expert id E) hold only sentinel rows: no K loop, nothing stored.
    k_end = tl.where(e < E, Dm, 0)
    e = tl.minimum(e, E - 1)
    rows = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(ids_ptr + rows)
    row_ok = pair < M
    tok = (pair // K_TOP).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < F
    offs_k = tl.arange(0, BK)
    acc_g = tl.zeros([BM, BN], tl.float32)
    acc_u = tl.zeros([BM, BN], tl.float32)
    w_base = w13_ptr + e * swe
    for k0 in range(0, k_end, BK):
        kk = k0 + offs_k
        k_ok = kk < Dm
        xt = tl.load(x_ptr + tok[:, None] * sxt + kk[None, :] * sxd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(w_base + offs_n[None, :] * swf + kk[:, None] * swd, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        wu = tl.load(w_base + (offs_n[None, :] + F) * swf + kk[:, None] * swd, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if CAST_FP32:
            xt = xt.to(tl.float32)
            wg = wg.to(tl.float32)
            wu = wu.to(tl.float32)
        if IEEE:
            acc_g += tl.dot(xt, wg, input_precision="ieee")
            acc_u += tl.dot(xt, wu, input_precision="ieee")
        else:
            acc_g += tl.dot(xt, wg)
            acc_u += tl.dot(xt, wu)
    # The reference rounds the GEMM output to the input dtype before the activation.
    gate = acc_g.to(h_ptr.dtype.element_ty).to(tl.float32)
    up = acc_u.to(h_ptr.dtype.element_ty).to(tl.float32)
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    h = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * shp + offs_n[None, :] * shf, h.to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w2_ptr, ids_ptr, tile_e_ptr, wt_ptr, y_ptr,
    M, F, Dm, E,
    shp, shf, swe, swd, swf, sym, syd,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    e = tl.load(tile_e_ptr + pid_m).to(tl.int64)
    k_end = tl.where(e < E, F, 0)  # padding tile past the real ones: empty loop
    e = tl.minimum(e, E - 1)
    rows = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(ids_ptr + rows)
    row_ok = pair < M
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < Dm
    offs_k = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    w_base = w2_ptr + e * swe
    for k0 in range(0, k_end, BK):
        kk = k0 + offs_k
        k_ok = kk < F
        ht = tl.load(h_ptr + rows[:, None] * shp + kk[None, :] * shf, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_base + offs_n[None, :] * swd + kk[:, None] * swf, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if CAST_FP32:
            ht = ht.to(tl.float32)
            wt = wt.to(tl.float32)
        if IEEE:
            acc += tl.dot(ht, wt, input_precision="ieee")
        else:
            acc += tl.dot(ht, wt)
    acc = acc.to(h_ptr.dtype.element_ty).to(tl.float32)
    gate_w = tl.load(wt_ptr + pair, mask=row_ok, other=0.0)
    tl.store(y_ptr + pair.to(tl.int64)[:, None] * sym + offs_n[None, :] * syd, acc * gate_w[:, None],
             mask=row_ok[:, None] & n_ok[None, :])


def tile_bound(n_pairs: int, n_experts: int, block_m: int) -> int:
    """Static upper bound on the row tiles ``align_by_expert`` fills: every non-empty expert
    (at most ``min(E, M)`` of them) wastes less than one tile to padding."""
    return triton.cdiv(n_pairs, block_m) + min(n_experts, n_pairs)


def align_by_expert(experts_TK: torch.Tensor, n_experts: int, block_m: int):
    """Returns ``(sorted_ids_P int32, tile_expert int32)``: pair ids grouped by expert, each run
    padded with the sentinel ``M`` to a multiple of ``block_m``; the expert of every row tile,
    ``n_experts`` for the tiles past the real ones. ``P = tile_bound(M, E, block_m) * block_m``
    is known on the host, so nothing here waits for the device."""
    flat = experts_TK.reshape(-1)
    M = flat.numel()
    order = torch.argsort(flat, stable=True)
    # scatter_add_, not bincount: CUDA bincount reads the max id back to size its output.
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    start = torch.cumsum(counts, 0) - counts
    e_sorted = flat[order]
    dest = pad_start[e_sorted] + torch.arange(M, device=flat.device) - start[e_sorted]
    n_tiles = tile_bound(M, n_experts, block_m)
    sorted_ids = torch.full((n_tiles * block_m,), M, dtype=torch.int32, device=flat.device)
    sorted_ids[dest] = order.to(torch.int32)
    tile_start = torch.arange(n_tiles, device=flat.device, dtype=torch.int64) * block_m
    tile_expert = torch.searchsorted(pad_end, tile_start, right=True).to(torch.int32)
    return sorted_ids, tile_expert


def grouped_swiglu_mlp(x_TD, w13_EFD, w2_EDF, weights_TK, experts_TK, *, alpha, limit, block_m=None):
    """``y_TKD`` fp32: per (token, slot) ``weight * swiglu(x @ w13[e].T) @ w2[e].T``."""
    T, Dm = x_TD.shape
    E, F2, _ = w13_EFD.shape
    F = F2 // 2
    K = experts_TK.shape[1]
    M = T * K
    interp = interpreting()
    if block_m is None:
        block_m = 16 if (M <= 64 or interp) else 64
    bn, bk = (64, 64) if not interp else (max(16, min(128, triton.next_power_of_2(max(F, Dm)))), 128)
    sorted_ids, tile_expert = align_by_expert(experts_TK, E, block_m)
    P = sorted_ids.numel()
    h_PF = torch.empty((P, F), dtype=x_TD.dtype, device=x_TD.device)
    y_MD = torch.zeros((M, Dm), dtype=torch.float32, device=x_TD.device)
    if M == 0:
        return y_MD.view(T, K, Dm)
    w_M = weights_TK.reshape(-1).to(torch.float32).contiguous()
    flags = dict(CAST_FP32=interp or x_TD.dtype == torch.float32, IEEE=x_TD.dtype == torch.float32)
    _gate_up_kernel[(P // block_m, triton.cdiv(F, bn))](
        x_TD, w13_EFD, sorted_ids, tile_expert, h_PF,
        M, F, Dm, K, E, float(alpha), float(limit),
        *x_TD.stride(), *w13_EFD.stride(), *h_PF.stride(),
        BM=block_m, BN=bn, BK=bk, **flags,
    )
    _down_kernel[(P // block_m, triton.cdiv(Dm, bn))](
        h_PF, w2_EDF, sorted_ids, tile_expert, w_M, y_MD,
        M, F, Dm, E,
        *h_PF.stride(), *w2_EDF.stride(), *y_MD.stride(),
        BM=block_m, BN=bn, BK=bk, **flags,
    )
    return y_MD.view(T, K, Dm)


def swiglu_moe_triton(
    x_TD: torch.Tensor,
    router_w_ED: torch.Tensor,
    e_bias_E: torch.Tensor,
    w13_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w13s_FD: torch.Tensor | None,
    w2s_DF: torch.Tensor | None,
    *,
    top_k: int,
    routed_scaling: float,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    weights_TK, experts_TK = route(x_TD, router_w_ED, e_bias_E, top_k)
    y_TKD = grouped_swiglu_mlp(x_TD, w13_EFD, w2_EDF, weights_TK, experts_TK, alpha=alpha, limit=limit)
    out = y_TKD.sum(dim=1).to(x_TD.dtype) * routed_scaling
    if w13s_FD is not None:
        out = out + shared_expert(x_TD, w13s_FD, w2s_DF, alpha=alpha, limit=limit)
    return out


def shared_expert(x_TD: torch.Tensor, w13s_FD: torch.Tensor, w2s_DF: torch.Tensor, *, alpha: float,
                  limit: float) -> torch.Tensor:
    """The shared expert through the same grouped GEMMs: one expert every token picks with weight 1."""
    T = x_TD.shape[0]
    ones_T1 = torch.ones((T, 1), dtype=torch.float32, device=x_TD.device)
    zeros_T1 = torch.zeros((T, 1), dtype=torch.int64, device=x_TD.device)
    y_T1D = grouped_swiglu_mlp(x_TD, w13s_FD[None], w2s_DF[None], ones_T1, zeros_T1, alpha=alpha, limit=limit)
    return y_T1D[:, 0].to(x_TD.dtype)
