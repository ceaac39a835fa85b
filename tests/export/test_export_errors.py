"""Export's bad inputs get clear errors, and an interrupted export leaves nothing behind."""

from __future__ import annotations

import json
import shutil

import pytest

from m3_trt.cli.main import main
from m3_trt.export.onnx import export_model
from m3_trt.export.onnx import exporter as exporter_mod


def test_unknown_dtype_and_plugins(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="dtype='int4'"):
        export_model(tiny_ckpt, tmp_path / "x", dtype="int4")
    with pytest.raises(ValueError, match="plugins='trt'"):
        export_model(tiny_ckpt, tmp_path / "x", plugins="trt")
    assert not (tmp_path / "x").exists()


def test_invalid_checkpoint_named_by_cli(tiny_ckpt, tmp_path, capsys):
    bad = shutil.copytree(tiny_ckpt, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["num_key_value_heads"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["export", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "num_key_value_heads" in err and "3" in err
    assert not (tmp_path / "out").exists()


def test_existing_output_folder_refused(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["export", str(tiny_ckpt), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError], ids=["ctrl-c", "error"])
def test_interrupted_export_leaves_no_folder(tiny_ckpt, tmp_path, monkeypatch, exc):
    calls = []
    real = exporter_mod.export_spec

    def flaky(spec, *args, **kwargs):
        calls.append(spec.name)
        if len(calls) == 3:
            raise exc("interrupted in the middle of the export")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(exporter_mod, "export_spec", flaky)
    with pytest.raises(exc):
        export_model(tiny_ckpt, tmp_path / "out", plugins="none", max_seq_len=32, progress=None)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == [], "partial export left behind"


def test_fp16_export_within_fp16_tolerance(tiny_ckpt, tmp_path):
    from tolerances import TOLERANCES

    out = export_model(tiny_ckpt, tmp_path / "fp16", dtype="fp16", plugins="none", max_seq_len=32, verify=True,
                       progress=None)
    v = json.loads((out / "manifest.json").read_text())["verify"]
    assert v["tolerance"] == TOLERANCES[("onnx_component", "fp16")]
    worst = max(max(r["rel_err"].values()) for r in v["components"].values())
    assert v["ok"] and 0 < worst <= v["tolerance"]
