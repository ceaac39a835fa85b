"""Builds of the network route in a child process: one long-lived worker that writes and builds
the networks it is asked for, reading weights one piece at a time.

Why a child: TensorRT can abort the process on some build paths (docs/tensorrt_rtx.md), so no
build runs in the caller. Why one long-lived child: starting Python + torch + TensorRT costs
seconds, several times a tiny component's build; the worker starts once and builds every
component, and a worker that dies (signal, timeout) is reported for that component and replaced
for the next one.

Weights: with a checkpoint source the worker holds :class:`m3_trt.model.pieces.PieceModel` (the
model on ``meta``) and materializes only the piece a component reads (the embedding, one decoder
layer, the head) while its network is written and built, so memory stays one piece. An in-memory
model (tests, benchmarks) is handed over once through a temporary ``torch.save`` file.

Protocol: requests are JSON lines on the worker's stdin; each answer is one JSON line (a
``BuildReport`` dict) on a private copy of its stdout, whose fd 1 is pointed at stderr so that
nothing TensorRT or a library prints can corrupt the answers. The worker's stderr goes to a
temporary file; its tail explains a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from m3_trt.export.tensorrt.builder import BuildReport
from m3_trt.export.tensorrt.network_model import build_one, component_plan, io_differences, network_limits
from m3_trt.model.modeling import DTYPES

def piece_of(name: str) -> str:
    """The checkpoint piece (:mod:`m3_trt.model.pieces`) component ``name``'s network reads."""
    if name.startswith("layer_"):
        return f"layer.{int(name.removeprefix('layer_'))}"
    if name in ("embedding", "head"):
        return name
    raise ValueError(f"{name!r}: the network route writes 'embedding', 'layer_<i>' and 'head' only")


class ModelHandoff:
    """Saves an in-memory model's config and state once into a temporary file the worker loads."""

    def __init__(self, model):
        self.model = model

    def __enter__(self) -> "ModelHandoff":
        import torch

        self._dir = tempfile.TemporaryDirectory(prefix="m3_trt_netbuild_")
        self.path = Path(self._dir.name) / "model.pt"
        torch.save({"config": self.model.config.to_hf_dict(), "state": self.model.state_dict()}, self.path)
        return self

    def __exit__(self, *exc) -> None:
        self._dir.cleanup()

    @property
    def source(self) -> dict:
        return {"handoff": str(self.path)}


def load_handoff(path: str | Path):
    import torch

    from m3_trt.model.config import M3Config
    from m3_trt.model.modeling import M3ForConditionalGeneration

    blob = torch.load(path, weights_only=True)
    with torch.device("meta"):
        model = M3ForConditionalGeneration(M3Config.from_dict(blob["config"]))
    model = model.to_empty(device="cpu")
    model.load_state_dict(blob["state"])
    return model.float().eval()


