"""``build-engine --set backend=tensorrt``: per-rank engines built by TensorRT-RTX, recorded in build.json."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.trt


@pytest.mark.parametrize("ranks", [1, 2], ids=["W1", "W2-TP2"])
def test_build_records_an_engine_per_graph(tiny_ckpt, tmp_path, ranks):
    from m3_trt.build.builder import build
    from m3_trt.export.tensorrt import trt_available, trt_unavailable_reason
    from m3_trt.build.targets import load_target

    if not trt_available():
        pytest.skip(trt_unavailable_reason())
    overrides = {"backend": "tensorrt", "max_seq_len": 64, "max_input_len": 48, "max_num_tokens": 64}
    if ranks == 2:
        overrides.update(tp=2, gpus=2)
    out = tmp_path / "build"
    build(tiny_ckpt, load_target("cpu", overrides), out, progress=False)
    manifest = json.loads((out / "build.json").read_text())
    reports = manifest["onnx"]["engines"]["reports"]
    flat = {f"{group}/{name}": r for group, rs in reports.items() for name, r in rs.items()}
    assert flat and all(r["ok"] for r in flat.values()), {k: r["error"] for k, r in flat.items() if not r["ok"]}
    assert all(r["engine_bytes"] > 0 for r in flat.values())
    if ranks == 1:
        assert {"rank0/engines/layer_1", "rank0/engines/head"} <= set(flat)
        assert (out / "rank0" / "onnx" / "engines" / "layer_1.plan").stat().st_size == flat["rank0/engines/layer_1"]["engine_bytes"]
    else:
        assert any(k.startswith("rank1/engines/") for k in flat)
    assert ".partial" not in json.dumps(reports)
