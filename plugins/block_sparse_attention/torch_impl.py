"""Block-sparse GQA attention in torch that reads only the selected key blocks.

Legend: B batch, Hq query heads, G KV heads, R = Hq // G heads per group, S queries, T key slots,
D head dim, K selected blocks per (query, group), N key blocks, C queries per tile,
U blocks in a tile's union, M (query, slot) pairs that selected one block.

Queries are processed in chunks; each chunk takes one of two paths, whichever does less work:

* **union** (``U <= 2K`` in every tile of C <= 128 queries: decode, short prompts, selections
  with locality): per (batch, group) each tile takes the union of its queries' selected blocks,
  gathers those U blocks of K and V once and serves all R query heads and all C queries with two
  matmuls ``[R*C, D] x [D, U*bs]``; each query then keeps only its own blocks.
* **blocks** (some tile has ``U > 2K``: long prefills where neighbouring queries pick different
  blocks, so the union approaches all N blocks and the union path degenerates into dense
  attention): per (batch, group) and key block, the M (query, slot) pairs that picked the block
  are gathered (queries, not keys: ``R*D`` numbers each), scored against that one block with one
  matmul ``[R*M, D] x [D, bs]`` and written into a ``[R, chunk, K*bs]`` score buffer; after one
  softmax per row the same walk multiplies by each block's V and ``index_add_``s into the
  output. Work is ``K*bs`` keys per query and head, however scattered the selection is (at 4K
  tokens, block 128, top-4 with random selections: 3x faster than the union path on CPU).

Both mask ``slot <= q_pos`` (token causality: the local block, unfilled static-cache slots).
Memory per chunk is ``O(B * Hq * chunk * max(U, K) * bs)``: linear in S, never a ``[B, Hq, S, T]``
tensor. (A per-query gather of the K selected *key* blocks was measured 3-10x slower on CPU: the
copy of ``S * K * bs * D`` elements and the R-row matmuls dominate.)

Contract on ``block_idx_BGSK``: ids in ``[0, N)`` or ``-1`` (repeats count once, as in the
reference's mask). A row with no allowed key at all returns zeros; the dense reference returns
the mean of all values there. The indexer never produces such a row: every block it picks holds
a key at or before the query.
"""

from __future__ import annotations

import torch

# Score elements per tile (fp32: 64 MiB); bounds C for long caches.
_SCORE_BUDGET = 16 * 1024 * 1024


