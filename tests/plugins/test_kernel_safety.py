"""Triton kernels at the edges the parity tests never reach: 64-bit offsets, NaN scores, holes and
repeats in a block row (the branch-free walk), padding tiles of the sync-free MoE alignment.

64-bit offsets: at the real shapes ``b * batch_stride`` passes 2^31 elements in a prefill of
B >= 5 at 64K (q ``[B, 64, S, 128]``). The tests reproduce that product on small data: a view
into one large *uninitialised* fp16 storage (~4 GiB of address space, of which only the pages
the views use are ever touched) with batch stride ``2^30 + 2^20`` (still an int32 argument) and
B = 3, so the last batch row starts at element ``2^31 + 2^21``. A kernel that multiplied in
int32 would wrap to 2 GiB-elements *before* the storage (in the interpreter, numpy int32
arithmetic wraps the same way a GPU's does): each test first checks that its product really
wraps in int32 (the negative control of the setup), then that every batch row equals the
reference computed on compact copies.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from plugin_helpers import TRITON_DEVICE, fresh_seed, needs_triton
from tolerances import TOLERANCES, rel_err

from m3_trt.plugins.block_sparse_attention import block_sparse_attention
from m3_trt.plugins.indexer_topk import indexer_topk
from m3_trt.plugins.swiglu_moe import swiglu_moe

pytestmark = needs_triton

BIG_STRIDE = 2**30 + 2**20  # elements; < 2^31, so Triton passes it as an int32 argument
N_BATCH = 3
TOL16 = TOLERANCES[("kernel", "bf16")]  # fp16 inputs judged against fp32 on the same values: same budget


def _wraps_in_int32(b: int, stride: int) -> bool:
    with np.errstate(over="ignore"):
        return int(np.int32(b) * np.int32(stride)) != b * stride


def _big_view(storage: torch.Tensor, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    """``shape`` with dim 0 strided by ``BIG_STRIDE`` into ``storage`` (the rest compact), filled
    with fresh random values."""
    inner = [1] * len(shape)
    for i in range(len(shape) - 2, 0, -1):
        inner[i] = inner[i + 1] * shape[i + 1]
    inner[0] = BIG_STRIDE
    view = storage.as_strided(shape, inner, offset)
    for b in range(shape[0]):
        view[b].copy_(torch.randn(shape[1:]))
    return view


@pytest.fixture(scope="module")
def big_storage():
    # (N_BATCH - 1) * BIG_STRIDE + room for the views: ~4.0 GiB of fp16 address space, untouched.
    n = (N_BATCH - 1) * BIG_STRIDE + 2**21
    if TRITON_DEVICE != "cpu":
        pytest.skip("the large-stride views are a CPU-interpreter test (no 4 GiB allocation on a GPU run)")
    return torch.empty(n, dtype=torch.float16)


def test_block_sparse_attention_64bit_batch_offsets(big_storage):
    seed = fresh_seed()
    assert _wraps_in_int32(N_BATCH - 1, BIG_STRIDE)
    Hq, G, S, T, D, bs = 4, 2, 6, 48, 16, 16
    q = _big_view(big_storage, (N_BATCH, Hq, S, D), 0)
    k = torch.randn(N_BATCH, G, T, D).half()
    v = torch.randn(N_BATCH, G, T, D).half()
    pos = (torch.arange(S) + T - S)[None].expand(N_BATCH, S).contiguous()
    idx = indexer_topk(torch.randn(N_BATCH, G, S, 16), torch.randn(N_BATCH, T, 16), pos,
                       block_size=bs, topk=2, local_blocks=1)
    kw = dict(block_size=bs, scale=D**-0.5)
    out = block_sparse_attention(q, k, v, idx, pos, **kw, impl="triton")
    ref = block_sparse_attention(q.float().contiguous(), k.float(), v.float(), idx, pos, **kw)
    for b in range(N_BATCH):
        err = rel_err(out[b], ref[b])
        assert err <= TOL16, f"seed={seed}: batch row {b} rel err {err:.3e} (offset {b * BIG_STRIDE})"


def test_indexer_topk_64bit_batch_offsets(big_storage):
    seed = fresh_seed()
    assert _wraps_in_int32(N_BATCH - 1, BIG_STRIDE)
    H, S, T, D, bs = 2, 8, 96, 16, 16
    q = _big_view(big_storage, (N_BATCH, H, S, D), 2**20)
    k = torch.randn(N_BATCH, T, D).half()
    pos = (torch.arange(S) + T - S)[None].expand(N_BATCH, S).contiguous()
    kw = dict(block_size=bs, topk=3, local_blocks=1)
    out = indexer_topk(q, k, pos, **kw, impl="triton")
    ref = indexer_topk(q.float().contiguous(), k.float(), pos, **kw)
    for b in range(N_BATCH):
        assert torch.equal(out[b], ref[b]), f"seed={seed}: batch row {b} selects other blocks"


def test_swiglu_moe_64bit_expert_offsets(big_storage):
    seed = fresh_seed()
    assert _wraps_in_int32(N_BATCH - 1, BIG_STRIDE)
    T, D, F = 8, 32, 16
    w13 = _big_view(big_storage, (N_BATCH, 2 * F, D), 2**20 + 2**19)
    x = torch.randn(T, D).half()
    router = torch.randn(N_BATCH, D) * 0.3
    bias = torch.zeros(N_BATCH)
    w2 = (torch.randn(N_BATCH, D, F) * 0.2).half()
    kw = dict(top_k=2, routed_scaling=2.0, alpha=1.702, limit=7.0)
    out = swiglu_moe(x, router, bias, w13, w2, None, None, **kw, impl="triton")
    ref = swiglu_moe(x.float(), router, bias, w13.float().contiguous(), w2.float(), None, None, **kw)
    err = rel_err(out, ref)
    assert err <= TOL16, f"seed={seed}: rel err {err:.3e}"


# -- NaN scores in the indexer ---------------------------------------------------------------

def _expected_sets(q, k, pos, bs, topk, local):
    """Block sets with the kernel's NaN rule (a NaN score counts as -1e30), float64, ties to the
    lowest block id (all-NaN rows tie every causal block at -1e30)."""
    T = k.shape[1]
    N = -(-T // bs)
    s = torch.matmul(q.double(), k.double().transpose(-1, -2).unsqueeze(1))
    s = torch.nan_to_num(s, nan=-1e30)
    s = s.masked_fill(torch.arange(T)[None, None, None] > pos[:, None, :, None], float("-inf"))
    s = torch.nn.functional.pad(s, (0, N * bs - T), value=float("-inf")).view(*s.shape[:3], N, bs).amax(-1)
    for j in range(local):
        s.scatter_(-1, (pos // bs - j).clamp(min=0)[:, None, :, None].expand(-1, s.shape[1], -1, 1), float("inf"))
    sets = []
    for row in s.reshape(-1, N):
        order = sorted(range(N), key=lambda n: (-row[n].item(), n))[:min(topk, N)]
        sets.append({n for n in order if row[n] > float("-inf")})
    return sets


def _sets(idx):
    return [{int(x) for x in row if x >= 0} for row in idx.reshape(-1, idx.shape[-1])]


def _nan_largest_sets(q, k, pos, bs, topk, local):
    """The rule torch.topk applies to raw scores (NaN ranks highest): the negative control."""
    T, N = k.shape[1], -(-k.shape[1] // bs)
    s = torch.matmul(q.double(), k.double().transpose(-1, -2).unsqueeze(1))
    s = s.masked_fill(torch.arange(T)[None, None, None] > pos[:, None, :, None], float("-inf"))
    s = torch.nn.functional.pad(s, (0, N * bs - T), value=float("-inf")).view(*s.shape[:3], N, bs).amax(-1)
    for j in range(local):
        s.scatter_(-1, (pos // bs - j).clamp(min=0)[:, None, :, None].expand(-1, s.shape[1], -1, 1), float("inf"))
    top, idx = s.topk(min(topk, N), dim=-1)
    return _sets(idx.masked_fill(top == float("-inf"), -1))


def test_indexer_nan_scores_rank_below_real_keys():
    """NaN in some keys (one whole block and scattered slots) and in one query row: every
    implementation (kernel, reference, torch) ranks those scores as -1e30. The all-NaN query row
    ties every causal block; its tie order is each implementation's own (the kernel takes the
    lowest ids), so it is compared as "causal blocks + local block" for the others. Negative
    control: the NaN-as-largest rule of a raw torch.topk picks other sets on the same inputs."""
    seed = fresh_seed()
    B, H, S, T, D, bs, topk, local = 1, 2, 12, 112, 16, 16, 3, 1
    q = torch.randn(B, H, S, D)
    k = torch.randn(B, T, D)
    pos = (torch.arange(S) + T - S)[None]
    k[0, 16:32] = float("nan")  # block 1 entirely NaN
    k[0, [40, 70, 90]] = float("nan")  # single slots in blocks 2, 4, 5
    q[0, 1, 3] = float("nan")  # one query row: every score NaN -> ties at -1e30, lowest ids win
    kw = dict(block_size=bs, topk=topk, local_blocks=local)
    out = indexer_topk(q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), pos.to(TRITON_DEVICE), **kw, impl="triton").cpu()
    expected = _expected_sets(q, k, pos, bs, topk, local)
    got = _sets(out)
    bad = [i for i, (a, e) in enumerate(zip(got, expected)) if a != e]
    assert not bad, f"seed={seed}: rows {bad[:4]} differ: got {[got[i] for i in bad[:2]]}, want {[expected[i] for i in bad[:2]]}"
    assert all(1 not in row for i, row in enumerate(got) if i != 1 * S + 3), "the all-NaN block was selected"
    assert got[1 * S + 3] == {0, 1, (T - S + 3) // bs}, "an all-NaN query must take the lowest ids + local"
    tie_row = 1 * S + 3
    for impl in ("reference", "torch"):
        other = _sets(indexer_topk(q, k, pos, **kw, impl=impl))
        bad = [i for i, (a, e) in enumerate(zip(other, expected)) if a != e and i != tie_row]
        assert not bad, f"seed={seed}: {impl}: rows {bad[:4]} differ from the -1e30 rule"
        causal = set(range((T - S + 3) // bs + 1))
        assert (T - S + 3) // bs in other[tie_row] and other[tie_row] <= causal and len(other[tie_row]) == topk
    assert _nan_largest_sets(q, k, pos, bs, topk, local) != expected, \
        f"seed={seed}: negative control: the NaN-as-largest rule gave the same sets"


# -- branch-free walk: holes and adjacent repeats ----------------------------------------------

def _holey_rows(pos, G, bs, K, gen):
    """``[B, G, S, K]`` rows laid out as ``[a, a, -1, b, -1, c, ...]``: valid ids with an adjacent
    repeat and ``-1`` holes between them and after them (ids are distinct causal blocks)."""
    B, S = pos.shape
    idx = torch.full((B, G, S, K), -1, dtype=torch.int32)
    for b in range(B):
        for g in range(G):
            for s in range(S):
                qb = int(pos[b, s]) // bs
                pick = sorted(torch.randperm(qb + 1, generator=gen)[:3].tolist())
                layout = [pick[0], pick[0], -1] + [x for p in pick[1:] for x in (p, -1)]
                idx[b, g, s, :len(layout[:K])] = torch.tensor(layout[:K], dtype=torch.int32)
    return idx


@pytest.mark.parametrize("splits", [1, 2], ids=lambda p: f"splits{p}")
def test_block_sparse_attention_holes_and_repeats(splits):
    from m3_trt.plugins.block_sparse_attention.triton_kernel import block_sparse_attention_triton

    seed = fresh_seed()
    B, Hq, G, S, T, D, bs, K = 1, 4, 2, 10, 96, 16, 16, 8
    q, k, v = torch.randn(B, Hq, S, D), torch.randn(B, G, T, D), torch.randn(B, G, T, D)
    pos = (torch.arange(S) + T - S)[None]
    idx = _holey_rows(pos, G, bs, K, torch.Generator().manual_seed(seed))
    kw = dict(block_size=bs, scale=D**-0.5)
    ref = block_sparse_attention(q, k, v, idx, pos, **kw)
    dev = TRITON_DEVICE
    out = block_sparse_attention_triton(q.to(dev), k.to(dev), v.to(dev), idx.to(dev), pos.to(dev), **kw,
                                        num_splits=splits).cpu()
    tol = TOLERANCES[("kernel", "fp32")]
    assert rel_err(out, ref) <= tol, f"seed={seed}: rel err {rel_err(out, ref):.3e}"
    # negative control: dropping the last valid id of every row (the one after the last hole)
    last = (idx >= 0).int().cumsum(-1).argmax(-1, keepdim=True)
    dropped = idx.scatter(-1, last, -1)
    bad = block_sparse_attention(q, k, v, dropped, pos, **kw)
    assert rel_err(bad, ref) > 100 * tol, f"seed={seed}: a dropped block went unnoticed"


# -- sync-free MoE alignment -------------------------------------------------------------------

def test_align_by_expert_tiles_cover_every_pair_once():
    """Every (token, slot) pair appears exactly once, in a tile of its own expert; tiles past the
    real ones are all sentinel and carry expert id E; the bound holds with every expert busy."""
    from m3_trt.plugins.swiglu_moe.triton_kernel import align_by_expert, tile_bound

    gen = torch.Generator().manual_seed(fresh_seed())
    for T, K, E, bm in ((1, 4, 128, 16), (37, 2, 8, 16), (200, 4, 8, 64), (5, 4, 16, 16)):
        experts = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
        ids, tile_e = align_by_expert(experts, E, bm)
        M = T * K
        assert ids.numel() == tile_bound(M, E, bm) * bm == tile_e.numel() * bm
        real = ids[ids < M].long()
        assert sorted(real.tolist()) == list(range(M)), "a pair is missing or repeated"
        tiles = ids.view(-1, bm)
        for t, e in enumerate(tile_e.tolist()):
            members = tiles[t][tiles[t] < M].long()
            if e == E:
                assert members.numel() == 0, "a padding tile holds a pair"
            else:
                assert (experts.reshape(-1)[members] == e).all(), f"tile {t} mixes experts"
        assert (tile_e[:-1] <= tile_e[1:]).all(), "tiles are not grouped by expert"
