"""``m3-trt compare --backend onnxruntime`` on the tiny export: passes fp32, and names a corrupted layer."""

from __future__ import annotations

import json
import shutil

import pytest


def _compare(out, ckpt, **kw) -> tuple[int, dict]:
    from m3_trt.compare.cli import CompareOptions, cmd_compare

    rc = cmd_compare(CompareOptions(ckpt=ckpt, out=out, **kw))
    return rc, json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("mode", ["m3", "none"], ids=["plugins-m3", "plugins-none"])
def test_onnxruntime_backend_passes_fp32_layer_by_layer(tiny_ckpt, tiny_export, tmp_path, mode):
    rc, rep = _compare(tmp_path / "cmp", tiny_ckpt, backend="onnxruntime", backend_path=tiny_export(mode),
                       layers=True, tokens=4)
    assert rc == 0 and rep["verdict"] == "pass"
    names = {c["name"] for c in rep["components"]}
    assert {"vision_encoder", "projector", "embedding", "indexer.1", "indexer.2", "final_norm", "logits"} <= names
    assert all(c["worst"] == 1.0 for c in rep["components"] if c["name"].startswith("indexer."))
    assert rep["end_to_end"]["top1"] == 1.0


def test_onnxruntime_backend_names_the_corrupted_layer(tiny_ckpt, tiny_export, tmp_path):
    """Scrambling layer 2's weight file: layers 0-1 still pass, layer 2 is named first."""
    work = shutil.copytree(tiny_export("none"), tmp_path / "bad")
    raw = bytearray((work / "layer_2.data").read_bytes())
    raw[:256] = bytes(reversed(raw[:256]))
    (work / "layer_2.data").write_bytes(bytes(raw))
    rc, rep = _compare(tmp_path / "cmp", tiny_ckpt, backend="onnxruntime", backend_path=work, layers=True, tokens=0)
    assert rc == 1 and rep["verdict"] == "fail"
    assert rep["first_failure"]["what"] == "layer.2", rep["first_failure"]
    ok = {c["name"]: c["ok"] for c in rep["components"]}
    assert ok["layer.0"] and ok["layer.1"] and not ok["layer.2"]


def test_backend_path_and_dtype_mismatch_are_errors(tiny_ckpt, tiny_export):
    from m3_trt.export.runtime import load_for_compare

    with pytest.raises(ValueError, match="needs --backend-path"):
        load_for_compare(None)
    with pytest.raises(ValueError, match="is fp32, the comparison asked for bf16"):
        load_for_compare(tiny_export("none"), dtype="bf16")
