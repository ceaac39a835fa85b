"""``m3-trt make-synthetic``: the real on-disk layout, loadable by transformers and by us, in bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from tolerances import TOLERANCES, assert_close, rel_err

from m3_trt.model.checkpoint import SCALE_SUFFIX, SafetensorsCheckpoint
from m3_trt.model.modeling import M3ForConditionalGeneration
from m3_trt.outputs import OutputError
from m3_trt.checkpoints.synthetic import layer_pattern, make_synthetic

LAYERS = 4  # full-dense, sparse-dense, sparse-moe, sparse-moe


@pytest.fixture(scope="module", params=["bf16", "mxfp8"])
def synthetic_small(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / f"small-{request.param}"
    make_synthetic(out, preset="small", layers=LAYERS, fmt=request.param, seed=0)
    return request.param, out


def test_layer_pattern_covers_sparse_attention_and_moe():
    assert layer_pattern(1) == (("minimax_m3_sparse",), ("sparse",))
    attn, mlp = layer_pattern(5)
    assert {f"{a}-{m}" for a, m in zip(attn, mlp)} == {
        "full_attention-dense", "minimax_m3_sparse-dense", "minimax_m3_sparse-sparse", "full_attention-sparse"}


def test_loads_in_reference_and_transformers_with_equal_logits(synthetic_small):
    """Both loaders read every tensor (MXFP8 dequantized by each) and give the same fp32 logits."""
    from transformers import MiniMaxM3SparseForConditionalGeneration

    fmt, ckpt = synthetic_small
    ours = M3ForConditionalGeneration.from_pretrained(ckpt)
    hf, info = MiniMaxM3SparseForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32,
                                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # With a quantization_config transformers 5.23 ignores dtype= for the tensors it does not
    # dequantize (they stay bf16); bf16 -> fp32 is exact, so cast after loading.
    hf = hf.float()
    n_scales = sum(k.endswith(SCALE_SUFFIX) for k in SafetensorsCheckpoint(ckpt).keys())
    assert len(ours.load_report.dequantized) == n_scales and (n_scales > 0) == (fmt == "mxfp8")
    ids = torch.randint(0, 1000, (1, 70), generator=torch.Generator().manual_seed(0))  # 5 key blocks of 16, top-3
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids).logits
        out = ours(ids)[0]
    assert_close(out, ref, "parity_transformers", what=f"synthetic small {fmt}")
    # negative control: one wrong tensor in the last MoE layer is far outside the tolerance
    with torch.no_grad():
        ours.model.language_model.layers[3].mlp.shared_experts.down_proj.weight.mul_(1.5)
        assert rel_err(ours(ids)[0], ref) > 100 * TOLERANCES[("parity_transformers", "fp32")]


def test_keys_match_what_save_pretrained_writes(synthetic_small, tmp_path):
    """Same tensor names and shapes as transformers' save_pretrained for the same config; FP8 adds only scales."""
    from transformers import MiniMaxM3SparseForConditionalGeneration, MiniMaxM3VLConfig

    fmt, ckpt = synthetic_small
    cfg = MiniMaxM3VLConfig.from_pretrained(ckpt)
    cfg.quantization_config = None
    torch.manual_seed(0)
    hf = MiniMaxM3SparseForConditionalGeneration(cfg).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="2MB")
    theirs = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    ours = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    scales = {k for k in ours if k.endswith(SCALE_SUFFIX)}
    assert set(ours) - scales == set(theirs)
    for name in (ckpt, tmp_path / "hf"):
        assert all(f.startswith("model-") and "-of-" in f for f in set(json.loads(
            (name / "model.safetensors.index.json").read_text())["weight_map"].values()))
        assert (name / "config.json").is_file() and (name / "generation_config.json").is_file()
    a, b = SafetensorsCheckpoint(ckpt), SafetensorsCheckpoint(tmp_path / "hf")
    assert all(a.shape(k) == b.shape(k) for k in theirs)
    if fmt == "mxfp8":
        weights = {k[: -len(SCALE_SUFFIX)] for k in scales}
        assert weights and all(k.startswith("language_model.model.layers.") for k in weights)
        assert not any(".block_sparse_moe.gate." in k or "norm" in k for k in weights)
        assert any(".experts.0.w2." in k for k in weights) and any("index_q_proj" in k for k in weights)
    else:
        assert not scales
    # negative control: transformers' in-memory names (what a plain state_dict save gives) do not match
    assert set(hf.state_dict()) != set(theirs)


def test_refuses_a_folder_that_is_not_ours(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not a previous make-synthetic output"):
        make_synthetic(tmp_path / "mine", preset="small", layers=1, fmt="bf16")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys
    from m3_trt.checkpoints import synthetic
    from m3_trt.checkpoints.tiny_tokenizer import write_tiny_tokenizer

    ids = write_tiny_tokenizer(sys.argv[2])
    synthetic.tensor_specs(synthetic.preset_config("medium", 3, ids))  # imports + one meta model: the fixed cost
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    m = synthetic.make_synthetic(sys.argv[1], preset="medium", layers=3, fmt="bf16")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"base": base, "peak": peak, "largest": m["largest_tensor_bytes"], "total": m["bytes"]}))
""")


def test_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """medium preset, 3 layers (211 MiB of bf16; largest tensor, the embedding, 32 MiB): peak RSS over
    the fixed cost (imports, one meta model) stays within 3x the largest tensor (measured 1.5x: one
    16 MiB fp32 chunk and its bf16 copy), well below the checkpoint — it is never held whole."""
    res = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path / "medium"), str(tmp_path / "tok")],
                         capture_output=True, text=True, check=True)
    m = json.loads(res.stdout.strip().splitlines()[-1])
    extra = m["peak"] - m["base"]
    assert m["total"] > 6 * m["largest"]  # holding the checkpoint would break the bound
    assert extra <= 3 * m["largest"], f"peak RSS {extra / 2**20:.0f} MiB over the fixed cost, largest tensor " \
                                      f"{m['largest'] / 2**20:.0f} MiB"
