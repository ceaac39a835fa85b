"""Build orchestration: checkpoint → per-rank pieces for a target, atomic and resumable.

Work happens in ``.<out>.partial`` next to ``out``; on success it is renamed into place (an
existing ``out`` is swapped out and removed only after the new one is in place), so ``out`` is
always either the previous complete build or absent. Every finished *piece* (a rank's weight
shard, its FP8 scales, the calibration report, the ONNX export, engines, the TensorRT-LLM
handoff) is written to temporary names, renamed, hashed (sha256) and appended to
``journal.jsonl``; on Ctrl-C or an error the partial folder keeps only journaled pieces (stray
temporary files are removed) and ``--resume`` re-verifies each recorded hash and redoes only the
pieces that are missing or differ. Without ``--resume`` a stale partial folder is discarded.

``build.json`` (written last): target, plan, layout, config, every file with its sha256, tool
versions, measured quantization errors, which pieces were computed or reused by this run.

Rank weight files stream (:mod:`m3_trt.model.pieces`): the checkpoint is read one piece (embedding, a
decoder layer, head, vision tower, projector) at a time and each piece is appended to every
rank's file; ``parts.jsonl`` records each finished (piece, rank) with its byte range and sha256,
so a build killed at layer k resumes at layer k. ``workers`` > 1 converts pieces in a process
pool (the host-memory plan, :func:`m3_trt.build.plan.host_memory`, refuses a number the host cannot
hold). FP8 activation scales are calibrated layer by layer (:func:`m3_trt.quant.fp8.calibrate_layerwise`);
the ONNX export of one rank streams too (:func:`m3_trt.export.onnx.export_model`), and the sharded
split graphs are filled one layer at a time from the rank files (:mod:`m3_trt.export.onnx.ranks`);
a one-rank FP8 Q/DQ export quantizes each layer as it streams (the rank files' codes and scales).
Every journal record carries the *input key*
(checkpoint files' names, sizes and mtimes, the target with its overrides, the calibration file,
the tool version: :func:`input_key`); a ``--resume`` with other inputs starts over and says what
changed. Half-written exporter folders (``.<name>.partial.*``) are removed on resume.

Test hooks: ``M3_TRT_BUILD_PIECE_DELAY_S`` sleeps that long after each piece and
``M3_TRT_BUILD_PART_DELAY_S`` after each streamed checkpoint piece (to interrupt a build mid-way in
tests); they change nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from m3_trt.model.modeling import DTYPES
from m3_trt.outputs import BUILD, check_output, partial_dir, swap_into_place
from m3_trt.build.targets import Target, load_target

BUILD_FORMAT = "m3-trt-build/1"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_scale_block(ckpt: str | Path) -> tuple[int, int] | None:
    """The FP8 block shape of a checkpoint's float32 ``*_scale_inv`` tensors, or None (no weights / none)."""
    from m3_trt.model.checkpoint import SCALE_SUFFIX, CheckpointError, SafetensorsCheckpoint

    try:
        ck = SafetensorsCheckpoint(ckpt)
    except CheckpointError:
        return None  # config.json only: the plan assumes per-channel scales
    for k in ck.keys():
        if k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] in ck.key_to_file:
            rows, cols = ck.shape(k[: -len(SCALE_SUFFIX)])[-2:]
            sr, sc = ck.shape(k)[-2:]
            return rows // sr, cols // sc
    return None


