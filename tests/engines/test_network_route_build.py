"""``build-engine --set backend=tensorrt --set trt_route=network``: the network-API route as a build route.

One build of the tiny checkpoint (fp32, max_seq_len 64), interrupted at layer_2's engine and
resumed through the CLI (``--resume`` keeps the finished engines): every text component's
engine is written layer by layer with TensorRT-RTX's network API (streamed one checkpoint piece at
a time), shadow-checked against the torch component (``TOLERANCES[("trt_network_shadow",
"fp32")]`` = 1e-5 relative L2, block choices exact), its IO compared with the ONNX component's;
the vision engines come from their ONNX graphs. Engines cannot run without a GPU: the report says
so. Negative controls: a writer bug (a causal mask that shows every slot) fails the build's check
before anything is built; the combinations the route cannot run are refused with the reason.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest

from tolerances import TOLERANCES

SETS = ["backend=tensorrt", "trt_route=network", "max_seq_len=64", "max_input_len=48", "max_num_tokens=64"]
NETWORK = ["embedding", "layer_0", "layer_1", "layer_2", "layer_3", "head"]


@pytest.mark.parametrize("sets,why", [
    (["trt_route=graph"], r"trt_route = 'graph': choose one of \('onnx', 'network'\)"),
    (["trt_route=network"], r"backend = 'onnxruntime' builds none"),
    (["backend=tensorrt", "trt_route=network", "tp=2", "gpus=2"], r"one-rank networks only .* 2 ranks"),
    (["backend=tensorrt", "trt_route=network", "weight_dtype=fp8"], r"no FP8 Q/DQ weights or FP8 KV cache"),
    (["backend=tensorrt", "trt_route=network", "kv_cache_dtype=fp8"], r"no FP8 Q/DQ weights or FP8 KV cache"),
    (["backend=tensorrt", "trt_route=network", "onnx=false"], r"needs onnx = true"),
], ids=["unknown", "onnxruntime", "two-ranks", "fp8-weights", "fp8-kv", "no-onnx"])
def test_network_route_refuses_what_it_cannot_build(sets, why):
    from m3_trt.build.targets import load_target, parse_sets

    with pytest.raises(ValueError, match=why):
        load_target("cpu", parse_sets(sets))


def test_trt_route_is_a_described_target_field(tiny_ckpt, capsys):
    from m3_trt.build.targets import describe, load_target
    from m3_trt.cli.main import main

    assert load_target("h100x1-bf16").trt_route == "onnx"
    assert re.search(r"^ +trt_route +network$", describe(load_target("h100x1-bf16", {"trt_route": "network"})), re.M)
    rc = main(["build-engine", str(tiny_ckpt), "--target", "cpu", "--set", "trt_route=network", "--dry-run"])
    assert rc == 2 and "trt_route = 'network'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def network_build(tiny_ckpt, tmp_path_factory):
    """The build, interrupted (a simulated Ctrl-C) at layer_2's engine, then resumed through the CLI."""
    from m3_trt.build.builder import build
    from m3_trt.build.targets import load_target, parse_sets
    from m3_trt.cli.main import main
    from m3_trt.export import tensorrt_build
    from m3_trt.export.tensorrt import trt_available, trt_unavailable_reason

    if not trt_available():
        pytest.skip(trt_unavailable_reason())
    out = tmp_path_factory.mktemp("netbuild") / "build"
    check = tensorrt_build.check_component

    def interrupt_at_layer_2(model, name, **kw):
        if name == "layer_2":
            raise KeyboardInterrupt("simulated Ctrl-C")
        return check(model, name, **kw)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(tensorrt_build, "check_component", interrupt_at_layer_2)
        build(tiny_ckpt, load_target("cpu", parse_sets(SETS)), out, progress=False)
    assert not out.exists()
    argv = ["build-engine", str(tiny_ckpt), "--target", "cpu", "--out", str(out), "--resume", "--no-progress"]
    assert main(argv + [a for s in SETS for a in ("--set", s)]) == 0
    return out, json.loads((out / "build.json").read_text())


