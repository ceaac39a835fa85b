"""The README's main command, end to end on the tiny checkpoint: every stage runs and both
comparisons (the live Triton server over gRPC, and ONNX Runtime layer by layer) pass."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pytriton")


def test_demo_runs_every_stage_and_comparisons_pass(tmp_path, capsys):
    from m3_trt.cli.demo import DemoOptions, run_demo

    rc = run_demo(DemoOptions(workdir=tmp_path / "demo", max_tokens=6))
    out = capsys.readouterr().out
    assert rc == 0, out[-4000:]
    for stage in ("1. make-tiny", "3. build-engine --target cpu", "5. triton-repo",
                  "6. tritonserver + gRPC client", "7. compare: live server", "8. compare: ONNX Runtime"):
        assert stage in out
    assert "server stopped" in out
    triton = json.loads((tmp_path / "demo" / "compare-triton" / "report.json").read_text())
    onnx = json.loads((tmp_path / "demo" / "compare-onnxruntime" / "report.json").read_text())
    assert triton["verdict"] == onnx["verdict"] == "pass"
    assert all(g["first_divergence"] is None for g in triton["greedy"])
    assert (tmp_path / "demo" / "build-cpu" / "build.json").is_file()