class Journal:
    """``journal.jsonl`` in the work folder: one line per finished piece with its files' sha256 and
    the input key it was made from (a record with another key is not trusted)."""

    def __init__(self, work: Path, key: str = ""):
        self.path = work / "journal.jsonl"
        self.work = work
        self.key = key
        self.entries: dict[str, dict[str, str]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    if rec.get("key", "") == key:
                        self.entries[rec["piece"]] = rec["files"]
                except (json.JSONDecodeError, KeyError):
                    break  # a torn last line from an interrupted write

    def verified(self, piece: str) -> bool:
        files = self.entries.get(piece)
        return bool(files) and all((self.work / f).is_file() and sha256(self.work / f) == h for f, h in files.items())

    def record(self, piece: str, files: list[Path]) -> dict[str, str]:
        rec = {str(f.relative_to(self.work)): sha256(f) for f in files}
        self.entries[piece] = rec
        with open(self.path, "a") as f:
            f.write(json.dumps({"piece": piece, "files": rec, "key": self.key}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return rec


def _save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    tmp.rename(path)
    return path


def _write_json(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.rename(path)
    return path


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("m3-trt", "safetensors", "onnx", "onnxruntime", "tensorrt-rtx-cu13-bindings", "tensorrt"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return v


def build(ckpt: str | Path, target: Target | str, out: str | Path, *, resume: bool = False, progress: bool = True,
          calib: str | Path | None = None, plan=None, overwrite: bool = False, workers: int = 1) -> dict:
    """Build ``out`` for ``target`` from ``ckpt``; returns the manifest (also ``out/build.json``).

    ``out`` follows :func:`m3_trt.outputs.check_output`: never equal to, inside or containing the
    checkpoint (or ``calib``); an existing folder is replaced only when it is a previous build
    (``build.json`` of ours) or ``overwrite`` is set. ``workers`` > 1 converts that many pieces at
    once in a process pool; refused when :func:`m3_trt.build.plan.host_memory` says the host lacks the memory.
    """
    tgt = load_target(target) if isinstance(target, str) else target
    ckpt = Path(ckpt)
    out = check_output(out, stage=BUILD, inputs=[ckpt, calib], overwrite=overwrite)
    work = partial_dir(out)
    try:
        return _build(ckpt, tgt, out, work, resume=resume, progress=progress, calib=calib, plan=plan,
                      workers=workers)
    except BaseException:
        # keep the journaled pieces for --resume, never a half-written file
        _clean_strays(work)
        raise


def input_key(ckpt: Path, tgt: Target, calib) -> tuple[str, dict]:
    """What a build's pieces depend on, and its sha256: every checkpoint file's name, size and
    mtime, the target (overrides applied), the calibration file, and the tool's version.

    Every journal record carries the key; a resume whose key differs starts over (and says what
    changed) instead of mixing pieces made from different inputs.
    """
    files = {p.relative_to(ckpt).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns]
             for p in sorted(ckpt.rglob("*")) if p.is_file()}
    cal = Path(calib) if calib else None
    inputs = {"checkpoint": str(ckpt.resolve()), "checkpoint_files": files,
              "target": {k: v for k, v in tgt.to_dict().items() if k != "source"},
              "calib": [str(cal), cal.stat().st_size, cal.stat().st_mtime_ns] if cal and cal.is_file() else None,
              "tool": _versions().get("m3-trt", "unknown"), "format": BUILD_FORMAT}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest(), inputs


def _changed(old: dict, new: dict) -> str:
    """A short description of which input differs (for the resume message)."""
    diff = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) == new.get(k):
            continue
        if isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
            sub = sorted(j for j in set(old[k]) | set(new[k]) if old[k].get(j) != new[k].get(j))
            diff.append(f"{k}: {', '.join(sub[:4])}")
        else:
            diff.append(k)
    return "; ".join(diff) or "the journal's key"


def _prepare_work(work: Path, resume: bool, key: str, inputs: dict, log) -> None:
    """A fresh work folder, or (``resume``) the kept one when it was made from the same inputs."""
    if work.exists() and resume:
        f = work / "inputs.json"
        old = json.loads(f.read_text()) if f.is_file() else None
        if old is None or old.get("key") != key:
            why = _changed(old.get("inputs", {}), inputs) if old else "no inputs.json"
            log(f"[build] --resume: the inputs changed since the interrupted build ({why}); starting over")
            shutil.rmtree(work)
    elif work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    _clean_strays(work)
    _write_json({"key": key, "inputs": inputs}, work / "inputs.json")


def _clean_strays(work: Path) -> None:
    """Half-written files of an interrupted run: ``*.tmp`` and exporters' ``.<name>.partial.*`` folders."""
    if not work.exists():
        return
    for stray in list(work.rglob("*.tmp")):
        stray.unlink(missing_ok=True)
    for d in sorted(work.rglob(".*.partial.*"), reverse=True):
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def _build(ckpt: Path, tgt: Target, out: Path, work: Path, *, resume: bool, progress: bool, calib, plan,
           workers: int = 1) -> dict:
    from tqdm import tqdm

    from m3_trt.model.config import M3Config
    from m3_trt.model.pieces import PieceModel
    from m3_trt.build.plan import host_memory, make_plan
    from m3_trt.build.rank_weights import native_fp8_report, stream_rank_weights

    cfg = M3Config.from_pretrained(ckpt)
    scale_block = checkpoint_scale_block(ckpt)
    plan = plan or make_plan(cfg, tgt, scale_block=scale_block)
    host = host_memory(cfg, workers)
    if not host["fits"] and workers > 1:  # one worker is the least a build can use: it is tried
        raise ValueError(f"--workers {workers} does not fit this host: {host['text']}")
    log = (lambda m: tqdm.write(m)) if progress else (lambda m: None)
    key, inputs = input_key(ckpt, tgt, calib)
    _prepare_work(work, resume, key, inputs, log)
    journal = Journal(work, key)
    delay = float(os.environ.get("M3_TRT_BUILD_PIECE_DELAY_S", "0") or 0)
    computed, reused = [], []

    def piece(name: str, make: Callable[[], list[Path]]) -> None:
        if resume and journal.verified(name):
            reused.append(name)
            log(f"[build] {name}: verified, kept")
            return
        files = make()
        journal.record(name, files)
        computed.append(name)
        log(f"[build] {name}: done ({len(files)} file(s))")
        if delay:
            time.sleep(delay)

    t0 = time.perf_counter()
    lay = plan.layout
    fp8 = tgt.weight_dtype == "fp8"
    pm = PieceModel(ckpt, cfg)  # the model on meta; pieces are materialized one at a time

    if fp8:
        def make_calibration() -> list[Path]:
            from m3_trt.quant import fp8 as quant

            # layer by layer (one layer's weights in memory); a fresh PieceModel: calibration hooks it
            cpm = PieceModel(ckpt, cfg)
            cal_inputs = quant.calibration_inputs(ckpt, calib)
            emu, errors = quant.calibrate_layerwise(cpm, cal_inputs, DTYPES[tgt.dtype],
                                                    cpm.reader.block_scales if scale_block else None)
            return [_write_json({"activation_scales": emu.scales(), "layer_errors": errors,
                                 "prompts": len(cal_inputs), "calib": quant.calibration_source(ckpt, calib),
                                 "reference_dtype": tgt.dtype, "method": "layer by layer (quant.calibrate_layerwise)"},
                                work / "calibration.json")]
        piece("calibration", make_calibration)

    todo = [r for r in range(lay.world) if not (resume and journal.verified(f"rank{r}/weights"))]
    native: dict[str, dict] = {}
    writers, kept = stream_rank_weights(pm, cfg, tgt, lay, work, todo, journal.key, resume, log, progress, native,
                                        workers=workers)
    for r in range(lay.world):
        def make_rank(r=r) -> list[Path]:
            return [w.finish() for w in writers[r]]
        piece(f"rank{r}/weights", make_rank)

    onnx_info = _onnx_pieces(pm, cfg, tgt, lay, work, piece, log, ckpt=ckpt, calib=calib) if tgt.onnx else None

    def make_trtllm() -> list[Path]:
        from m3_trt.export.trtllm import write_trtllm

        return write_trtllm(cfg, tgt, work / "trtllm", checkpoint=str(ckpt))
    piece("trtllm", make_trtllm)

    files = {}
    for name, rec in journal.entries.items():
        files.update(rec)
    quant_report = json.loads((work / "calibration.json").read_text()) if fp8 else None
    if fp8 and native:  # what this run wrote (a resumed run reports only the pieces it wrote)
        quant_report["native_fp8"] = native_fp8_report(native)
    elif fp8:
        quant_report["native_fp8"] = {"tensors": 0, "why": "checkpoint has no FP8 block scales"}
    manifest = {
        "format": BUILD_FORMAT, "target": tgt.to_dict(), "plan": plan.to_dict(), "layout": {
            "world": lay.world, "tp": lay.tp, "ep": lay.ep}, "config": cfg.to_hf_dict(), "checkpoint": str(ckpt),
        "inputs": {"key": key, **inputs},
        "ranks": [{"rank": r, "weights": f"rank{r}/weights.safetensors",
                   "fp8_scales": f"rank{r}/fp8_scales.safetensors" if fp8 else None} for r in range(lay.world)],
        "files": files, "versions": _versions(), "quantization": quant_report, "onnx": onnx_info,
        "computed": computed, "reused": reused,
        "pieces_kept_on_resume": {f"rank{r}": n for r, n in kept.items()},
        "host_memory": {k: v for k, v in host.items() if k != "text"},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    _write_json(manifest, work / "build.json")
    for f in ("journal.jsonl", "parts.jsonl", "inputs.json"):
        (work / f).unlink(missing_ok=True)
    swap_into_place(work, out)
    return manifest


def _onnx_pieces(pm, cfg, tgt: Target, lay, work: Path, piece, log, *, ckpt: Path | None = None,
                 calib=None) -> dict:
    """Per-rank ONNX (+ engines with ``backend = tensorrt``); returns what goes into build.json.

    One rank: ``export_model`` of the whole model into ``rank0/onnx`` (verified). Several ranks:
    the replicated components once into ``replicated/onnx``, the split decoder graphs once into
    ``onnx_graphs/``, then each rank's weights + manifest into ``rank<r>/onnx`` (see
    :mod:`m3_trt.export.onnx.ranks`), each verified in ONNX Runtime against its torch part.
    A failed verification fails the build. One-rank FP8 builds export Q/DQ graphs (E4M3 weights,
    calibrated per-tensor activation scales: ``m3_trt.export.onnx.fp8``); so do sharded FP8 builds,
    each rank's split graphs carrying the E4M3 codes + scales of its ``rank<r>`` weight files (the
    MoE plugin, ``plugins = "m3"``, holding only the rank's expert range).

    Memory: a one-rank export (FP8 Q/DQ included: each layer quantized while it is loaded, with
    the codes and scales the rank files hold) and the replicated components stream (``pm``, one
    piece in memory at a time); the sharded split graphs are filled one decoder layer at a time from
    the rank weight files the build wrote (a ``RankModel`` on ``meta``).
    """
    from m3_trt.export.onnx import PLUGIN_MODES, export_model

    from m3_trt.export.onnx.ranks import REPLICATED, RankWeights, export_graphs, read_act_scales, write_rank

    kw = dict(dtype=tgt.dtype, plugins=tgt.plugins, max_seq_len=tgt.max_seq_len, max_batch=tgt.max_batch)
    fp8_qdq = tgt.weight_dtype == "fp8" and lay.world == 1
    if fp8_qdq:  # the export quantizes each layer as it streams, with the scales calibrated above
        kw.update(quant="fp8", calib=calib, calib_ckpt=ckpt,
                  act_scales=json.loads((work / "calibration.json").read_text())["activation_scales"])
    info: dict = {"mode": "whole model (export_model)" if lay.world == 1 else
                  "per rank, decoder layers split at their collectives (m3_trt.export.onnx.ranks)",
                  "weights": "fp8 Q/DQ (rank0's E4M3 codes and fp32 scales, calibrated per-tensor activations)"
                  if fp8_qdq
                  else ("fp8 Q/DQ (each rank's E4M3 codes and fp32 scales from rank<r>/weights.safetensors + "
                        "fp8_scales.safetensors, calibrated per-tensor activations; routed experts weight-only)"
                        if tgt.weight_dtype == "fp8" else f"{tgt.dtype}"), "ranks": {}}

    def files_under(d: Path) -> list[Path]:
        return sorted(p for p in d.rglob("*") if p.is_file())

    def check(name: str, verify: dict) -> None:
        if verify.get("ok") is False:
            bad = {k: v["rel_err"] for k, v in verify["components"].items() if not v["ok"]}
            raise RuntimeError(f"{name}: ONNX Runtime differs from torch beyond {verify['tolerance']}: {bad}")

    def export_whole(dst: Path, components=None) -> list[Path]:
        shutil.rmtree(dst, ignore_errors=True)
        export_model(pm, dst, verify=True, components=components, progress=log, **kw)
        check(str(dst.relative_to(work)), json.loads((dst / "manifest.json").read_text()).get("verify", {}))
        return files_under(dst)

    if lay.world == 1:
        piece("rank0/onnx", lambda: export_whole(work / "rank0" / "onnx"))
        dirs = {0: work / "rank0" / "onnx"}
        info["ranks"]["0"] = {"dir": "rank0/onnx", "verify": json.loads(
            (dirs[0] / "manifest.json").read_text()).get("verify")}
    else:
        from m3_trt.model.rank import RankModel

        kernels = PLUGIN_MODES[tgt.plugins]
        piece("onnx/replicated", lambda: export_whole(work / "replicated" / "onnx", REPLICATED))
        info["replicated"] = {"dir": "replicated/onnx", "components": REPLICATED, "verify": json.loads(
            (work / "replicated" / "onnx" / "manifest.json").read_text()).get("verify")}

        # streamed from the rank files the build wrote (a RankModel on meta, one layer filled at a
        # time): the graphs carry exactly those tensors, FP8 codes and scales included
        act = read_act_scales(work / "calibration.json") if tgt.weight_dtype == "fp8" else None

        def make_graphs() -> list[Path]:
            shutil.rmtree(work / "onnx_graphs", ignore_errors=True)
            export_graphs(RankModel.on_meta(cfg, lay, 0, kernels), RankWeights(work / "rank0"), work / "onnx_graphs",
                          act_scales=act, progress=log, **kw)
            return files_under(work / "onnx_graphs")
        piece("onnx/graphs", make_graphs)
        dirs = {}
        for r in range(lay.world):
            dst = work / f"rank{r}" / "onnx"
            dirs[r] = dst

            def make_rank(r=r, dst=dst) -> list[Path]:
                shutil.rmtree(dst, ignore_errors=True)
                verify = write_rank(RankModel.on_meta(cfg, lay, r, kernels), RankWeights(work / f"rank{r}"),
                                    work / "onnx_graphs", dst, replicated="../../replicated/onnx", act_scales=act, **kw)
                (dst / "verify.json").write_text(json.dumps(verify, indent=2) + "\n")
                log(f"[build] rank{r}/onnx: verified, ok={verify.get('ok')}")
                check(f"rank{r}/onnx", verify)
                return files_under(dst)
            piece(f"rank{r}/onnx", make_rank)
            info["ranks"][str(r)] = {"dir": f"rank{r}/onnx",
                                     "verify": json.loads((dst / "verify.json").read_text())}
    if tgt.backend == "tensorrt":
        info["engines"] = _engines(work, tgt, lay, dirs, piece, log, pm=pm)
    return info


def _engines(work: Path, tgt: Target, lay, dirs: dict[int, Path], piece, log, *, pm=None) -> dict:
    """TensorRT (here TensorRT-RTX) engines for every exported graph; reports, not failures, per graph.

    ``trt_route = "onnx"``: TensorRT's ONNX parser on each graph. ``"network"`` (one rank; the
    target refuses more): the text components written with the network API from ``pm`` one piece
    at a time, each shadow-checked against torch (a failed check fails the build), the vision
    components from their graphs (:func:`m3_trt.export.tensorrt_build.network_route_engines`).
    """
    from m3_trt.export.tensorrt_build import (build_engines, execution_note, network_route_engines,
                                              network_verification)

    out: dict = {}
    if tgt.trt_route == "network":
        out["rank0/engines"] = network_route_engines(pm, dirs[0], dtype=tgt.dtype, max_batch=tgt.max_batch,
                                                     max_seq_len=tgt.max_seq_len, piece=piece, log=log)
        reps = out["rank0/engines"]
        failed = sorted(f"rank0/engines:{n}" for n, r in reps.items() if not r.get("ok"))
        log(f"[build] engines (network route): {len(reps) - len(failed)} built, {len(failed)} failed {failed}")
        return {"route": "network", "reports": out, "built": len(reps) - len(failed), "failed": failed,
                "verification": network_verification(reps), "executed": False,
                "note": execution_note(reps) + " The network route's arithmetic is checked on the torch shadow "
                        "network instead ('verification')."}

    def run(name: str, export_dir: Path, only=None) -> None:
        def make() -> list[Path]:
            reports = build_engines(export_dir, only=only, progress=log)
            (export_dir / "engines" / "report.json").write_text(json.dumps(reports, indent=2) + "\n")
            return sorted(p for p in (export_dir / "engines").iterdir() if p.is_file())
        piece(name, make)
        out[name] = json.loads((export_dir / "engines" / "report.json").read_text())

    if lay.world == 1:
        run("rank0/engines", dirs[0])
    else:
        run("replicated/engines", work / "replicated" / "onnx")
        for r, d in dirs.items():
            def make_rank(r=r, d=d) -> list[Path]:
                return _rank_engines(d, tgt, log)
            piece(f"rank{r}/engines", make_rank)
            out[f"rank{r}/engines"] = json.loads((d / "engines" / "report.json").read_text())
    flat = {f"{k}:{n}": rep for k, reps in out.items() for n, rep in reps.items()}
    failed = sorted(k for k, rep in flat.items() if not rep.get("ok"))
    log(f"[build] engines: {len(flat) - len(failed)} built, {len(failed)} failed {failed}")
    return {"route": "onnx", "reports": out, "built": len(flat) - len(failed), "failed": failed,
            "executed": False, "note": execution_note(flat)}


def _rank_engines(rank_dir: Path, tgt: Target, log) -> list[Path]:
    """One engine per (layer, part) of a rank's split graphs (weights baked in)."""
    from m3_trt.export.tensorrt import build_in_subprocess
    from m3_trt.export.tensorrt_build import relative_report, graph_for, profile_for

    manifest = json.loads((rank_dir / "manifest.json").read_text())
    eng = rank_dir / "engines"
    eng.mkdir(exist_ok=True)
    reports = {}
    for entry in manifest["layers"]:
        for part in ("attn", "mlp"):
            p = entry[part]
            name = f"layer_{entry['index']}.{part}"
            with graph_for(rank_dir, p["file"], p["data"], name) as path:
                rep = build_in_subprocess(path, eng / f"{name}.plan", dtype=tgt.dtype,
                                          profiles=profile_for(manifest["graphs"][p["graph"]], manifest),
                                          plugins=("m3",) if manifest["plugins"] == "m3" else ())
            reports[name] = relative_report(rep.to_dict(), rank_dir)
            log(f"[tensorrt] rank{manifest['rank']} {name}: {'ok' if rep.ok else 'FAILED: ' + str(rep.error)}")
    (eng / "report.json").write_text(json.dumps(reports, indent=2) + "\n")
    return sorted(q for q in eng.iterdir() if q.is_file())
