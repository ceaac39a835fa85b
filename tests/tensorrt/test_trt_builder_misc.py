"""Builder plumbing: the missing-TensorRT message, build timeouts, report round-trip."""

from __future__ import annotations

import pytest

from trt_test_helpers import export_case


def test_missing_tensorrt_names_both_packages_and_the_install(monkeypatch):
    from m3_trt.export.tensorrt import _trt

    monkeypatch.setattr(_trt, "CANDIDATES", ("m3_no_such_tensorrt", "m3_no_such_tensorrt_rtx"))
    _trt._load.cache_clear()
    try:
        assert not _trt.trt_available()
        with pytest.raises(_trt.TensorRTUnavailable) as exc:
            _trt.import_trt()
        msg = str(exc.value)
        assert "m3_no_such_tensorrt:" in msg and "m3_no_such_tensorrt_rtx:" in msg
        assert "tensorrt-rtx-cu13-bindings==1.7.1.116" in msg
    finally:
        _trt._load.cache_clear()


@pytest.mark.trt
def test_build_timeout_cancels_and_writes_nothing(trt, tmp_path):
    from m3_trt.export.tensorrt import build_engine_from_onnx

    onnx_path, profiles = export_case("rmsnorm", "fp32", tmp_path)
    report = build_engine_from_onnx(onnx_path, tmp_path / "t.engine", profiles=profiles, timeout_s=0)
    assert not report.ok and report.stage == "build"
    assert report.error.startswith("build cancelled: timeout after")
    assert not (tmp_path / "t.engine").exists()
    # control: same build with time to spare
    assert build_engine_from_onnx(onnx_path, tmp_path / "t.engine", profiles=profiles, timeout_s=60).ok


@pytest.mark.trt
def test_report_json_round_trip(trt, tmp_path):
    import json

    from m3_trt.export.tensorrt import BuildReport, build_engine_from_onnx

    onnx_path, profiles = export_case("topk", "fp32", tmp_path)
    report = build_engine_from_onnx(onnx_path, tmp_path / "k.engine", profiles=profiles)
    assert BuildReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
