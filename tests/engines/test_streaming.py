"""Streaming build: memory flat in depth, per-layer resume after SIGKILL, resume never mixes inputs.

* Peak RSS of ``build-engine --target cpu`` (weights stage; ``--set onnx=false`` keeps the test
  inside its time budget) at 12 layers is within 1.25x of the same width at 4 layers, measured
  per subprocess (getrusage of a small parent). Negative control: loading the whole model (what the build did
  before) at the same two depths grows beyond 1.25x, so the bound can fail.
* A build killed with SIGKILL after layer k resumes at layer k (the killed run's pieces are
  kept) and its output hashes the same as an uninterrupted build; a planted half-written
  ``.onnx.partial.*`` folder is cleaned.
* ``--resume`` with a different checkpoint starts over: every weight equals the new checkpoint's.
"""

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
from safetensors.torch import load_file

from m3_trt.build.builder import build
from m3_trt.model.modeling import M3ForConditionalGeneration
from m3_trt.model.shard import Layout, shard_state
from m3_trt.build.targets import load_target
from m3_trt.quant.fp8 import dequantize_fp8, is_fp8_weight, quantize_weight
from m3_trt.runtime.load import load_rank
from memory_util import MEMORY_RATIO, make_wide, peak_mib as _peak_mib  # shared with tests/test_compare_streamed.py


def _tree_hash(d: Path, skip=("build.json",)) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file() and p.name not in skip):
        h.update(str(f.relative_to(d)).encode() + f.read_bytes())
    return h.hexdigest()


def test_build_peak_rss_flat_in_depth(tmp_path):
    peaks, whole = {}, {}
    for n in (4, 12):
        ck = make_wide(tmp_path / f"c{n}", n)
        peaks[n] = _peak_mib([sys.executable, "-m", "m3_trt.cli.main", "build-engine", str(ck), "--target", "cpu",
                              "--out", str(tmp_path / f"o{n}"), "--set", "onnx=false", "--no-progress"])
        # negative control: the whole model in memory (the build's former first step)
        whole[n] = _peak_mib([sys.executable, "-c", "import sys; from m3_trt.model.modeling import M3ForConditionalGeneration"
                              " as M; M.from_pretrained(sys.argv[1])", str(ck)])
    print(f"peak RSS MiB: streaming build {peaks}, whole-model load {whole}")
    assert peaks[12] <= MEMORY_RATIO * peaks[4], peaks
    assert whole[12] > MEMORY_RATIO * whole[4], whole  # the bound catches a build that holds the model
    got = load_file(str(tmp_path / "o12" / "rank0" / "weights.safetensors"))
    assert len(got) == len(M3ForConditionalGeneration.from_pretrained(tmp_path / "c12").state_dict())


def _kill_after(cmd: list[str], parts: Path, piece: str) -> None:
    env = dict(os.environ, M3_TRT_BUILD_PART_DELAY_S="1")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if parts.is_file() and f'"piece": "{piece}"' in parts.read_text():
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL


def test_sigkill_at_layer_resumes_there_and_hashes_the_same(tiny_ckpt, tmp_path):
    sets = {"onnx": False, "tp": 2, "ep": 2}
    ref = tmp_path / "ref"
    build(tiny_ckpt, load_target("cpu", sets), ref, progress=False)
    out = tmp_path / "eng"
    work = tmp_path / ".eng.partial"
    cmd = [sys.executable, "-m", "m3_trt.cli.main", "build-engine", str(tiny_ckpt), "--target", "cpu", "--out", str(out),
           "--set", "onnx=false", "--set", "tp=2", "--set", "ep=2", "--no-progress"]
    _kill_after(cmd, work / "parts.jsonl", "layer.1")
    done = [json.loads(line)["piece"] for line in (work / "parts.jsonl").read_text().splitlines()]
    assert "layer.1" in done and "head" not in done, done
    junk = work / "rank0" / ".onnx.partial.x1y2"  # what a killed exporter leaves
    junk.mkdir(parents=True)
    (junk / "layer_0.data").write_bytes(b"half")
    m = build(tiny_ckpt, load_target("cpu", sets), out, resume=True, progress=False)
    kept = m["pieces_kept_on_resume"]
    assert kept["rank0"] >= 3 and kept["rank1"] >= 2, kept  # embedding, layer.0, layer.1 (rank 1 may lag one)
    assert not list(out.rglob(".*.partial*"))
    assert _tree_hash(out) == _tree_hash(ref)
    # negative control: the hash sees a single changed byte of a rank file
    f = out / "rank1" / "weights.safetensors"
    b = bytearray(f.read_bytes())
    b[-1] ^= 1
    f.write_bytes(bytes(b))
    assert _tree_hash(out) != _tree_hash(ref)


