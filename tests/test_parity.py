"""The torch reference equals transformers' MiniMax-M3-VL (random weights, fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from hf_twins import IMAGE_TOKEN, VIDEO_TOKEN, make_pair, prompt_with, random_vision_inputs
from tolerances import TOLERANCES, assert_close, rel_err

# Four configs: GQA 2 with 45-token prompts (not a block multiple), GQA 1 with top-k >= blocks,
# two local blocks with small blocks, GQA 4 with every layer sparse + MoE.
CONFIGS = {
    "gqa2-blk8-top2": {},
    "gqa1-blk8-top8-topk_ge_blocks": dict(num_attention_heads=2, num_key_value_heads=2, index_n_heads=2,
                                          index_topk_blocks=8),
    "gqa2-blk4-top3-local2": dict(index_block_size=4, index_topk_blocks=3, index_local_blocks=2),
    "gqa4-blk16-top2-allsparse-moe": dict(num_attention_heads=8, num_key_value_heads=2, index_n_heads=2,
                                          index_block_size=16, layer_types=["minimax_m3_sparse"] * 4,
                                          mlp_layer_types=["sparse"] * 4),
}
KERNELS = ["reference", "torch"]


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def pair(request):
    return make_pair(CONFIGS[request.param])


def _logits(model, hf: bool, ids, **vision):
    with torch.no_grad():
        if hf:
            return model(input_ids=ids, **vision).logits
        return model(ids, **vision)[0]


INPUTS = {
    "text-45": lambda: (prompt_with([], n_text=45), {}),
    "one-image": lambda: (prompt_with([(IMAGE_TOKEN, 6)]),
                          dict(zip(("pixel_values", "image_grid_thw"), random_vision_inputs([(1, 4, 6)])))),
    "two-images-different-sizes": lambda: (
        prompt_with([(IMAGE_TOKEN, 6), (IMAGE_TOKEN, 4)]),
        dict(zip(("pixel_values", "image_grid_thw"), random_vision_inputs([(1, 4, 6), (1, 4, 4)], seed=1)))),
    "video-2chunks": lambda: (prompt_with([(VIDEO_TOKEN, 8)]),
                              dict(zip(("pixel_values_videos", "video_grid_thw"),
                                       random_vision_inputs([(2, 4, 4)], seed=2)))),
}


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("inputs", list(INPUTS), ids=list(INPUTS))
def test_logits_match_transformers(pair, inputs, kernels):
    hf, ours = pair
    ids, vision = INPUTS[inputs]()
    if kernels != "reference":
        _skip_without(kernels)
    ref = _logits(hf, True, ids, **vision)
    ours.set_kernels(kernels)
    try:
        out = _logits(ours, False, ids, **vision)
    finally:
        ours.set_kernels("reference")
    assert out.shape == ref.shape
    assert_close(out, ref, "parity_transformers", what=f"{inputs} logits")


def _skip_without(kernels: str):
    import importlib

    for name in ("indexer_topk", "block_sparse_attention", "swiglu_moe"):
        mod = importlib.import_module(f"m3_trt.plugins.{name}")
        if not hasattr(mod, name):
            pytest.skip(f"plugin {name} has no dispatcher yet")


@pytest.mark.parametrize("prefill", [30, 7])
def test_incremental_decode_matches_full_forward(pair, prefill):
    """Prefill + 16 single-token steps through the static cache == one full forward."""
    _, ours = pair
    ids = prompt_with([], n_text=prefill + 16, seed=3)
    with torch.no_grad():
        full = ours(ids)[0]
        cache = ours.new_cache(1, 64)
        steps = [ours(ids[:, :prefill], cache=cache)[0]]
        for i in range(prefill, prefill + 16):
            steps.append(ours(ids[:, i:i + 1], cache=cache)[0])
    assert cache.length == prefill + 16
    assert_close(torch.cat(steps, 1), full, "incremental_decode", what="prefill+16 decode steps")


def test_batched_rows_equal_single_rows(pair):
    _, ours = pair
    ids = torch.cat([prompt_with([], n_text=30, seed=s) for s in (4, 5)])
    with torch.no_grad():
        both = ours(ids)[0]
        single = torch.cat([ours(ids[i:i + 1])[0] for i in range(2)])
    assert_close(both, single, "parity_transformers", what="batch of 2 vs rows")


# -- negative controls: the comparison catches a wrong model -----------------------------------

def test_negative_control_swapped_experts_detected():
    hf, ours = make_pair(CONFIGS["gqa2-blk8-top2"])
    ids = prompt_with([], n_text=45)
    ref = _logits(hf, True, ids)
    experts = ours.model.language_model.layers[1].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj[[0, 1]] = experts.gate_up_proj[[1, 0]].clone()
    assert rel_err(_logits(ours, False, ids), ref) > 100 * TOLERANCES[("parity_transformers", "fp32")]


def test_negative_control_off_by_one_local_block_detected():
    """A reference that forced the *previous* block instead of the current one would be caught."""
    from m3_trt.plugins.indexer_topk import reference as ref_mod
    from m3_trt.plugins.indexer_topk.op import IMPLS  # the op's implementation table

    hf, ours = make_pair(CONFIGS["gqa2-blk8-top2"])
    ids = prompt_with([], n_text=45)
    ref = _logits(hf, True, ids)
    original = ref_mod.indexer_topk_reference

    def shifted(q, k, pos, *, block_size, topk, local_blocks):
        return original(q, k, (pos - block_size).clamp(min=0), block_size=block_size, topk=topk,
                        local_blocks=local_blocks)

    IMPLS["reference"] = shifted
    try:
        out = _logits(ours, False, ids)
    finally:
        IMPLS["reference"] = original
    assert rel_err(out, ref) > 100 * TOLERANCES[("parity_transformers", "fp32")]


def test_save_pretrained_checkpoint_loads_unchanged(tmp_path):
    from m3_trt.model.modeling import M3ForConditionalGeneration

    hf, _ = make_pair(CONFIGS["gqa2-blk4-top3-local2"], seed=7)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    ours = M3ForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert ours.load_report.layout == "original"
    assert not ours.load_report.missing and not ours.load_report.unused
    ids = prompt_with([(IMAGE_TOKEN, 6)])
    pix, grid = random_vision_inputs([(1, 4, 6)])
    assert_close(_logits(ours, False, ids, pixel_values=pix, image_grid_thw=grid),
                 _logits(hf, True, ids, pixel_values=pix, image_grid_thw=grid), "parity_transformers")


def test_tiny_checkpoint_matches_transformers_from_pretrained(tiny_ckpt):
    from transformers import MiniMaxM3SparseForConditionalGeneration

    from m3_trt.model.modeling import M3ForConditionalGeneration

    hf = MiniMaxM3SparseForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    ours = M3ForConditionalGeneration.from_pretrained(tiny_ckpt)
    ids = torch.randint(0, 1000, (1, 100), generator=torch.Generator().manual_seed(0))
    assert_close(_logits(ours, False, ids), _logits(hf, True, ids), "parity_transformers", what="tiny ckpt")
