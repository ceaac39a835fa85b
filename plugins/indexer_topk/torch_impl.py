"""Indexer top-k on CPU (or any torch device) without the full ``[S, T]`` score matrix.

Legend: B batch, H indexer heads, S queries, T key slots, D head dim, K top-k, N key blocks.

Queries are processed in chunks; per chunk only the key blocks up to the chunk's last position
are scored (causality makes later blocks ``-inf`` anyway), so peak memory is
``B * H * chunk * min(T, p_max + 1)`` fp32 scores instead of ``B * H * S * T``. Per row the
arithmetic is the reference's (fp32 matmul, max-pool, ``+inf`` local boost, ``torch.topk``), so
the selected sets match it; ties between exactly equal finite block scores are broken by
``torch.topk`` over a shorter row and could in principle differ (never seen with real-valued
inputs).
"""

from __future__ import annotations

import torch

from .reference import pack_ascending

# fp32 elements of one chunk's score tile (64 MiB); keeps the chunk big enough for good GEMMs.
_SCORE_BUDGET = 16 * 1024 * 1024


def indexer_topk_torch(
    q_BHSD: torch.Tensor,
    k_BTD: torch.Tensor,
    q_pos_BS: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    local_blocks: int,
    chunk: int | None = None,
) -> torch.Tensor:
    B, H, S, D = q_BHSD.shape
    T = k_BTD.shape[1]
    n_blocks = -(-T // block_size)
    width = min(topk, n_blocks)
    out = torch.full((B, H, S, width), -1, dtype=torch.int32, device=q_BHSD.device)
    if S == 0:
        return out
    if chunk is None:
        # Small chunks also skip more of the causal upper triangle (blocks past the chunk end).
        chunk = max(1, min(256, _SCORE_BUDGET // max(1, B * H * T)))
    k_f = k_BTD.float()
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        pos = q_pos_BS[:, s0:s1]
        # Blocks past the chunk's furthest position are all -inf: never score them.
        n_live = min(n_blocks, int(pos.max().item()) // block_size + 1)
        t_live = min(T, n_live * block_size)
        scores = torch.matmul(q_BHSD[:, :, s0:s1].float(), k_f[:, None, :t_live].transpose(-1, -2))
        scores.masked_fill_(scores.isnan(), -1e30)  # the reference's NaN rule
        future = torch.arange(t_live, device=scores.device)[None, None, None, :] > pos[:, None, :, None]
        scores.masked_fill_(future, float("-inf"))
        pad = n_live * block_size - t_live
        if pad:
            scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
        block_scores = scores.view(B, H, s1 - s0, n_live, block_size).amax(dim=-1)
        del scores
        if local_blocks > 0:
            local = torch.arange(local_blocks, device=pos.device)
            local_idx = ((pos // block_size)[..., None] - local).clamp(min=0)
            block_scores.scatter_(-1, local_idx.unsqueeze(1).expand(-1, H, -1, -1), float("inf"))
        k = min(width, n_live)
        top_scores, top_idx = block_scores.topk(k, dim=-1)
        out[:, :, s0:s1, :k] = pack_ascending(top_idx.masked_fill(top_scores == float("-inf"), -1))
    return out