@pytest.mark.trt
def test_build_writes_network_engines_checked_against_torch(network_build):
    out, manifest = network_build
    engines = manifest["onnx"]["engines"]
    assert engines["route"] == "network" and engines["failed"] == [] and engines["executed"] is False
    assert "not executed" in engines["note"] and "SM90" in engines["note"]
    reports = engines["reports"]["rank0/engines"]
    assert list(reports) == NETWORK + ["vision_encoder", "projector"]
    tol = TOLERANCES[("trt_network_shadow", "fp32")]
    for name, rep in reports.items():
        plan = out / "rank0" / "onnx" / rep["engine_path"]
        assert rep["ok"] and plan.stat().st_size == rep["engine_bytes"] > 0, name
        assert manifest["files"][f"rank0/onnx/{rep['engine_path']}"] == hashlib.sha256(plan.read_bytes()).hexdigest()
        if name in NETWORK:
            assert rep["route"] == "network" and rep["io_diff"] == [], name
            assert rep["shadow"]["ok"] and 0 <= rep["shadow"]["max_rel_err"] <= tol, name
            assert rep["deserialize"]["ok"] is False  # no GPU: TensorRT-RTX cannot load it here
        else:
            assert rep["route"] == "onnx"
    layer = reports["layer_1"]  # sparse: native attention + three cache updates, block choices checked
    assert layer["layer_types"]["ATTENTION_OUTPUT"] == 1 and layer["layer_types"]["KV_CACHE_UPDATE"] == 3
    assert all(row["block_idx"]["equal"] for row in layer["shadow"]["cases"].values())
    assert engines["verification"]["max_rel_err"].keys() == set(NETWORK)
    # resumed at the engine the interrupted build had not finished
    assert {"rank0/onnx", "rank0/engines/embedding", "rank0/engines/layer_0", "rank0/engines/layer_1"} \
        <= set(manifest["reused"])
    assert {f"rank0/engines/{n}" for n in NETWORK[3:] + ["vision_encoder", "projector"]} | {"rank0/engines"} \
        <= set(manifest["computed"])
    assert ".partial" not in json.dumps(reports)


@pytest.mark.trt
def test_network_build_feeds_the_gpu_repository_layout(network_build):
    from m3_trt.serving.tensorrt_repo import resolve_build

    out, _ = network_build
    build = resolve_build(out)
    assert build.engines["vision_tower"][0] == out.resolve() / "rank0" / "onnx" / "engines" / "vision_encoder.plan"


@pytest.mark.trt
def test_a_writer_bug_fails_the_build_check(network_build, tiny_ckpt, tmp_path, monkeypatch):
    """Negative control: a causal mask that lets every query see every cache slot (the network
    would still build) is caught by the shadow check, before any engine is built."""
    from m3_trt.export.tensorrt import network_model
    from m3_trt.export.tensorrt_build import network_route_engines
    from m3_trt.model.pieces import PieceModel

    out, _ = network_build
    export = tmp_path / "onnx"
    export.mkdir()
    shutil.copy(out / "rank0" / "onnx" / "manifest.json", export / "manifest.json")

    def sees_everything(w, pos_BS, T):
        slots = network_model.slot_positions(w, T)
        return w.ew(slots, slots, "EQUAL")
    monkeypatch.setattr(network_model, "causal_keep", sees_everything)
    with pytest.raises(RuntimeError, match=r"rank0/engines/layer_0: .* differs from the torch component .*"
                                           r"prefill/hidden_out: rel err"):
        network_route_engines(PieceModel(tiny_ckpt), export, dtype="fp32", max_batch=1, max_seq_len=64,
                              piece=lambda name, make: make(), log=lambda m: None, only=["layer_0"])
    assert not (export / "engines" / "layer_0.plan").exists()