class NetworkBuilder:
    """The worker process, started on the first ``build`` (and again after one died).

    ``source``: ``{"checkpoint": dir, "dtype": "fp16"}`` (streamed piece by piece, in that dtype)
    or ``ModelHandoff.source``. Use as a context manager; ``close`` ends the worker.
    """

    def __init__(self, source: dict, *, timeout_s: float = 600.0):
        self.source, self.timeout_s = source, timeout_s
        self.proc: subprocess.Popen | None = None
        self._stderr = None
        self.started = 0  # worker processes started (a crash or timeout starts another)

    def __enter__(self) -> "NetworkBuilder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        if self._stderr is not None:  # the previous worker's, read by _lost already
            self._stderr.close()
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, json.dumps(self.source)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self.started += 1

    def _stderr_tail(self, n: int = 3000) -> str:
        f = self._stderr
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read().decode(errors="replace")

    def _lost(self, name: str, stage: str, why: str) -> dict:
        """The worker is gone (or killed here): a report for ``name``; the next build starts a new one."""
        if self.proc.poll() is None:
            self.proc.kill()
        rc = self.proc.wait()
        how = signal.Signals(-rc).name if rc < 0 else f"exit {rc}"
        err = f"{name}: {why} ({how}); stderr tail:\n{self._stderr_tail()}"
        self.proc = None
        return BuildReport(ok=False, stage=stage, error=err).to_dict()

    def build(self, name: str, engine_path, *, dtype: str, max_batch: int, max_seq_len: int,
              num_heads: int | None = None, deserialize: bool = True) -> dict:
        """Write component ``name`` and build it into ``engine_path``; always a report dict.

        Stage 'write-network' when writing raised (the exception's text), 'crashed' when the worker
        died, 'timeout' past ``timeout_s``. With ``deserialize`` a built engine is also loaded in
        the worker (``report["deserialize"]``: ``{"ok", "error"}``): on a host without a GPU
        TensorRT-RTX refuses, and the report keeps its words.
        """
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        req = dict(name=name, engine_path=str(engine_path), dtype=dtype, max_batch=max_batch, max_seq_len=max_seq_len,
                   num_heads=num_heads, timeout_s=self.timeout_s, deserialize=deserialize)
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._lost(name, "crashed", "build worker died before the request")
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s + 60)
        if not ready:
            return self._lost(name, "timeout", f"build worker killed after {self.timeout_s + 60:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            return self._lost(name, "crashed", "build worker died")
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def build_network_engines(model, out_dir, *, dtype: str = "fp16", max_batch: int = 4, max_seq_len: int = 128,
                          manifest: dict | str | Path | None = None, only: list[str] | None = None,
                          timeout_s: float = 600.0, progress=print) -> dict[str, dict]:
    """Network-route engines for embedding, every decoder layer and the head of an in-memory
    ``model`` into ``out_dir`` (tests, benchmarks; ``build-engine`` streams a checkpoint instead:
    ``m3_trt.export.tensorrt_build.network_route_engines``).

    Returns ``{component: BuildReport dict}`` (also ``out_dir/report.json``); with an ONNX
    ``manifest`` each report gains ``io_diff`` (empty when the IO equals the ONNX component's).
    """
    limits = network_limits(model.config.text, max_seq_len, dtype)
    if limits:
        raise ValueError("; ".join(limits))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(manifest, (str, Path)):
        manifest = json.loads(Path(manifest).read_text())
    entries = {c["name"]: c for c in (manifest or {}).get("components", [])}
    reports = {}
    with ModelHandoff(model) as handoff, NetworkBuilder(handoff.source, timeout_s=timeout_s) as nb:
        for name, onnx_name, _ in component_plan(model, max_seq_len):
            if only and name not in only:
                continue
            rep = nb.build(name, out / f"{name}.plan", dtype=dtype, max_batch=max_batch, max_seq_len=max_seq_len,
                           deserialize=False)
            if onnx_name in entries:
                rep["io_diff"] = io_differences(rep, entries[onnx_name]) if rep["inputs"] else ["no network IO"]
            reports[name] = rep
            if progress:
                status = (f"ok, {rep['engine_bytes']} bytes, {rep['num_layers']} layers" if rep["ok"]
                          else f"FAILED: {rep['error']}")
                progress(f"[tensorrt network] {name}: {status} ({rep['seconds']:.1f}s)")
    (out / "report.json").write_text(json.dumps(reports, indent=2) + "\n")
    return reports


# -- the worker ------------------------------------------------------------------------------------

def _open_source(source: dict):
    """(model, load) where ``with load(piece):`` holds that piece's weights in ``model``."""
    if "handoff" in source:
        return load_handoff(source["handoff"]), lambda piece: contextlib.nullcontext()
    from m3_trt.model.pieces import PieceModel

    pm = PieceModel(source["checkpoint"])
    return pm.model, lambda piece: pm.loaded(piece, DTYPES[source["dtype"]])


def _serve(source: dict, requests, answers) -> None:
    from m3_trt.export.tensorrt.builder import try_deserialize

    model, load = _open_source(source)
    for line in requests:
        req = json.loads(line)
        try:
            with load(piece_of(req["name"])):
                report = build_one(model, req["name"], req["engine_path"], dtype=req["dtype"],
                                   max_batch=req["max_batch"], max_seq_len=req["max_seq_len"],
                                   num_heads=req["num_heads"], timeout_s=req["timeout_s"]).to_dict()
        except Exception as exc:  # a layer TensorRT refuses to create surfaces as a Python exception
            report = BuildReport(ok=False, stage="write-network", error=f"{type(exc).__name__}: {exc}").to_dict()
        if report["ok"] and req["deserialize"]:
            ok, err = try_deserialize(req["engine_path"])
            report["deserialize"] = {"ok": ok, "error": err}
        answers.write(json.dumps(report) + "\n")
        answers.flush()


def _worker_main(source_json: str) -> int:
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever TensorRT or a library prints goes to stderr, never into the answers
    sys.stdout = sys.stderr
    _serve(json.loads(source_json), sys.stdin, answers)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
