"""Triton kernel for block-sparse GQA attention (prefill and split-K decode).

Legend: B batch, Hq query heads, G KV heads, R = Hq // G, S queries, T key slots, D head dim,
K selected blocks per (query, group), P split count.

Grid ``(S, B * G, P)``: one program per (query, KV group, split). Its tile is the R query heads
of the group (rows padded to ``max(16, next_pow2(R))`` for ``tl.dot``), so each selected KV
block is loaded once for the whole GQA group. The program walks its share of the row's
``block_idx`` entries (skipping ``-1`` and adjacent repeats), masks token causality and the cache
end inside each block, and keeps an online softmax (running max, running sum, fp32 accumulator).
With ``P == 1`` it normalises and stores ``out``; with ``P > 1`` (decode: few queries, a long
row of blocks) it stores partial ``(acc, max, sum)`` that ``_combine_splits`` merges.

A branch-free walk over the valid prefix (holes and repeats masked instead of skipped) was tried
to let Triton pipeline the loads: it passed every interpreter test, but its sm_90 build (Triton
3.8, 4 warps, bf16) spills 248 bytes against 56 for this form, both at 255 registers. Without a
GPU to time the two, the branch stays (see the DESIGN kernel notes).

Offsets are 64-bit: program ids are cast to int64 before they multiply a stride, because
``b * stride`` overflows int32 in prefill (q ``[B, 64, S, 128]``: batch stride ``2^29`` at 64K, so
``b >= 4``; B >= 3 at 128K).

A query tile of several queries would need the union of their block lists; the one-query tile
keeps every loaded block useful and is the layout vLLM / SGLang use for this operator.
Rows with no allowed key return zeros (see ``torch_impl``). In the interpreter all dots run in
fp32 (bf16 ``tl.dot`` is wrong there); on GPU fp32 inputs use IEEE dots, bf16/fp16 native ones.
Import lazily: ``TRITON_INTERPRET`` is read when ``@triton.jit`` runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import interpreting


@triton.jit
def _bsa_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, pos_ptr, o_ptr, acc_ptr, ml_ptr,
    S, T, G, K, per_split, scale,
    sqb, sqh, sqs, sqd,
    skb, skg, skt, skd,
    svb, svg, svt, svd,
    sib, sig, sis, sik,
    spb, sps,
    sob, soh, sos, sod,
    R: tl.constexpr, R_P2: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BS_P2: tl.constexpr,
    CAST_FP32: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
):
    # int64 before any stride product: b * sqb passes 2^31 at B >= 5 for 64K prefill.
    s = tl.program_id(0).to(tl.int64)
    bg = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    b = bg // G
    g = bg % G
    offs_r = tl.arange(0, R_P2)
    r_ok = offs_r < R
    heads = g * R + offs_r
    offs_d = tl.arange(0, D_P2)
    d_ok = offs_d < D
    offs_t = tl.arange(0, BS_P2)
    q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + s * sqs + offs_d[None, :] * sqd,
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if CAST_FP32:
        q = q.to(tl.float32)
    p = tl.load(pos_ptr + b * spb + s * sps).to(tl.int64)
    idx_row = idx_ptr + b * sib + g * sig + s * sis

    m_i = tl.full([R_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([R_P2], tl.float32)
    acc = tl.zeros([R_P2, D_P2], tl.float32)
    k_lo = sp * per_split
    k_hi = tl.minimum(k_lo + per_split, K)
    prev = tl.load(idx_row + (k_lo - 1) * sik, mask=k_lo > 0, other=-1).to(tl.int64)
    for kk in range(k_lo, k_hi):
        n = tl.load(idx_row + kk * sik).to(tl.int64)
        if (n >= 0) & (n != prev):
            t = n * BLOCK_SIZE + offs_t
            t_in = (offs_t < BLOCK_SIZE) & (t < T)
            kb = tl.load(k_ptr + b * skb + g * skg + t[:, None] * skt + offs_d[None, :] * skd,
                         mask=t_in[:, None] & d_ok[None, :], other=0.0)
            vb = tl.load(v_ptr + b * svb + g * svg + t[:, None] * svt + offs_d[None, :] * svd,
                         mask=t_in[:, None] & d_ok[None, :], other=0.0)
            if CAST_FP32:
                kb = kb.to(tl.float32)
                vb = vb.to(tl.float32)
            if IEEE:
                qk = tl.dot(q, tl.trans(kb), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(kb))
            qk = tl.where((t_in & (t <= p))[None, :], qk * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            # A row whose keys so far are all masked keeps max -inf: shift by 0 to avoid nan.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            pexp = tl.exp(qk - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(pexp, axis=1)
            if IEEE:
                pv = tl.dot(pexp, vb, input_precision="ieee")
            else:
                pv = tl.dot(pexp.to(vb.dtype), vb)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        prev = n

    if SPLIT:
        # Partials in [P, B, Hq, S, D] (acc) and [2, P, B, Hq, S] (max, sum), contiguous.
        n_batch = tl.num_programs(1) // G
        row = ((sp * n_batch + b) * (G * R) + heads) * S + s
        tl.store(acc_ptr + row[:, None] * D + offs_d[None, :], acc, mask=r_ok[:, None] & d_ok[None, :])
        n_rows = (tl.num_programs(2) * n_batch).to(tl.int64) * (G * R) * S
        tl.store(ml_ptr + row, m_i, mask=r_ok)
        tl.store(ml_ptr + n_rows + row, l_i, mask=r_ok)
    else:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + b * sob + heads[:, None] * soh + s * sos + offs_d[None, :] * sod,
                 o.to(o_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


def _combine_splits(acc_PBHSD: torch.Tensor, ml_2PBHS: torch.Tensor) -> torch.Tensor:
    m_PBHS, l_PBHS = ml_2PBHS[0], ml_2PBHS[1]
    m_max = m_PBHS.amax(dim=0, keepdim=True)
    w = torch.exp(m_PBHS - torch.where(m_max == float("-inf"), 0.0, m_max))
    w = torch.where(m_PBHS == float("-inf"), 0.0, w)
    num = (w[..., None] * acc_PBHSD).sum(dim=0)
    den = (w * l_PBHS).sum(dim=0)
    return num / torch.where(den > 0, den, 1.0)[..., None]


def block_sparse_attention_triton(
    q_BHSD: torch.Tensor,
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    block_idx_BGSK: torch.Tensor,
    q_pos_BS: torch.Tensor,
    *,
    block_size: int,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    B, Hq, S, D = q_BHSD.shape
    G, T = k_BGTD.shape[1], k_BGTD.shape[2]
    K = block_idx_BGSK.shape[-1]
    R = Hq // G
    out = torch.empty_like(q_BHSD)
    if B == 0 or S == 0:
        return out
    interp = interpreting()
    if num_splits is None:
        # Split the block row only when (query, group) programs alone cannot fill the machine.
        if q_BHSD.is_cuda:
            target = 2 * torch.cuda.get_device_properties(q_BHSD.device).multi_processor_count
        else:
            target = 8
        num_splits = max(1, min(K, target // max(1, S * B * G)))
    num_splits = max(1, min(num_splits, K)) if K > 0 else 1
    per_split = -(-K // num_splits) if K > 0 else 0
    num_splits = -(-K // per_split) if K > 0 else 1
    split = num_splits > 1
    f32 = dict(dtype=torch.float32, device=q_BHSD.device)
    acc = torch.empty((num_splits, B, Hq, S, D), **f32) if split else out
    ml = torch.empty((2, num_splits, B, Hq, S), **f32) if split else out
    pos = q_pos_BS.to(torch.int64)
    _bsa_kernel[(S, B * G, num_splits)](
        q_BHSD, k_BGTD, v_BGTD, block_idx_BGSK, pos, out, acc, ml,
        S, T, G, K, per_split, float(scale),
        *q_BHSD.stride(), *k_BGTD.stride(), *v_BGTD.stride(), *block_idx_BGSK.stride(),
        *pos.stride(), *out.stride(),
        R=R, R_P2=max(16, triton.next_power_of_2(R)), D=D, D_P2=max(16, triton.next_power_of_2(D)),
        BLOCK_SIZE=block_size, BS_P2=max(16, triton.next_power_of_2(block_size)),
        CAST_FP32=interp or q_BHSD.dtype == torch.float32, IEEE=q_BHSD.dtype == torch.float32,
        SPLIT=split,
    )
    if split:
        out.copy_(_combine_splits(acc, ml).to(out.dtype))
    return out
