"""Block-sparse attention: torch_impl and the Triton kernel equal the dense-mask reference (fp32)."""

from __future__ import annotations

import pytest
import torch
from plugin_helpers import TRITON_DEVICE, fresh_seed, needs_triton
from tolerances import TOLERANCES, max_abs, rel_err

from m3_trt.plugins.block_sparse_attention import block_sparse_attention
from m3_trt.plugins.indexer_topk import indexer_topk
from m3_trt.plugins.indexer_topk.reference import pack_ascending

TOL = TOLERANCES[("kernel", "fp32")]

# (B, Hq, G, S, T, D, block, topk, local, first query position per batch row)
CASES = {
    "B2-S300-Hq4-G2-T300-blk16-top4-loc1-prefill": (2, 4, 2, 300, 300, 32, 16, 4, 1, (0, 0)),
    "B1-S40-Hq4-G2-T100-blk16-top3-loc1-chunked": (1, 4, 2, 40, 100, 32, 16, 3, 1, (50,)),
    "B1-S40-Hq2-G2-T60-blk16-top2-loc2-gqa1": (1, 2, 2, 40, 60, 32, 16, 2, 2, (10,)),
    "B1-S5-Hq4-G1-T5-blk16-top4-loc1-shorter-than-block": (1, 4, 1, 5, 5, 32, 16, 4, 1, (0,)),
    "B1-S40-Hq8-G2-T40-blk16-top8-loc1-topk-ge-blocks": (1, 8, 2, 40, 40, 16, 16, 8, 1, (0,)),
    "B2-S1-Hq8-G2-T256-blk16-top4-loc2-decode": (2, 8, 2, 1, 256, 32, 16, 4, 2, (150, 33)),
    "B1-S30-Hq6-G2-T70-D24-blk12-top3-loc2-non-pow2": (1, 6, 2, 30, 70, 24, 12, 3, 2, (35,)),
}
TRITON_CASES = [k for k in CASES if "S300" not in k]


def _inputs(case, device="cpu"):
    B, Hq, G, S, T, D, bs, topk, local, starts = CASES[case]
    q = torch.randn(B, Hq, S, D, device=device)
    k = torch.randn(B, G, T, D, device=device)
    v = torch.randn(B, G, T, D, device=device)
    pos = torch.stack([torch.arange(S) + s0 for s0 in starts]).to(device)
    # Unfilled cache slots hold garbage: only q_pos masking keeps them out.
    future = torch.arange(T, device=device)[None, :] > pos.max(dim=1).values[:, None]
    k.masked_fill_(future[:, None, :, None], 1e4)
    v.masked_fill_(future[:, None, :, None], 1e4)
    iq = torch.randn(B, G, S, 16, device=device)
    ik = torch.randn(B, T, 16, device=device)
    idx = indexer_topk(iq, ik, pos, block_size=bs, topk=topk, local_blocks=local)
    return (q, k, v, idx, pos), dict(block_size=bs, scale=D**-0.5)


