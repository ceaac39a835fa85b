"""Block-sparse GQA attention over indexer-selected key blocks: the readable spec.

Legend: B batch, Hq query heads, G KV heads (groups), S queries, T key slots, D head dim,
K selected blocks per (query, group).

Query head ``h`` belongs to group ``g = h // (Hq // G)``. Query ``s`` (position ``p``) attends to
key slot ``t`` iff ``t // block_size`` is one of ``block_idx[b, g, s, :]`` (``-1`` = empty slot)
and ``t <= p`` (token causality, which matters inside the local block)::

    out[b, h, s] = softmax_t(scale * q[b, h, s] · k[b, g, t]  over allowed t) @ v[b, g, t]

This reference builds the dense ``[B, Hq, S, T]`` mask (what transformers' eager/SDPA path
does) and is therefore quadratic in memory; ``torch_impl.py`` and the Triton kernel read only
the selected blocks.
"""

from __future__ import annotations

import torch


def block_keep_mask(block_idx_BGSK: torch.Tensor, q_pos_BS: torch.Tensor, T: int, block_size: int) -> torch.Tensor:
    """Boolean ``[B, G, S, T]`` mask: selected block and causal."""
    B, G, S, K = block_idx_BGSK.shape
    n_blocks = -(-T // block_size)
    idx = block_idx_BGSK.to(torch.int64)
    safe = idx.masked_fill(idx < 0, n_blocks)
    keep_blocks = torch.zeros(B, G, S, n_blocks + 1, dtype=torch.bool, device=idx.device)
    keep_blocks.scatter_(-1, safe, True)
    keep = keep_blocks[..., :n_blocks].repeat_interleave(block_size, dim=-1)[..., :T]
    k_pos = torch.arange(T, device=idx.device)
    causal = k_pos[None, None, None, :] <= q_pos_BS[:, None, :, None]
    return keep & causal


def block_sparse_attention_reference(
    q_BHSD: torch.Tensor,
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    block_idx_BGSK: torch.Tensor,
    q_pos_BS: torch.Tensor,
    *,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Dense-masked spec of block-sparse attention. Returns ``out_BHSD`` in ``q``'s dtype."""
    B, Hq, S, D = q_BHSD.shape
    G, T = k_BGTD.shape[1], k_BGTD.shape[2]
    rep = Hq // G
    keep = block_keep_mask(block_idx_BGSK, q_pos_BS, T, block_size).repeat_interleave(rep, dim=1)
    k = k_BGTD.repeat_interleave(rep, dim=1)
    v = v_BGTD.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q_BHSD, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q_BHSD.dtype)
    return torch.matmul(probs, v)
