"""Indexer top-k: torch_impl and the Triton kernel select exactly the reference's block sets.

Verdict per row: the same set of block ids. The one allowance is a numerical tie: two block
scores closer than ``NEAR_TIE`` (float64 judge) may be ordered differently by fp32 sums taken in
another order (chunked GEMM, the interpreter's numpy dot); such a row passes only if every
swapped block is within the tie margin of the row's weakest selected block.
"""

from __future__ import annotations

import pytest
import torch
from plugin_helpers import TRITON_DEVICE, fresh_seed, needs_triton

from m3_trt.plugins.indexer_topk import indexer_topk
from m3_trt.plugins.indexer_topk.reference import pack_ascending

# (B, H, S, T, D, block, topk, local, first query position per batch row)
CASES = {
    "B2-S300-H2-T300-blk16-top4-loc1-prefill": (2, 2, 300, 300, 32, 16, 4, 1, (0, 0)),
    "B2-S60-H2-T200-blk16-top4-loc2-chunked": (2, 2, 60, 200, 32, 16, 4, 2, (40, 100)),
    "B1-S5-H2-T5-blk16-top4-loc1-shorter-than-block": (1, 2, 5, 5, 32, 16, 4, 1, (0,)),
    "B1-S40-H1-T40-blk16-top8-loc1-topk-ge-blocks": (1, 1, 40, 40, 16, 16, 8, 1, (0,)),
    "B2-S1-H2-T256-blk16-top4-loc2-decode": (2, 2, 1, 256, 32, 16, 4, 2, (150, 17)),
    "B1-S50-H2-T70-blk16-top3-loc0-nolocal": (1, 2, 50, 70, 32, 16, 3, 0, (10,)),
}
# The interpreter pays per program and step: the Triton kernel gets the cases that stay small.
TRITON_CASES = [k for k in CASES if "S300" not in k]


def _inputs(case, device="cpu"):
    B, H, S, T, D, bs, topk, local, starts = CASES[case]
    q = torch.randn(B, H, S, D, device=device)
    k = torch.randn(B, T, D, device=device)
    pos = torch.stack([torch.arange(S) + s0 for s0 in starts]).to(device)
    return (q, k, pos), dict(block_size=bs, topk=topk, local_blocks=local)


def _check_contract(idx, n_blocks):
    assert idx.dtype == torch.int32
    valid = idx >= 0
    assert (idx < n_blocks).all()
    # left-packed: no valid entry after a -1; ascending: strictly increasing valid ids
    assert not (valid[..., 1:] & ~valid[..., :-1]).any()
    assert ((idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]).all()


