"""Checkpoint IO: both key layouts, FP8 dequantization, and every malformed input by name."""

from __future__ import annotations

import json
import shutil
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file
from tolerances import assert_close

from m3_trt.model.checkpoint import CheckpointError, SafetensorsCheckpoint, dequantize_fp8, load_into
from m3_trt.model.modeling import M3ForConditionalGeneration


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_shard(ckpt, key, fn):
    """Apply ``fn(state) -> state`` to the shard holding ``key`` (index updated)."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][key]
    state = fn(load_file(ckpt / shard))
    save_file(state, ckpt / shard)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard or k in state}
    for k in state:
        index["weight_map"][k] = shard
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


KEY = "language_model.model.layers.1.self_attn.q_proj.weight"
EXPERT = "language_model.model.layers.1.block_sparse_moe.experts.3.w1.weight"


def test_in_memory_layout_loads(tiny_ckpt, tmp_path):
    """transformers' in-memory names (our module tree) load through the same table."""
    ref = M3ForConditionalGeneration.from_pretrained(tiny_ckpt)
    (tmp_path / "mem").mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "mem" / "model.safetensors")
    shutil.copy(tiny_ckpt / "config.json", tmp_path / "mem")
    again = M3ForConditionalGeneration.from_pretrained(tmp_path / "mem")
    assert again.load_report.layout == "transformers"
    for (k, a), (_, b) in zip(ref.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


MALFORMED = {
    "missing-tensor": (lambda s: {k: v for k, v in s.items() if k != KEY}, "missing 1: model.language_model.layers.1.self_attn.q_proj.weight"),
    "missing-one-expert-half": (lambda s: {k: v for k, v in s.items() if k != EXPERT},
                                "missing 1: model.language_model.layers.1.mlp.experts.gate_up_proj"),
    "unexpected-tensor": (lambda s: {**s, "language_model.model.layers.1.self_attn.extra.weight": torch.zeros(2)},
                          "unused 1: language_model.model.layers.1.self_attn.extra.weight"),
    "misshapen": (lambda s: {**s, KEY: torch.zeros(3, 3)}, f"{KEY}: shape \\(3, 3\\) does not fit"),
    "nan": (lambda s: {**s, KEY: s[KEY].clone().index_fill_(0, torch.tensor([2]), float("nan"))},
            f"{KEY}: contains non-finite"),
    "fp8-without-scale": (lambda s: {**s, KEY: s[KEY].to(torch.float8_e4m3fn)}, "FP8 tensor without"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_tensors_are_named(tiny_ckpt, tmp_path, case):
    fn, message = MALFORMED[case]
    ckpt = _copy(tiny_ckpt, tmp_path / "bad")
    key = EXPERT if "expert" in case else KEY
    _edit_shard(ckpt, key, fn)
    with pytest.raises(CheckpointError, match=message):
        M3ForConditionalGeneration.from_pretrained(ckpt)


def test_corrupt_header_is_an_error_not_a_crash(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "bad")
    shard = sorted(ckpt.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:40] = b"{ this is not a json header ...."
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name}: corrupt safetensors header"):
        SafetensorsCheckpoint(ckpt)


def test_truncated_shard_and_missing_shard(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "bad")
    shards = sorted(ckpt.glob("model-*.safetensors"))
    shards[0].write_bytes(shards[0].read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        SafetensorsCheckpoint(ckpt)
    shards[0].unlink()
    with pytest.raises(CheckpointError, match="shard named in the index is missing"):
        SafetensorsCheckpoint(ckpt)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        SafetensorsCheckpoint(tmp_path)


# -- FP8 ------------------------------------------------------------------------------------------

def _transformers_dequant(q, s):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32)


FORMATS = {
    "block128x128-f32": lambda w: (w.shape[0] // 128, w.shape[1] // 128, torch.float32),
    "mxfp8-1x32-e8m0": lambda w: (w.shape[0], w.shape[1] // 32, torch.uint8),
}


@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
def test_fp8_dequant_matches_transformers(fmt):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 384, generator=g) * 3
    rows, cols, sdt = FORMATS[fmt](w)
    q = w.clamp(-448, 448).to(torch.float8_e4m3fn)
    if sdt == torch.uint8:
        s = torch.randint(120, 134, (rows, cols), generator=g, dtype=torch.int64).to(torch.uint8)
    else:
        s = torch.rand(rows, cols, generator=g) + 0.5
    ours = dequantize_fp8(q, s, torch.float32)
    theirs = _transformers_dequant(q, s)
    assert torch.equal(ours, theirs)
    # negative control: applying the E8M0 bytes as plain multipliers would be far off
    if sdt == torch.uint8:
        assert not torch.allclose(ours, dequantize_fp8(q, s.float(), torch.float32))


def test_fp8_checkpoint_loads_dequantized(tiny_ckpt, tmp_path):
    """An FP8 q_proj (128x128 blocks need >=128 dims, so use 16x16-shaped grids) and an MXFP8 expert."""
    ckpt = _copy(tiny_ckpt, tmp_path / "fp8")
    expected = {}

    def quantize(state):
        for key, grid, sdt in ((KEY, (4, 4), torch.float32), (EXPERT, (32, 2), torch.uint8)):
            if key not in state:
                continue
            w = state[key]
            q = w.to(torch.float8_e4m3fn)
            s = torch.full(grid, 1.5) if sdt == torch.float32 else torch.full(grid, 126, dtype=torch.uint8)
            state[key], state[key + "_scale_inv"] = q, s
            expected[key] = _transformers_dequant(q, s)
        return state

    _edit_shard(ckpt, KEY, quantize)
    _edit_shard(ckpt, EXPERT, quantize)
    model = M3ForConditionalGeneration.from_pretrained(ckpt)
    assert sorted(model.load_report.dequantized) == sorted([KEY, EXPERT])
    attn = model.model.language_model.layers[1].self_attn
    assert torch.equal(attn.q_proj.weight, expected[KEY])
    gate_up = model.model.language_model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(gate_up[3, : gate_up.shape[1] // 2], expected[EXPERT])


def test_loading_holds_one_source_tensor_at_a_time(tiny_ckpt, monkeypatch):
    """Peak extra memory while loading is one source tensor: none outlives its copy."""
    alive, peak = weakref.WeakSet(), [0]
    original = SafetensorsCheckpoint.get

    def tracking_get(self, key):
        t = original(self, key)
        alive.add(t)
        peak[0] = max(peak[0], len(alive))
        return t

    monkeypatch.setattr(SafetensorsCheckpoint, "get", tracking_get)
    model = M3ForConditionalGeneration.from_pretrained(tiny_ckpt)
    assert len(model.load_report.loaded) > 100
    assert peak[0] <= 2, f"{peak[0]} source tensors alive at once"


def test_load_report_counts_every_tensor(tiny_ckpt):
    ckpt = SafetensorsCheckpoint(tiny_ckpt)
    model = M3ForConditionalGeneration.from_pretrained(tiny_ckpt)
    assert sorted(model.load_report.loaded) == sorted(ckpt.keys())
    ref = M3ForConditionalGeneration.from_pretrained(tiny_ckpt, kernels="reference")
    ids = torch.arange(40)[None]
    assert_close(model(ids)[0], ref(ids)[0], "parity_transformers")
    _ = load_into
