"""build-engine orchestration: Ctrl-C leaves old-or-nothing; resume (runs from builds: test_onnx_build.py)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from m3_trt.build.builder import build
from m3_trt.build.targets import load_target


def _tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(d)).encode() + f.read_bytes())
    return h.hexdigest()


def test_sigint_leaves_previous_output_and_resume_skips_verified(tiny_ckpt, tmp_path):
    out = tmp_path / "eng"
    tgt = {"onnx": False, "tp": 2, "ep": 2}
    build(tiny_ckpt, load_target("cpu", tgt), out, progress=False)
    before = _tree_hash(out)
    work = tmp_path / ".eng.partial"
    env = dict(os.environ, M3_TRT_BUILD_PIECE_DELAY_S="3")
    cmd = [sys.executable, "-m", "m3_trt.cli.main", "build-engine", str(tiny_ckpt), "--target", "cpu", "--out", str(out),
           "--set", "onnx=false", "--set", "tp=2", "--set", "ep=2", "--no-progress"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    journal = work / "journal.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (journal.is_file() and journal.read_text().count("\n") >= 1):
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    log = p.communicate(timeout=60)[0].decode()
    assert p.returncode != 0, log
    assert _tree_hash(out) == before, "the previous complete output changed"
    assert not list(work.rglob("*.tmp")) and not (work / "build.json").exists()
    done = [json.loads(line)["piece"] for line in journal.read_text().splitlines()]
    assert done == ["rank0/weights"], done
    # resume: the verified piece is kept, the rest computed
    m = build(tiny_ckpt, load_target("cpu", tgt), out, resume=True, progress=False)
    assert m["reused"] == ["rank0/weights"] and m["computed"] == ["rank1/weights", "trtllm"]
    assert not work.exists()
    # a corrupted journaled piece is recomputed, not trusted
    work.mkdir()
    (work / "rank0").mkdir()
    (work / "rank0" / "weights.safetensors").write_bytes(b"corrupt")
    (work / "journal.jsonl").write_text(json.dumps({"piece": "rank0/weights", "files": {
        "rank0/weights.safetensors": "0" * 64}}) + "\n")
    m = build(tiny_ckpt, load_target("cpu", tgt), out, resume=True, progress=False)
    assert m["reused"] == [] and "rank0/weights" in m["computed"]


def test_interrupt_without_previous_output_leaves_none(tiny_ckpt, tmp_path):
    out = tmp_path / "fresh"
    env = dict(os.environ, M3_TRT_BUILD_PIECE_DELAY_S="3")
    cmd = [sys.executable, "-m", "m3_trt.cli.main", "build-engine", str(tiny_ckpt), "--target", "cpu", "--out", str(out),
           "--set", "onnx=false", "--no-progress"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    journal = tmp_path / ".fresh.partial" / "journal.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not journal.is_file():
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=60)
    assert p.returncode != 0 and not out.exists()