def block_sparse_attention_torch(
    q_BHSD: torch.Tensor,
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    block_idx_BGSK: torch.Tensor,
    q_pos_BS: torch.Tensor,
    *,
    block_size: int,
    scale: float,
    tile: int | None = None,
    path: str | None = None,
) -> torch.Tensor:
    """``path``: ``None`` picks per tile (see the module docstring); ``"union"`` / ``"blocks"`` force one."""
    B, Hq, S, D = q_BHSD.shape
    G, T = k_BGTD.shape[1], k_BGTD.shape[2]
    K = block_idx_BGSK.shape[-1]
    R = Hq // G
    N = -(-T // block_size)
    pad = N * block_size - T
    dev = q_BHSD.device
    k_BGNbD = torch.nn.functional.pad(k_BGTD, (0, 0, 0, pad)) if pad else k_BGTD
    v_BGNbD = torch.nn.functional.pad(v_BGTD, (0, 0, 0, pad)) if pad else v_BGTD
    k_BGNbD = k_BGNbD.reshape(B, G, N, block_size, D)
    v_BGNbD = v_BGNbD.reshape(B, G, N, block_size, D)
    q_BGRSD = q_BHSD.reshape(B, G, R, S, D)
    out_BGRSD = torch.empty(B, G, R, S, D, dtype=q_BHSD.dtype, device=dev)
    if tile is None:
        tile = max(1, min(128, _SCORE_BUDGET // max(1, B * Hq * N * block_size)))
    # The blocks path's buffer is [R, chunk, K*bs] per (batch, group): it takes longer chunks
    # (fewer Python-level block walks); the union path splits each chunk into tiles.
    chunk = max(tile, _SCORE_BUDGET // max(1, Hq * max(K, 1) * block_size))
    for c0 in range(0, S, chunk):
        c1 = min(S, c0 + chunk)
        idx = block_idx_BGSK[:, :, c0:c1].to(torch.int64)
        sel_BGCN = torch.zeros(B, G, c1 - c0, N + 1, dtype=torch.bool, device=dev)
        sel_BGCN.scatter_(-1, idx.masked_fill(idx < 0, N), True)
        sel_BGCN = sel_BGCN[..., :N]
        tiles = [(s0, min(c1, s0 + tile)) for s0 in range(c0, c1, tile)]
        unions = [sel_BGCN[:, :, s0 - c0:s1 - c0].any(dim=2) for s0, s1 in tiles]
        widths = [int(u.sum(-1).max()) for u in unions]
        if path == "union" or (path is None and max(widths) <= 2 * K):
            for (s0, s1), union_BGN, U in zip(tiles, unions, widths):
                if U == 0:
                    out_BGRSD[:, :, :, s0:s1] = 0
                    continue
                o = _union_tile(q_BGRSD[:, :, :, s0:s1], k_BGNbD, v_BGNbD, q_pos_BS[:, s0:s1], T, scale,
                                sel_BGCN[:, :, s0 - c0:s1 - c0], union_BGN, U)
                out_BGRSD[:, :, :, s0:s1] = o.to(out_BGRSD.dtype)
        else:
            o = _blocks_tile(q_BGRSD[:, :, :, c0:c1], k_BGNbD, v_BGNbD, q_pos_BS[:, c0:c1], T, scale, sel_BGCN)
            out_BGRSD[:, :, :, c0:c1] = o.to(out_BGRSD.dtype)
    return out_BGRSD.reshape(B, Hq, S, D)


def _union_tile(q_BGRCD, k_BGNbD, v_BGNbD, pos_BC, T, scale, sel_BGCN, union_BGN, U):
    B, G, R, c, D = q_BGRCD.shape
    bs = k_BGNbD.shape[3]
    dev = q_BGRCD.device
    bi = torch.arange(B, device=dev)[:, None, None]
    gi = torch.arange(G, device=dev)[None, :, None]
    # Union ids first (stable keeps them ascending), then filler ids marked invalid.
    ids_BGU = torch.argsort((~union_BGN).to(torch.int8), dim=-1, stable=True)[..., :U]
    k_sel = k_BGNbD[bi, gi, ids_BGU].reshape(B, G, U * bs, D)
    v_sel = v_BGNbD[bi, gi, ids_BGU].reshape(B, G, U * bs, D)
    mine_BGCU = sel_BGCN.gather(-1, ids_BGU[:, :, None, :].expand(B, G, c, U))
    slot = (ids_BGU[..., None] * bs + torch.arange(bs, device=dev)).reshape(B, G, 1, U * bs)
    allowed = mine_BGCU[..., None].expand(B, G, c, U, bs).reshape(B, G, c, U * bs)
    allowed = allowed & (slot <= pos_BC[:, None, :, None]) & (slot < T)
    # R and C merged into the GEMM's M dimension: a broadcast batch over R would re-read
    # the gathered blocks once per head (measured 2x slower than dense SDPA at decode).
    q_tile = q_BGRCD.reshape(B, G, R * c, D)
    scores = torch.matmul(q_tile, k_sel.transpose(-1, -2)) * scale
    scores = scores.float().view(B, G, R, c, U * bs).masked_fill_(~allowed[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0).view(B, G, R * c, U * bs)
    return torch.matmul(probs.to(v_sel.dtype), v_sel).view(B, G, R, c, D)


def _blocks_tile(q_BGRCD, k_BGNbD, v_BGNbD, pos_BC, T, scale, sel_BGCN):
    B, G, R, c, D = q_BGRCD.shape
    N, bs = k_BGNbD.shape[2], k_BGNbD.shape[3]
    dev = q_BGRCD.device
    in_block = torch.arange(bs, device=dev)
    # Deduplicated selection, re-packed as (query, slot) pairs: K' = the most blocks any query has.
    counts_BGC = sel_BGCN.sum(-1)
    Kp = int(counts_BGC.max())
    ids_BGCK = torch.argsort((~sel_BGCN).to(torch.int8), dim=-1, stable=True)[..., :Kp]
    ids_BGCK = ids_BGCK.masked_fill(torch.arange(Kp, device=dev) >= counts_BGC[..., None], N)
    out = torch.zeros(B, G, R, c, D, dtype=torch.float32, device=dev)
    for b in range(B):
        for g in range(G):
            flat = ids_BGCK[b, g].reshape(-1)  # pair m = query * Kp + slot; N marks an empty slot
            order = torch.argsort(flat, stable=True)
            per_block = torch.bincount(flat, minlength=N + 1)[:N].tolist()
            q_RCD = q_BGRCD[b, g]
            scores = torch.full((R, c * Kp, bs), float("-inf"), dtype=torch.float32, device=dev)
            walk, start = [], 0
            for n, m in enumerate(per_block):
                if m == 0:
                    continue
                pairs = order[start:start + m]
                start += m
                queries = pairs // Kp
                slot = n * bs + in_block
                s = torch.matmul(q_RCD[:, queries], k_BGNbD[b, g, n].transpose(0, 1)) * scale
                allowed = (slot[None, :] <= pos_BC[b, queries, None]) & (slot < T)[None, :]
                scores[:, pairs] = s.float().masked_fill_(~allowed, float("-inf"))
                walk.append((n, pairs, queries))
            probs = torch.softmax(scores.view(R, c, Kp * bs), dim=-1).nan_to_num_(0.0).view(R, c * Kp, bs)
            for n, pairs, queries in walk:
                o = torch.matmul(probs[:, pairs].to(v_BGNbD.dtype), v_BGNbD[b, g, n])
                out[b, g].index_add_(1, queries, o.float())
    return out
