"""Hostile checkpoints (issue 10, items 4, 7, 9): relabelled dtypes and index paths are named errors.

Each case rebuilds the probe's input from the tiny checkpoint: a float tensor written with an
integer dtype in its header (it used to load as integers cast to float, ~1e9, and pass
``export --verify`` and ``compare`` because both sides read the same wrong weights), FP8 scales of
a wrong dtype, and ``model.safetensors.index.json`` entries pointing outside the checkpoint.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from m3_trt.model.checkpoint import CheckpointError, SafetensorsCheckpoint
from m3_trt.model.modeling import M3ForConditionalGeneration

KEY = "language_model.model.layers.1.self_attn.q_proj.weight"
INDEX = "model.safetensors.index.json"


def _copy(tiny_ckpt, tmp_path):
    return shutil.copytree(tiny_ckpt, tmp_path / "ckpt")


def _shard_of(ckpt, key):
    return ckpt / json.loads((ckpt / INDEX).read_text())["weight_map"][key]


def _relabel_in_header(shard, key, new_dtype: str) -> None:
    """Change only the header's dtype string of ``key`` (same byte size): the probe's edit."""
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header[key]["dtype"] = new_dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _rewrite(shard, fn) -> None:
    save_file(fn(load_file(shard)), shard, metadata={"format": "pt"})


# -- item 4: relabelled dtypes --------------------------------------------------------------------

def test_float_tensor_relabelled_i32_in_header_is_named(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    _relabel_in_header(_shard_of(ckpt, KEY), KEY, "I32")
    assert SafetensorsCheckpoint(ckpt).get(KEY).abs().max() > 1e6  # what used to be loaded as weights
    with pytest.raises(CheckpointError, match=f"{KEY}: stored as I32, but it is a float parameter; expected F32"):
        M3ForConditionalGeneration.from_pretrained(ckpt)


RELABELS = {
    "I64": lambda w: w.round().to(torch.int64),
    "U8-not-a-scale": lambda w: w.abs().mul(100).to(torch.uint8),
    "BOOL": lambda w: w > 0,
    "I16": lambda w: w.mul(1000).to(torch.int16),
}


@pytest.mark.parametrize("case", list(RELABELS), ids=list(RELABELS))
def test_float_parameter_stored_as_integer_is_named(tiny_ckpt, tmp_path, case):
    ckpt = _copy(tiny_ckpt, tmp_path)
    _rewrite(_shard_of(ckpt, KEY), lambda s: {**s, KEY: RELABELS[case](s[KEY]).contiguous()})
    with pytest.raises(CheckpointError, match=f"{KEY}: stored as {case.split('-')[0]}, but it is a float parameter"):
        M3ForConditionalGeneration.from_pretrained(ckpt)


@pytest.mark.parametrize("scale_dtype", [torch.int32, torch.float16], ids=["I32", "F16"])
def test_fp8_scale_of_wrong_dtype_is_named(tiny_ckpt, tmp_path, scale_dtype):
    ckpt = _copy(tiny_ckpt, tmp_path)

    def fp8(s):
        return {**s, KEY: s[KEY].to(torch.float8_e4m3fn), KEY + "_scale_inv": torch.ones(4, 4, dtype=scale_dtype)}

    _rewrite(_shard_of(ckpt, KEY), fp8)
    index = json.loads((ckpt / INDEX).read_text())
    index["weight_map"][KEY + "_scale_inv"] = index["weight_map"][KEY]
    (ckpt / INDEX).write_text(json.dumps(index))
    name = {torch.int32: "I32", torch.float16: "F16"}[scale_dtype]
    with pytest.raises(CheckpointError, match=f"{KEY}_scale_inv: stored as {name}; an FP8 scale must be F32"):
        M3ForConditionalGeneration.from_pretrained(ckpt)


def test_bf16_and_fp16_floats_still_load(tiny_ckpt, tmp_path):
    """Control: the check refuses non-float dtypes only; a half-precision tensor loads (widened)."""
    ckpt = _copy(tiny_ckpt, tmp_path)
    ref = M3ForConditionalGeneration.from_pretrained(tiny_ckpt)
    _rewrite(_shard_of(ckpt, KEY), lambda s: {**s, KEY: s[KEY].to(torch.bfloat16)})
    got = M3ForConditionalGeneration.from_pretrained(ckpt).model.language_model.layers[1].self_attn.q_proj.weight
    want = ref.model.language_model.layers[1].self_attn.q_proj.weight.to(torch.bfloat16).float()
    assert torch.equal(got, want)


# -- item 7: the index names only plain files inside the folder -----------------------------------

def _point(ckpt, value) -> None:
    index = json.loads((ckpt / INDEX).read_text())
    shard = index["weight_map"][KEY]
    index["weight_map"] = {k: (value if v == shard else v) for k, v in index["weight_map"].items()}
    (ckpt / INDEX).write_text(json.dumps(index))


TRAVERSALS = {
    "dot-dot": lambda outside: "../outside/" + outside.name,
    "absolute": lambda outside: str(outside),
    "backslash": lambda outside: "..\\outside\\" + outside.name,
    "subfolder": lambda outside: "sub/" + outside.name,
    "dot-dot-alone": lambda outside: "..",
}


@pytest.mark.parametrize("case", list(TRAVERSALS), ids=list(TRAVERSALS))
def test_index_entry_outside_the_folder_is_refused_alike_whether_or_not_it_exists(tiny_ckpt, tmp_path, case):
    ckpt = _copy(tiny_ckpt, tmp_path)
    shard = _shard_of(ckpt, KEY)
    (tmp_path / "outside").mkdir()
    outside = tmp_path / "outside" / shard.name
    (ckpt / "sub").mkdir()
    name = TRAVERSALS[case](outside)
    _point(ckpt, name)
    errors = []
    for planted in (False, True):  # the same refusal with and without a real file there
        if planted:
            shutil.copy(shard, outside)
            shutil.copy(shard, ckpt / "sub" / shard.name)
        with pytest.raises(CheckpointError, match="is not a plain file name in the checkpoint folder") as e:
            SafetensorsCheckpoint(ckpt)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    assert repr(name) in errors[0]


@pytest.mark.parametrize("weight_map,message", [
    ({"a.weight": 5}, r"weight_map\['a.weight'\] must be a shard file name \(a string\), got int"),
    ({"a.weight": ["model.safetensors"]}, r"must be a shard file name \(a string\), got list"),
    (["model.safetensors"], "'weight_map' must be an object of tensor name -> shard file name, got list"),
    ("model.safetensors", "'weight_map' must be an object"),
], ids=["value-int", "value-list", "map-list", "map-string"])
def test_malformed_weight_map_is_named(tiny_ckpt, tmp_path, weight_map, message):
    ckpt = _copy(tiny_ckpt, tmp_path)
    (ckpt / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=message):
        SafetensorsCheckpoint(ckpt)
    (ckpt / INDEX).write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        SafetensorsCheckpoint(ckpt)


def test_symlinked_shard_inside_the_folder_still_loads(tiny_ckpt, tmp_path):
    """Control: the Hugging Face cache's layout (plain names that are links into blobs/) loads."""
    ckpt = _copy(tiny_ckpt, tmp_path)
    shard = _shard_of(ckpt, KEY)
    (tmp_path / "blobs").mkdir()
    blob = tmp_path / "blobs" / "0123abcd"
    shutil.move(shard, blob)
    shard.symlink_to(blob)
    ref = M3ForConditionalGeneration.from_pretrained(tiny_ckpt)
    got = M3ForConditionalGeneration.from_pretrained(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), got.state_dict().values()))
