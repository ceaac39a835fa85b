"""The reference model with the Triton kernels switched on still equals transformers.

``kernels="triton"`` routes the indexer top-k, the block-sparse attention and the MoE of every
layer through the Triton kernels (GPU, or Triton's CPU interpreter when ``TRITON_INTERPRET=1`` is
exported before pytest starts). Same pairs, inputs and tolerance as ``test_parity.py``; two of
its configs: GQA 2 with a sparse-MoE layer, and two local blocks with block size 4. Decode
(prefill + single-token steps through the static cache) runs the kernels' S == 1 paths (split-K
attention) and is judged against transformers' full forward. The negative control breaks the
Triton indexer (drops the forced local block) and shows the same comparison fails.
"""

from __future__ import annotations

import os

import pytest
import torch
from hf_twins import make_pair, prompt_with
from test_parity import CONFIGS, INPUTS
from tolerances import TOLERANCES, assert_close, rel_err

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="kernels='triton' needs CUDA, or TRITON_INTERPRET=1 exported before pytest starts (CPU interpreter)",
)

MODEL_CONFIGS = ["gqa2-blk8-top2", "gqa2-blk4-top3-local2"]
MODEL_INPUTS = ["text-45", "one-image"]
TOL = TOLERANCES[("parity_transformers", "fp32")]


@pytest.fixture(scope="module", params=MODEL_CONFIGS, ids=MODEL_CONFIGS)
def pair(request):
    hf, ours = make_pair(CONFIGS[request.param])
    return hf, ours.to(DEVICE).set_kernels("triton")


def _hf_logits(hf, ids, **vision):
    with torch.no_grad():
        return hf(input_ids=ids, **vision).logits


def _ours_logits(ours, ids, cache=None, **vision):
    with torch.no_grad():
        moved = {k: v.to(DEVICE) for k, v in vision.items()}
        return ours(ids.to(DEVICE), cache=cache, **moved)[0].cpu()


@pytest.mark.parametrize("inputs", MODEL_INPUTS)
def test_triton_kernels_logits_match_transformers(pair, inputs):
    hf, ours = pair
    ids, vision = INPUTS[inputs]()
    ref = _hf_logits(hf, ids, **vision)
    out = _ours_logits(ours, ids, **vision)
    assert out.shape == ref.shape
    assert_close(out, ref, "parity_transformers", what=f"kernels=triton {inputs} logits")


def test_triton_kernels_decode_matches_transformers(pair):
    """Prefill 13 tokens, then 4 single-token steps: their logits == transformers' full forward."""
    hf, ours = pair
    prefill, steps = 13, 4
    ids = prompt_with([], n_text=prefill + steps, seed=3)
    ref = _hf_logits(hf, ids)
    cache = ours.new_cache(1, 32)
    out = [_ours_logits(ours, ids[:, :prefill], cache=cache)]
    out += [_ours_logits(ours, ids[:, i:i + 1], cache=cache) for i in range(prefill, prefill + steps)]
    assert cache.length == prefill + steps
    assert_close(torch.cat(out, 1), ref, "incremental_decode", what=f"kernels=triton prefill {prefill} + {steps} steps")


def test_negative_control_triton_indexer_without_local_block_detected(monkeypatch):
    """A Triton indexer that drops the forced local block from its selection is caught."""
    import m3_trt.plugins.indexer_topk.triton_kernel as kernel
    from m3_trt.plugins.indexer_topk.reference import pack_ascending

    original = kernel.indexer_topk_triton

    def without_local(q, k, pos, *, block_size, topk, local_blocks, **kw):
        idx = original(q, k, pos, block_size=block_size, topk=topk, local_blocks=local_blocks, **kw)
        local = (pos // block_size)[:, None, :, None]
        return pack_ascending(idx.masked_fill(idx == local, -1))

    hf, ours = make_pair(CONFIGS["gqa2-blk8-top2"])
    ours.to(DEVICE).set_kernels("triton")
    ids, vision = INPUTS["text-45"]()
    ref = _hf_logits(hf, ids, **vision)
    assert rel_err(_ours_logits(ours, ids, **vision), ref) <= TOL  # the unbroken kernel passes here
    monkeypatch.setattr(kernel, "indexer_topk_triton", without_local)
    err = rel_err(_ours_logits(ours, ids, **vision), ref)
    assert err > 100 * TOL, f"dropping the local block went unnoticed: rel err {err:.3e}"