def _negative(args, kw):
    """Off-by-one block: every selected id moves to its right neighbour (wrong scale when N == 1)."""
    q, k, v, idx, pos = args
    n_blocks = -(-k.shape[2] // kw["block_size"])
    if n_blocks == 1:
        return args, dict(kw, scale=kw["scale"] * 1.5)
    shifted = torch.where(idx >= 0, (idx.long() + 1) % n_blocks, -1)
    return (q, k, v, pack_ascending(shifted), pos), kw


def _parity(impl, case, device):
    seed = fresh_seed()
    args, kw = _inputs(case, device)
    ref = block_sparse_attention(*args, **kw, impl="reference")
    out = block_sparse_attention(*args, **kw, impl=impl)
    err = rel_err(out, ref)
    assert err <= TOL, f"seed={seed}: rel err {err:.3e} > {TOL:.0e} (max-abs {max_abs(out, ref):.3e})"
    bad = block_sparse_attention(*_negative(args, kw)[0], **_negative(args, kw)[1], impl=impl)
    assert rel_err(bad, ref) > 100 * TOL, f"seed={seed}: negative control not detected ({rel_err(bad, ref):.3e})"


@pytest.mark.parametrize("case", list(CASES))
def test_torch_impl_matches_reference(case):
    _parity("torch", case, "cpu")


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_reference(case):
    _parity("triton", case, TRITON_DEVICE)


@needs_triton
@pytest.mark.parametrize("splits", [2, 3], ids=lambda p: f"splits{p}")
def test_triton_split_k_matches_reference(splits):
    from m3_trt.plugins.block_sparse_attention.triton_kernel import block_sparse_attention_triton

    seed = fresh_seed()
    args, kw = _inputs("B1-S40-Hq4-G2-T100-blk16-top3-loc1-chunked", TRITON_DEVICE)
    ref = block_sparse_attention(*args, **kw)
    out = block_sparse_attention_triton(*args, **kw, num_splits=splits)
    assert rel_err(out, ref) <= TOL, f"seed={seed}: rel err {rel_err(out, ref):.3e}"


def test_torch_impl_small_tiles_match():
    from m3_trt.plugins.block_sparse_attention.torch_impl import block_sparse_attention_torch

    seed = fresh_seed()
    args, kw = _inputs("B1-S40-Hq4-G2-T100-blk16-top3-loc1-chunked")
    ref = block_sparse_attention(*args, **kw)
    out = block_sparse_attention_torch(*args, **kw, tile=3)
    assert rel_err(out, ref) <= TOL, f"seed={seed}: rel err {rel_err(out, ref):.3e}"


@pytest.mark.parametrize("path", ["union", "blocks"])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_impl_forced_paths_match_reference(case, path):
    """Both strategies of torch_impl (tile union gather; per-key-block scatter) on every case."""
    from m3_trt.plugins.block_sparse_attention.torch_impl import block_sparse_attention_torch

    seed = fresh_seed()
    args, kw = _inputs(case)
    ref = block_sparse_attention(*args, **kw)
    out = block_sparse_attention_torch(*args, **kw, path=path)
    assert rel_err(out, ref) <= TOL, f"seed={seed} path={path}: rel err {rel_err(out, ref):.3e}"
    bad_args, bad_kw = _negative(args, kw)
    bad = block_sparse_attention_torch(*bad_args, **bad_kw, path=path)
    assert rel_err(bad, ref) > 100 * TOL, f"seed={seed} path={path}: negative control not detected"


def test_shape_errors_name_the_tensor():
    args, kw = _inputs("B1-S5-Hq4-G1-T5-blk16-top4-loc1-shorter-than-block")
    q, k, v, idx, pos = args
    with pytest.raises(ValueError, match=r"v_BGTD.*\(1, 1, 4, 32\)"):
        block_sparse_attention(q, k, v[:, :, :4], idx, pos, **kw)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        block_sparse_attention(q[:, :3], k.expand(1, 2, 5, 32), v.expand(1, 2, 5, 32), idx.expand(1, 2, 5, 1), pos, **kw)
    with pytest.raises(ValueError, match="block_idx_BGSK"):
        block_sparse_attention(q, k, v, idx.float(), pos, **kw)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_bf16_against_fp32_reference(impl):
    """bf16 inputs: judged against the fp32 reference on the same (bf16-representable) values."""
    seed = fresh_seed()
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    (q, k, v, idx, pos), kw = _inputs("B1-S40-Hq4-G2-T100-blk16-top3-loc1-chunked", device)
    q, k, v = (t.clamp(-100, 100).bfloat16() for t in (q, k, v))
    ref32 = block_sparse_attention(q.float(), k.float(), v.float(), idx, pos, **kw)
    out = block_sparse_attention(q, k, v, idx, pos, **kw, impl=impl)
    assert out.dtype == torch.bfloat16
    tol = TOLERANCES[("kernel", "bf16")]
    assert rel_err(out, ref32) <= tol, f"seed={seed}: rel err {rel_err(out, ref32):.3e} > {tol:.0e}"