def _block_scores64(q, k, pos, block_size, local_blocks):
    """The reference's block scores in float64 (the judge of near-ties), ``[B, H, S, N]``."""
    T = k.shape[1]
    N = -(-T // block_size)
    s = torch.matmul(q.double().cpu(), k.double().cpu().transpose(-1, -2).unsqueeze(1))
    s = s.masked_fill(torch.arange(T)[None, None, None] > pos.cpu()[:, None, :, None], float("-inf"))
    s = torch.nn.functional.pad(s, (0, N * block_size - T), value=float("-inf"))
    s = s.view(*s.shape[:3], N, block_size).amax(-1)
    for j in range(local_blocks):
        s.scatter_(-1, ((pos.cpu() // block_size - j).clamp(min=0))[:, None, :, None].expand(-1, s.shape[1], -1, 1),
                   float("inf"))
    return s


NEAR_TIE = 1e-4  # fp32 dot products of D<=32 unit-variance terms agree to ~1e-6; gaps below this are ties


def _differing_rows_not_ties(out, ref, args, kw):
    """Rows whose sets differ, minus those where every swapped block scores within NEAR_TIE of
    the row's weakest selected block (a numerical tie: fp32 sums in another order may flip it)."""
    rows = (out != ref).any(-1).nonzero().tolist()
    if not rows:
        return []
    scores = _block_scores64(*args, kw["block_size"], kw["local_blocks"])
    bad = []
    for b, h, s in rows:
        a = {int(x) for x in out[b, h, s] if x >= 0}
        r = {int(x) for x in ref[b, h, s] if x >= 0}
        sc = scores[b, h, s]
        kth = min(sc[list(r)].tolist())
        if len(a) != len(r) or any(abs(sc[x].item() - kth) > NEAR_TIE for x in a ^ r):
            bad.append((b, h, s))
    return bad


def _off_by_one(idx, n_blocks):
    """Move the last selected block of one row to its neighbour (or drop it when N == 1)."""
    bad = idx.clone().long()
    row = bad[0, 0, -1]
    last = int((row >= 0).sum()) - 1
    v = int(row[last])
    taken = set(row.tolist())
    cand = [c for c in (v + 1, v - 1) if 0 <= c < n_blocks and c not in taken]
    row[last] = cand[0] if cand else -1
    return pack_ascending(bad)


def _parity(impl, case, device):
    seed = fresh_seed()
    args, kw = _inputs(case, device)
    ref = indexer_topk(*args, **kw, impl="reference")
    out = indexer_topk(*args, **kw, impl=impl)
    n_blocks = -(-args[1].shape[1] // kw["block_size"])
    _check_contract(ref, n_blocks)
    _check_contract(out, n_blocks)
    assert out.shape == ref.shape == (*args[0].shape[:3], min(kw["topk"], n_blocks))
    bad = _differing_rows_not_ties(out, ref, args, kw)
    assert not bad, f"seed={seed}: {len(bad)} rows select other blocks, first (b, h, s) = {bad[0]}"
    # negative control: an off-by-one block in one row is caught by the same comparison
    assert _differing_rows_not_ties(_off_by_one(out, n_blocks), ref, args, kw), \
        f"seed={seed}: comparison missed an off-by-one block"


@pytest.mark.parametrize("case", list(CASES))
def test_torch_impl_matches_reference(case):
    _parity("torch", case, "cpu")


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_reference(case):
    _parity("triton", case, TRITON_DEVICE)


def test_torch_impl_small_chunks_match():
    from m3_trt.plugins.indexer_topk.torch_impl import indexer_topk_torch

    seed = fresh_seed()
    args, kw = _inputs("B2-S60-H2-T200-blk16-top4-loc2-chunked")
    ref = indexer_topk(*args, **kw)
    bad = _differing_rows_not_ties(indexer_topk_torch(*args, **kw, chunk=7), ref, args, kw)
    assert not bad, f"seed={seed}: rows {bad[:3]} differ"


def test_shape_errors_name_the_tensor():
    args, kw = _inputs("B1-S5-H2-T5-blk16-top4-loc1-shorter-than-block")
    q, k, pos = args
    with pytest.raises(ValueError, match=r"k_BTD.*\(1, 5, 8\)"):
        indexer_topk(q, k[..., :8], pos, **kw)
    with pytest.raises(ValueError, match="q_pos_BS"):
        indexer_topk(q, k, pos.float(), **kw)
    with pytest.raises(ValueError, match="impl"):
        indexer_topk(q, k, pos, **kw, impl="cuda")


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_bf16_inputs_select_the_same_sets(impl):
    """Scores are fp32 products of bf16 values in every implementation: same sets in bf16."""
    seed = fresh_seed()
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    args, kw = _inputs("B2-S60-H2-T200-blk16-top4-loc2-chunked", device)
    args = (args[0].bfloat16(), args[1].bfloat16(), args[2])
    ref = indexer_topk(*args, **kw)
    out = indexer_topk(*args, **kw, impl=impl)
    bad = _differing_rows_not_ties(out, ref, args, kw)
    assert not bad, f"seed={seed}: {len(bad)} rows select other blocks, first (b, h, s) = {bad[0]}"


def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args, kw = _inputs("B1-S5-H2-T5-blk16-top4-loc1-shorter-than-block")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        indexer_topk(*args, **kw, impl="triton")
