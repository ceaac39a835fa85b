"""Lightning-indexer top-k block selection: the readable spec.

Legend: B batch, H indexer heads (== KV heads, one selection per GQA group), S queries,
T key slots (slot == absolute position), D indexer head dim, K top-k width, N key blocks.

For query ``s`` at position ``p = q_pos[b, s]``::

    score[b, h, s, t] = q[b, h, s] · k[b, t]            (fp32; NaN → -1e30; -inf where t > p)
    block[b, h, s, n] = max_{t in block n} score          (blocks of ``block_size`` slots)
    block[..., max(p // bs - j, 0)] = +inf  for j < local_blocks   (local block(s) forced in)
    idx = topk(block, K = min(topk, N)); idx[score == -inf] = -1

The output keeps the valid block ids ascending and left-packed, ``-1`` padding the rest: the
contract TensorRT-LLM's M3 sparse backend publishes and our attention kernels consume. The *set*
of selected blocks equals what ``transformers``' ``MiniMaxM3VLIndexer`` selects (including how
``torch.topk`` breaks score ties); only the order differs (transformers returns score order).

Non-finite inputs: a NaN score (NaN or ±inf in q or k) counts as ``-1e30`` — below every real
score, above the causal ``-inf`` — in every implementation (reference, torch, Triton kernel,
ONNX Runtime, TensorRT): one rule. transformers lets ``torch.topk`` rank NaN highest, so on such
inputs (whose attention output is NaN anyway) the selected set may differ from it; on finite
inputs nothing changes.
"""

from __future__ import annotations

import torch


def indexer_topk_reference(
    q_BHSD: torch.Tensor,
    k_BTD: torch.Tensor,
    q_pos_BS: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    local_blocks: int,
) -> torch.Tensor:
    """Select key blocks per (batch, indexer head, query). Returns ``block_idx_BHSK`` int32."""
    B, H, S, D = q_BHSD.shape
    T = k_BTD.shape[1]
    n_blocks = -(-T // block_size)
    pad = n_blocks * block_size - T

    scores = torch.matmul(q_BHSD.float(), k_BTD.float().transpose(-1, -2).unsqueeze(1))  # [B,H,S,T]
    scores = scores.masked_fill(scores.isnan(), -1e30)
    k_pos = torch.arange(T, device=q_BHSD.device)
    future = k_pos[None, None, None, :] > q_pos_BS[:, None, :, None]
    scores = scores.masked_fill(future, float("-inf"))
    if pad:
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    block_scores = scores.view(B, H, S, n_blocks, block_size).amax(dim=-1)

    if local_blocks > 0:
        q_block = q_pos_BS // block_size
        local = torch.arange(local_blocks, device=q_BHSD.device)
        local_idx = (q_block[..., None] - local.view(1, 1, -1)).clamp(min=0)
        local_idx = local_idx.unsqueeze(1).expand(-1, H, -1, -1)
        block_scores = block_scores.scatter(-1, local_idx, float("inf"))

    k = min(topk, n_blocks)
    top_scores, top_idx = block_scores.topk(k, dim=-1)
    return pack_ascending(top_idx.masked_fill(top_scores == float("-inf"), -1))


def pack_ascending(block_idx: torch.Tensor) -> torch.Tensor:
    """Sort valid ids ascending, keep ``-1`` padding at the end; returns int32."""
    big = torch.iinfo(torch.int32).max
    idx = block_idx.to(torch.int64)
    keyed = idx.masked_fill(idx < 0, big)
    keyed, _ = keyed.sort(dim=-1)
    return keyed.masked_fill(keyed == big, -1).to(torch.int32)
