"""Triton kernel for the indexer top-k: scoring, causal mask, block max-pool, local boost, top-k.

Legend: B batch, H indexer heads, S queries, T key slots, D head dim, K top-k width, N blocks.

One program per (tile of ``BLOCK_M`` queries, batch x head). It walks the key blocks up to the
tile's furthest position, computes the ``[BLOCK_M, block_size]`` score tile with one ``tl.dot``,
masks future slots, max-pools it to one score per block and keeps the ``[BLOCK_M, N]`` block
scores in registers, so the ``[S, T]`` score matrix never reaches memory. The local blocks get
``+inf``; the top-k is K rounds of row-max with the lowest block id winning exact ties (the
reference's ``torch.topk`` gives no tie order guarantee: with real-valued scores exact ties only
happen between ``+inf`` local blocks, i.e. when ``local_blocks > topk``). Selected blocks are
written ascending and left-packed through an exclusive prefix sum, ``-1`` after them.

Registers grow with ``BLOCK_M * next_pow2(N)``; the launcher shrinks ``BLOCK_M`` for long caches.
A NaN score (a NaN or inf in q or k) becomes ``-1e30``: below every real score, above the
``-inf`` of masked slots, so it can never win a block over real keys nor poison the top-k's
row max (``tl.max`` over a NaN is undefined across backends). Program ids are cast to int64
before they multiply a stride (``b * stride`` overflows int32 for long, batched prefills).
Import this module only when the Triton path is asked for: ``TRITON_INTERPRET`` is read when
``@triton.jit`` runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import interpreting


@triton.jit
def _indexer_topk_kernel(
    q_ptr, k_ptr, pos_ptr, out_ptr,
    S, T, N, H,
    sqb, sqh, sqs, sqd,
    skb, skt, skd,
    spb, sps,
    sob, soh, sos, sok,
    BLOCK_SIZE: tl.constexpr, BS_P2: tl.constexpr,
    D: tl.constexpr, D_P2: tl.constexpr,
    N_P2: tl.constexpr, K: tl.constexpr, K_P2: tl.constexpr, LOCAL: tl.constexpr,
    BLOCK_M: tl.constexpr, CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    # int64 before any stride product (b * sqb, offs_m * sqs): 64-bit offsets for long batched prefills.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < S
    offs_d = tl.arange(0, D_P2)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if CAST_FP32:
        q = q.to(tl.float32)
    pos = tl.load(pos_ptr + b * spb + offs_m * sps, mask=m_ok, other=0).to(tl.int64)
    n_hi = tl.minimum(tl.max(pos, axis=0) // BLOCK_SIZE + 1, N)

    cols = tl.arange(0, N_P2)
    offs_t = tl.arange(0, BS_P2)
    bscore = tl.full([BLOCK_M, N_P2], float("-inf"), tl.float32)
    for n in range(0, n_hi):
        t = n * BLOCK_SIZE + offs_t
        t_ok = (offs_t < BLOCK_SIZE) & (t < T)
        kb = tl.load(k_ptr + b * skb + t[:, None] * skt + offs_d[None, :] * skd,
                     mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        if CAST_FP32:
            kb = kb.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(kb), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kb))
        s = tl.where(s != s, -1e30, s)  # NaN -> -1e30 (see the module docstring)
        allowed = t_ok[None, :] & (t[None, :] <= pos[:, None])
        s = tl.where(allowed, s, float("-inf"))
        bmax = tl.max(s, axis=1)
        bscore = tl.where(cols[None, :] == n, bmax[:, None], bscore)

    qblk = pos // BLOCK_SIZE
    for j in tl.static_range(LOCAL):
        lb = tl.maximum(qblk - j, 0)
        bscore = tl.where(cols[None, :] == lb[:, None], float("inf"), bscore)

    sel = tl.zeros([BLOCK_M, N_P2], tl.int32)
    for i in tl.static_range(K):
        mval = tl.max(bscore, axis=1)
        pick = tl.min(tl.where(bscore == mval[:, None], cols[None, :], N_P2), axis=1)
        hit = (cols[None, :] == pick[:, None]) & (mval > float("-inf"))[:, None]
        sel = tl.where(hit, 1, sel)
        bscore = tl.where(hit, float("-inf"), bscore)

    slot = tl.cumsum(sel, axis=1) - sel
    count = tl.sum(sel, axis=1)
    row = out_ptr + b * sob + h * soh + offs_m * sos
    tl.store(row[:, None] + slot * sok, cols[None, :].to(tl.int32), mask=(sel == 1) & m_ok[:, None])
    offs_k = tl.arange(0, K_P2)
    pad = (offs_k[None, :] >= count[:, None]) & (offs_k[None, :] < K) & m_ok[:, None]
    tl.store(row[:, None] + offs_k[None, :] * sok, tl.full([BLOCK_M, K_P2], -1, tl.int32), mask=pad)


def indexer_topk_triton(
    q_BHSD: torch.Tensor,
    k_BTD: torch.Tensor,
    q_pos_BS: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    local_blocks: int,
    block_m: int | None = None,
) -> torch.Tensor:
    B, H, S, D = q_BHSD.shape
    T = k_BTD.shape[1]
    N = -(-T // block_size)
    K = min(topk, N)
    out = torch.empty((B, H, S, K), dtype=torch.int32, device=q_BHSD.device)
    if S == 0 or B == 0:
        return out
    interp = interpreting()
    n_p2 = triton.next_power_of_2(N)
    if block_m is None:
        # Interpreter cost is per program: big tiles. On GPU keep BLOCK_M * N_P2 in registers.
        block_m = 64 if interp else max(16, min(64, 8192 // n_p2))
    pos = q_pos_BS.to(torch.int64)
    grid = (triton.cdiv(S, block_m), B * H)
    _indexer_topk_kernel[grid](
        q_BHSD, k_BTD, pos, out,
        S, T, N, H,
        *q_BHSD.stride(), *k_BTD.stride(), *pos.stride(), *out.stride(),
        BLOCK_SIZE=block_size, BS_P2=max(16, triton.next_power_of_2(block_size)),
        D=D, D_P2=max(16, triton.next_power_of_2(D)),
        N_P2=n_p2, K=K, K_P2=triton.next_power_of_2(K), LOCAL=local_blocks,
        BLOCK_M=block_m, CAST_FP32=interp or q_BHSD.dtype == torch.float32,
        IEEE=q_BHSD.dtype == torch.float32,
    )
    return out
