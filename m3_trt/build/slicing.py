"""A rank's slice of a parameter as index ranges per dimension, so it can be cut chunk by chunk.

:func:`m3_trt.model.shard.shard_tensor` cuts a whole tensor. The streaming rank-weight writer
reads a parameter in chunks of dim-0 rows (whole experts of an expert stack), so it needs the same
slice as data: :func:`selection` gives, per dimension, the ordered list of ``[start, stop)`` ranges
whose concatenation ``shard_tensor`` keeps (every rule of :data:`m3_trt.model.shard.RULES` keeps
an ordered union of ranges per dimension, independently across dimensions). The rank's slice of
rows ``[a, b)`` is then :func:`take` of that chunk; chunks taken in row order and concatenated
give ``shard_tensor``'s bytes. :func:`check_selection` compares the shape with ``shard_tensor``'s
on ``meta`` for every parameter a build writes, so the two tables cannot drift apart silently
(and ``tests/engines/test_tensor_stream.py`` compares the values).

FP8 scale grids are cut with the same ranges mapped onto blocks (:func:`block_ranges`): a range
whose ends are multiples of the block keeps whole blocks; one that cuts a block makes the rank's
grid finer — blocks of ``g = gcd(block, every range end)`` rows/cols, each repeating the scale of
the checkpoint block it lies in (``g`` divides the block, so every new block lies inside one old
block and the dequantized values stay the checkpoint's).
"""

from __future__ import annotations

import math

import torch

from m3_trt.model.config import TextConfig
from m3_trt.model.shard import Layout, local_experts, local_heads, rule_for, shard_tensor

Ranges = list[tuple[int, int]]


def _merge(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for s, t in ranges:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], t)
        else:
            out.append((s, t))
    return out


def _halves(n: int, part: int, nparts: int) -> Ranges:
    h = n // 2
    k = h // nparts
    return _merge([(part * k, part * k + k), (h + part * k, h + part * k + k)])


def _cols(n: int, part: int, nparts: int) -> Ranges:
    k = n // nparts
    return [(part * k, part * k + k)]


def selection(name: str, shape: tuple[int, ...], cfg: TextConfig, lay: Layout, r: int) -> list[Ranges]:
    """Per dimension of parameter ``name`` (``shape``), the ranges rank ``r`` keeps (shard.py's rules)."""
    sel: list[Ranges] = [[(0, n)] for n in shape]
    rule = rule_for(name)
    if rule == "replicated":
        return sel
    q, kv = local_heads(cfg, lay, r)
    D = cfg.head_dim
    if rule == "q_rows":
        sel[0] = [(q.start * D, q.stop * D)]
    elif rule == "kv_rows":
        sel[0] = [(kv.start * D, kv.stop * D)]
    elif rule == "q_cols":
        sel[1] = [(q.start * D, q.stop * D)]
    elif rule == "index_rows":
        sel[0] = [(kv.start * cfg.index_head_dim, kv.stop * cfg.index_head_dim)]
    elif rule == "tp_halves":
        sel[0] = _halves(shape[0], lay.tp_rank(r), lay.tp)
    elif rule == "tp_cols":
        sel[-1] = _cols(shape[-1], lay.tp_rank(r), lay.tp)
    elif rule in ("expert_halves", "expert_cols"):
        ex = local_experts(cfg, lay, r)
        sel[0] = [(ex.start, ex.stop)]
        if rule == "expert_halves":
            sel[1] = _halves(shape[1], lay.moe_tp_rank(r), lay.moe_tp)
        else:
            sel[2] = _cols(shape[2], lay.moe_tp_rank(r), lay.moe_tp)
    else:
        raise ValueError(f"{name}: sharding rule {rule!r} has no range form")
    return sel


def check_selection(name: str, meta: torch.Tensor, sel: list[Ranges], cfg: TextConfig, lay: Layout, r: int) -> None:
    """Raise when ``sel`` does not have ``shard_tensor``'s shape for this parameter and rank."""
    want = tuple(shard_tensor(name, meta, cfg, lay, r).shape)
    got = tuple(sum(t - s for s, t in rs) for rs in sel)
    if got != want:
        raise RuntimeError(f"{name}: rank {r}'s range selection has shape {got}, shard_tensor gives {want}")


def rows_in(ranges: Ranges, a: int, b: int) -> Ranges:
    """``ranges`` cut to rows ``[a, b)`` and shifted to start at ``a``."""
    return [(max(s, a) - a, min(t, b) - a) for s, t in ranges if min(t, b) > max(s, a)]


def gather(x: torch.Tensor, dim: int, ranges: Ranges) -> torch.Tensor:
    """The concatenation of ``x``'s ``ranges`` along ``dim`` (a view when it is one range)."""
    if len(ranges) == 1:
        s, t = ranges[0]
        return x if (s, t) == (0, x.shape[dim]) else x.narrow(dim, s, t - s)
    return torch.cat([x.narrow(dim, s, t - s) for s, t in ranges], dim=dim)


def take(x: torch.Tensor, sel: list[Ranges], a: int, b: int) -> torch.Tensor | None:
    """The rank's part of chunk ``x`` (rows ``[a, b)`` of the parameter); None when it has no row there."""
    if x.dim() == 0:
        return x
    rows = rows_in(sel[0], a, b)
    if not rows:
        return None
    x = gather(x, 0, rows)
    for d in range(1, x.dim()):
        x = gather(x, d, sel[d])
    return x


def block_ranges(ranges: Ranges, block: int) -> tuple[Ranges, int]:
    """``ranges`` (element units) as ranges of a scale grid with ``block`` elements per entry, and
    the block the slice gets: ``block`` when every end is a multiple of it, else the finer
    ``g = gcd(block, ends)`` with each of its blocks repeating its parent's scale (one-entry ranges)."""
    g = block
    for s, t in ranges:
        g = math.gcd(g, s, t)
    if g == block:
        return _merge([(s // block, t // block) for s, t in ranges]), block
    return [(j // block, j // block + 1) for s, t in ranges for j in range(s, t, g)], g


def take_scales(grid: torch.Tensor, sel: list[Ranges], a: int, b: int, block: tuple[int, int]
                ) -> tuple[torch.Tensor | None, tuple[int, int]]:
    """The rank's part of a scale-grid chunk (``[..., R/br, C/bc]`` for rows ``[a, b)``: experts of a
    3-D stack, or the whole 2-D grid) and the rank's block ``(rows, cols)``."""
    lead = grid.dim() - 2
    if lead:
        rows = rows_in(sel[0], a, b)
        if not rows:
            return None, block
        grid = gather(grid, 0, rows)
    out_block = []
    for d, blk in zip((lead, lead + 1), block):
        rs, g = block_ranges(sel[d], blk)
        grid = gather(grid, d, rs) if len(rs) < 64 else grid.index_select(
            d, torch.cat([torch.arange(s, t) for s, t in rs]))
        out_block.append(g)
    return grid, (out_block[0], out_block[1])
