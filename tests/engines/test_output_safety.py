"""build-engine / export never delete what they were not asked to replace; bad target numbers are named.

Probe cases of issue 10 (items 2, 9, 10) rebuilt: ``--out`` pointing at a user's folder, at the
checkpoint, inside it, or at a folder containing it is refused (exit 2, the folder untouched);
a previous build is replaced; ``--overwrite`` replaces a user's folder (the negative control that
shows the refusal is the check, not a broken build).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from m3_trt.cli.main import main

FAST = ["--set", "onnx=false", "--no-progress"]


def _tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(d)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture()
def nested_ckpt(tiny_ckpt, tmp_path) -> Path:
    """A copy of the tiny checkpoint at ``tmp/parent/ckpt`` (the session one must never be at risk)."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "parent" / "ckpt"))


def test_build_refuses_user_folder_and_checkpoint_paths(nested_ckpt, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.txt").write_text("irreplaceable")
    assert main(["build-engine", str(nested_ckpt), "--out", str(user), *FAST]) == 2
    err = capsys.readouterr().err
    assert "not a previous build-engine output" in err and str(user) in err, err
    assert (user / "thesis.txt").read_text() == "irreplaceable"

    before = _tree_hash(nested_ckpt.parent)
    for out, how in ((nested_ckpt, "is the input"), (nested_ckpt / "sub", "is inside the input"),
                     (nested_ckpt.parent, "contains the input")):
        assert main(["build-engine", str(nested_ckpt), "--out", str(out), *FAST, "--overwrite"]) == 2, out
        err = capsys.readouterr().err
        assert how in err, (out, err)
    assert _tree_hash(nested_ckpt.parent) == before, "the checkpoint changed"
    assert not (nested_ckpt / "sub").exists()

    # negative control: --overwrite is what lets a user folder be replaced
    assert main(["build-engine", str(nested_ckpt), "--out", str(user), *FAST, "--overwrite"]) == 0
    assert (user / "build.json").is_file() and not (user / "thesis.txt").exists()
    # a previous build of ours is replaced without --overwrite
    (user / "stale.txt").write_text("left in the previous build")
    assert main(["build-engine", str(nested_ckpt), "--out", str(user), *FAST]) == 0
    assert (user / "build.json").is_file() and not (user / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "parent"], "a .partial / .old sibling left"


def test_export_refuses_user_folder_and_checkpoint_paths(nested_ckpt, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.md").write_text("keep")
    assert main(["export", str(nested_ckpt), str(user)]) == 2
    assert "not a previous export output" in capsys.readouterr().err
    assert (user / "notes.md").read_text() == "keep"
    before = _tree_hash(nested_ckpt.parent)
    for out in (nested_ckpt, nested_ckpt / "onnx", nested_ckpt.parent):
        assert main(["export", str(nested_ckpt), str(out), "--overwrite"]) == 2
        assert "the input" in capsys.readouterr().err
    assert _tree_hash(nested_ckpt.parent) == before


@pytest.mark.parametrize("setting, field", [
    ("gpu_memory_gib=inf", "gpu_memory_gib"), ("gpu_memory_gib=nan", "gpu_memory_gib"),
    ("runtime_reserve_gib=-100", "runtime_reserve_gib"), ("runtime_reserve_gib=20", "runtime_reserve_gib"),
    ("max_seq_len=100000000", "max_seq_len"), ("max_images=-1", "max_images"), ("tp=0", "tp")])
def test_target_numbers_out_of_range_are_named(tiny_ckpt, setting, field, capsys):
    assert main(["build-engine", str(tiny_ckpt), "--dry-run", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert f"{field} = " in err and "Traceback" not in err, err


def test_valid_edge_values_still_plan(tiny_ckpt, capsys):
    """Negative control for the range checks: zero reserve and a large finite GPU still plan."""
    assert main(["build-engine", str(tiny_ckpt), "--dry-run", "--set", "runtime_reserve_gib=0",
                 "--set", "gpu_memory_gib=4096"]) == 0
    assert "fits: yes" in capsys.readouterr().out
