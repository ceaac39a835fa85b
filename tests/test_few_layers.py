"""``compare --first-layers N``: few-layer validation, streamed; passes correct backends, names a corrupted layer."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from m3_trt.cli.main import main
from m3_trt.compare.few_layers import run_first_layers
from m3_trt.compare.tolerances import FEW_LAYER_COS_MIN, FEW_LAYER_REL_MAX

# One prompt of ~90 tokens: 6 key blocks of 16 for top-3 selection in the sparse layers.
PROMPT = ("Write three sentences about compilers, GPUs and the weather in spring; then list five colours, "
          "count to ten, and name the planets of the solar system in order from the sun.")
LAYERS = 3  # full-dense, sparse-moe, sparse-dense


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    f = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    f.write_text(json.dumps({"name": "long", "prompt": PROMPT}) + "\n")
    return f


def _isolated(rep, component):
    return [r for r in rep["rows"] if r["component"] == component and r["mode"] == "isolated"]


def _corrupt_layer2(src, dst):
    """The checkpoint with layer 2's o_proj negated (a sign error in one weight)."""
    work = shutil.copytree(src, dst)
    key = "language_model.model.layers.2.self_attn.o_proj.weight"
    shard = work / json.loads((work / "model.safetensors.index.json").read_text())["weight_map"][key]
    state = load_file(shard)
    state[key] = -state[key]
    save_file(state, shard, metadata={"format": "pt"})
    return work


def test_torch_bf16_passes_and_a_corrupted_layer_is_named(tiny_ckpt, prompts, tmp_path):
    rep = run_first_layers(tiny_ckpt, n_layers=LAYERS, backend="torch", dtype="bf16", prompts=prompts,
                           decode_steps=1, progress=lambda m: None)
    assert rep["verdict"] == "pass", rep["first_failure"]
    steps = {r["step"] for r in rep["rows"]}
    assert steps == {"prefill", "decode.1"}
    for i in range(LAYERS):
        rows = _isolated(rep, f"layer.{i}")
        assert len(rows) == 2 and all(r["cos"] > 0.99 for r in rows)
        assert all(0 < r["rel"] < 0.1 for r in rows)  # bf16: a real, small difference
    # negative control, through the CLI: layer 2 wrong -> exit 1, layer 2 named, layers 0-1 pass
    bad = _corrupt_layer2(tiny_ckpt, tmp_path / "bad")
    rc = main(["compare", str(tiny_ckpt), "--backend", "torch", "--backend-path", str(bad), "--first-layers",
               str(LAYERS), "--tokens", "1", "--prompts", str(prompts), "--out", str(tmp_path / "cmp")])
    rep = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert rc == 1 and rep["verdict"] == "fail" and rep["mode"] == "first-layers"
    f = rep["first_failure"]
    assert (f["component"], f["mode"], f["step"]) == ("layer.2", "isolated", "prefill"), f
    assert f["cos"] < FEW_LAYER_COS_MIN or f["rel"] > FEW_LAYER_REL_MAX
    assert all(r["ok"] for r in _isolated(rep, "layer.0") + _isolated(rep, "layer.1"))


def test_onnx_export_passes_and_a_corrupted_layer_is_named(tiny_ckpt, tiny_export, prompts, tmp_path):
    export = tiny_export("none")
    rep = run_first_layers(tiny_ckpt, n_layers=LAYERS, backend="onnxruntime", backend_path=export,
                           prompts=prompts, decode_steps=1, progress=lambda m: None)
    assert rep["verdict"] == "pass", rep["first_failure"]
    # fp32 vs fp32: far inside the gate, as the per-dtype table expects (1e-5)
    assert all(r["rel"] < 1e-5 for r in rep["rows"] if r["mode"] == "isolated")
    work = shutil.copytree(export, tmp_path / "bad")
    raw = bytearray((work / "layer_2.data").read_bytes())
    raw[:256] = bytes(reversed(raw[:256]))
    (work / "layer_2.data").write_bytes(bytes(raw))
    rep = run_first_layers(tiny_ckpt, n_layers=LAYERS, backend="onnxruntime", backend_path=work,
                           prompts=prompts, decode_steps=1, progress=lambda m: None)
    assert rep["verdict"] == "fail" and rep["first_failure"]["component"] == "layer.2", rep["first_failure"]


def test_bad_requests_are_named(tiny_ckpt, prompts):
    with pytest.raises(ValueError, match="checkpoint has 4 decoder layers"):
        run_first_layers(tiny_ckpt, n_layers=5, backend="torch", prompts=prompts)
    with pytest.raises(ValueError, match="supports the backends torch, onnxruntime, sharded, not 'transformers'"):
        run_first_layers(tiny_ckpt, n_layers=1, backend="transformers", prompts=prompts)
    with pytest.raises(ValueError, match="--backend sharded needs --backend-path"):
        run_first_layers(tiny_ckpt, n_layers=1, backend="sharded", prompts=prompts)
    assert main(["compare", str(tiny_ckpt), "--backend", "torch", "--first-layers", "1", "--fp8-emulate"]) == 2