def test_resume_with_another_checkpoint_starts_over(tiny_ckpt, tmp_path):
    from m3_trt.checkpoints.tiny import make_tiny

    other = make_tiny(tmp_path / "other", seed=1)
    out = tmp_path / "eng"
    cmd = [sys.executable, "-m", "m3_trt.cli.main", "build-engine", str(tiny_ckpt), "--target", "cpu", "--out", str(out),
           "--set", "onnx=false", "--no-progress"]
    _kill_after(cmd, tmp_path / ".eng.partial" / "parts.jsonl", "layer.1")
    m = build(other, load_target("cpu", {"onnx": False}), out, resume=True, progress=False)
    assert m["reused"] == [] and m["pieces_kept_on_resume"] == {"rank0": 0}, m["pieces_kept_on_resume"]
    got = load_file(str(out / "rank0" / "weights.safetensors"))
    new = M3ForConditionalGeneration.from_pretrained(other)
    old = M3ForConditionalGeneration.from_pretrained(tiny_ckpt)
    ref = shard_state(new.state_dict(), new.config.text, Layout(), 0)
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref), "a weight differs from the new checkpoint's"
    # negative control: the killed run's checkpoint really differs in the pieces it had written
    emb = "model.language_model.embed_tokens.weight"
    assert not torch.equal(old.state_dict()[emb], got[emb])


def test_streaming_reader_names_a_non_finite_weight(tiny_ckpt, tmp_path):
    """The piece reader keeps load_into's rule: a NaN / Inf anywhere in a piece is a named error."""
    import shutil

    import pytest
    from safetensors.torch import save_file

    from m3_trt.model.checkpoint import CheckpointError
    from m3_trt.model.pieces import PieceModel

    for bad in (float("nan"), float("-inf")):
        ck = Path(shutil.copytree(tiny_ckpt, tmp_path / f"bad{bad}"))
        index = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]
        key = "language_model.model.layers.2.self_attn.o_proj.weight"
        shard = ck / index[key]
        tensors = load_file(str(shard))
        tensors[key][3, 5] = bad
        save_file(tensors, str(shard), metadata={"format": "pt"})
        pm = PieceModel(ck)
        with pm.loaded("layer.1"):
            pass  # other pieces still load
        with pytest.raises(CheckpointError, match=f"{key}: contains non-finite"):
            with pm.loaded("layer.2"):
                pass


def test_workers_pool_writes_the_serial_bytes_and_too_many_are_refused(tiny_ckpt, tmp_path, capsys):
    from m3_trt.cli.main import main
    from m3_trt.model.config import M3Config
    from m3_trt.build.plan import host_memory

    sets = {"onnx": False, "tp": 2, "ep": 2, "weight_dtype": "fp8", "dtype": "bf16"}
    serial = build(tiny_ckpt, load_target("cpu", sets), tmp_path / "serial", progress=False)
    pooled = build(tiny_ckpt, load_target("cpu", sets), tmp_path / "pooled", progress=False, workers=2)
    assert pooled["host_memory"]["workers"] == 2 and serial["host_memory"]["workers"] == 1
    assert _tree_hash(tmp_path / "pooled") == _tree_hash(tmp_path / "serial")
    assert not (tmp_path / "pooled" / "spool").exists()
    _reads_back_per_channel(tiny_ckpt, tmp_path / "serial", Layout.of(2, 2))
    # the plan states the host memory N workers need and refuses what the host does not have
    h = host_memory(M3Config.from_pretrained(tiny_ckpt), 4, available=1 << 40)
    assert h["fits"] and h["need_bytes"] == 4 * h["per_worker_bytes"] + (1 << 30)
    assert not host_memory(M3Config.from_pretrained(tiny_ckpt), 4, available=h["need_bytes"] - 1)["fits"]
    assert main(["build-engine", str(tiny_ckpt), "--dry-run", "--workers", "100000"]) == 2
    err = capsys.readouterr().err
    assert "--workers 100000 does not fit this host" in err and "GiB available" in err, err


def _reads_back_per_channel(ckpt: Path, build_dir: Path, lay: Layout) -> None:
    """A bf16 checkpoint's sharded FP8 build, read back with ``load_rank``: every FP8 weight is the
    reference per-channel FP8 of the rank's slice (cast to bf16, one fp32 scale per output row,
    dequantized, in bf16) exactly. Negative control: the unquantized slice is not what it holds."""
    ref = M3ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    plain = {}
    for r in range(lay.world):
        got = load_rank(build_dir, r).state_dict()
        for k, w in shard_state(ref.state_dict(), ref.config.text, lay, r).items():
            if is_fp8_weight(k, w):
                q, s = quantize_weight(w.to(torch.bfloat16))
                assert s.shape == (*w.shape[:-1], 1)
                want = dequantize_fp8(q, s, torch.float32).to(torch.bfloat16)
                assert torch.equal(got[k], want), (r, k)
                plain[(r, k)] = (got[k], w.to(torch.bfloat16))
    assert len(plain) > 40
    assert not any(torch.equal(g, w) for g, w in plain.values())
