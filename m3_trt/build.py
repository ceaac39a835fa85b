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

Test hook: ``M3_TRT_BUILD_PIECE_DELAY_S`` sleeps that long after each piece (to interrupt a
build mid-way in tests); it changes nothing else.
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

from .targets import Target, load_target

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_scale_block(ckpt: str | Path) -> tuple[int, int] | None:
    """The FP8 block shape of a checkpoint's float32 ``*_scale_inv`` tensors, or None (no weights / none)."""
    from .checkpoint import SCALE_SUFFIX, CheckpointError, SafetensorsCheckpoint

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


def checkpoint_block_scales(ckpt: str | Path, model) -> dict[str, torch.Tensor]:
    """The checkpoint's FP8 scale grids re-assembled onto our in-memory names (fused gate‖up, experts)."""
    from .checkpoint import SCALE_SUFFIX, SafetensorsCheckpoint, _place, map_key

    ck = SafetensorsCheckpoint(ckpt)
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for k in ck.keys():
        if not k.endswith(SCALE_SUFFIX):
            continue
        wkey = k[: -len(SCALE_SUFFIX)]
        hit = map_key(wkey)
        if hit is None or hit[0] not in params:
            continue
        target, place, expert = hit
        s = ck.get(k)
        rows, cols = ck.shape(wkey)[-2:]
        br, bc = rows // s.shape[-2], cols // s.shape[-1]
        if target not in out:
            shape = params[target].shape
            out[target] = torch.ones(*shape[:-2], shape[-2] // br, shape[-1] // bc, dtype=s.dtype)
        view, _ = _place(out[target], place, expert)
        view.copy_(s)
    return out


class Journal:
    """``journal.jsonl`` in the work folder: one line per finished piece with its files' sha256."""

    def __init__(self, work: Path):
        self.path = work / "journal.jsonl"
        self.work = work
        self.entries: dict[str, dict[str, str]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
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
            f.write(json.dumps({"piece": piece, "files": rec}) + "\n")
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
          calib: str | Path | None = None, plan=None) -> dict:
    """Build ``out`` for ``target`` from ``ckpt``; returns the manifest (also ``out/build.json``)."""
    tgt = load_target(target) if isinstance(target, str) else target
    ckpt, out = Path(ckpt), Path(out)
    work = out.parent / f".{out.name}.partial"
    try:
        return _build(ckpt, tgt, out, work, resume=resume, progress=progress, calib=calib, plan=plan)
    except BaseException:
        # keep the journaled pieces for --resume, never a half-written file
        for stray in work.rglob("*.tmp") if work.exists() else ():
            stray.unlink(missing_ok=True)
        raise


def _build(ckpt: Path, tgt: Target, out: Path, work: Path, *, resume: bool, progress: bool, calib, plan) -> dict:
    from tqdm import tqdm

    from .config import M3Config
    from .model import M3ForConditionalGeneration
    from .plan import make_plan
    from .runtime.shard import shard_state

    cfg = M3Config.from_pretrained(ckpt)
    scale_block = checkpoint_scale_block(ckpt)
    plan = plan or make_plan(cfg, tgt, scale_block=scale_block)
    if work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for stray in work.rglob("*.tmp"):
        stray.unlink()
    journal = Journal(work)
    delay = float(os.environ.get("M3_TRT_BUILD_PIECE_DELAY_S", "0") or 0)
    computed, reused = [], []
    log = (lambda m: tqdm.write(m)) if progress else (lambda m: None)

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
    model = M3ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    lay = plan.layout
    fp8 = tgt.weight_dtype == "fp8"
    block_scales = checkpoint_block_scales(ckpt, model) if fp8 and scale_block else {}
    store = DTYPES[tgt.dtype if fp8 else tgt.weight_dtype]

    if fp8:
        def make_calibration() -> list[Path]:
            import copy

            from . import quant

            ref = copy.deepcopy(model).to(DTYPES[tgt.dtype])
            q = copy.deepcopy(ref)
            inputs = quant.calibration_inputs(ckpt, calib)
            emu = quant.calibrate(q, inputs, quant.Fp8Emulation(block_scales))
            errors = quant.layer_errors(ref, q, inputs)
            return [_write_json({"activation_scales": emu.scales(), "layer_errors": errors,
                                 "prompts": len(inputs), "calib": str(calib) if calib else "built-in",
                                 "reference_dtype": tgt.dtype}, work / "calibration.json")]
        piece("calibration", make_calibration)

    state = model.state_dict()
    for r in tqdm(range(lay.world), desc="ranks", disable=not progress):
        def make_rank(r=r) -> list[Path]:
            from . import quant

            sl = shard_state(state, cfg.text, lay, r)
            sl = {k: v.to(store) for k, v in tqdm(sl.items(), desc=f"rank {r} tensors", leave=False,
                                                   disable=not progress)}
            files = []
            if fp8:
                codes, scales = quant.quantize_state(sl, {k: shard_block(k, s) for k, s in block_scales.items()})
                files.append(_save(scales, work / f"rank{r}" / "fp8_scales.safetensors"))
                sl = codes
            files.insert(0, _save(sl, work / f"rank{r}" / "weights.safetensors"))
            return files

        def shard_block(name, s, r=r):
            from .runtime.shard import shard_tensor

            # scale grids split like their weights when the split lands on block edges
            return shard_tensor(name, s, cfg.text, lay, r) if lay.world == 1 else None
        piece(f"rank{r}/weights", make_rank)

    onnx_info = _onnx_pieces(model, cfg, tgt, lay, work, piece, log, ckpt=ckpt, calib=calib) if tgt.onnx else None

    def make_trtllm() -> list[Path]:
        from m3_trt.export.trtllm import write_trtllm

        return write_trtllm(cfg, tgt, work / "trtllm", checkpoint=str(ckpt))
    piece("trtllm", make_trtllm)

    files = {}
    for name, rec in journal.entries.items():
        files.update(rec)
    quant_report = json.loads((work / "calibration.json").read_text()) if fp8 else None
    manifest = {
        "format": "m3-trt-build/1", "target": tgt.to_dict(), "plan": plan.to_dict(), "layout": {
            "world": lay.world, "tp": lay.tp, "ep": lay.ep}, "config": cfg.to_hf_dict(), "checkpoint": str(ckpt),
        "ranks": [{"rank": r, "weights": f"rank{r}/weights.safetensors",
                   "fp8_scales": f"rank{r}/fp8_scales.safetensors" if fp8 else None} for r in range(lay.world)],
        "files": files, "versions": _versions(), "quantization": quant_report, "onnx": onnx_info,
        "computed": computed, "reused": reused,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    _write_json(manifest, work / "build.json")
    (work / "journal.jsonl").unlink()
    _swap_into_place(work, out)
    return manifest


def _swap_into_place(work: Path, out: Path) -> None:
    """``work`` becomes ``out``; a previous ``out`` is removed only after the rename succeeded."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    try:
        work.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _onnx_pieces(model, cfg, tgt: Target, lay, work: Path, piece, log, *, ckpt: Path | None = None,
                 calib=None) -> dict:
    """Per-rank ONNX (+ engines with ``backend = tensorrt``); returns what goes into build.json.

    One rank: ``export_model`` of the whole model into ``rank0/onnx`` (verified). Several ranks:
    the replicated components once into ``replicated/onnx``, the split decoder graphs once into
    ``onnx_graphs/``, then each rank's weights + manifest into ``rank<r>/onnx`` (see
    :mod:`m3_trt.runtime.onnx_export`), each verified in ONNX Runtime against its torch part.
    A failed verification fails the build. One-rank FP8 builds export Q/DQ graphs (E4M3 weights,
    calibrated per-tensor activation scales: ``m3_trt.export.onnx.fp8``); sharded FP8 builds still
    export the activation-dtype weights of each rank (no Q/DQ in the split graphs yet).
    """
    from m3_trt.export.onnx import PLUGIN_MODES, export_model

    from .runtime.onnx_export import REPLICATED, export_graphs, verify_rank, write_rank

    model = model.to(DTYPES[tgt.dtype]).eval()
    kw = dict(dtype=tgt.dtype, plugins=tgt.plugins, max_seq_len=tgt.max_seq_len, max_batch=tgt.max_batch)
    fp8_qdq = tgt.weight_dtype == "fp8" and lay.world == 1
    if fp8_qdq:
        kw.update(quant="fp8", calib=calib, calib_ckpt=ckpt)
    info: dict = {"mode": "whole model (export_model)" if lay.world == 1 else
                  "per rank, decoder layers split at their collectives (m3_trt.runtime.onnx_export)",
                  "weights": "fp8 Q/DQ (E4M3 weights per channel, calibrated per-tensor activations)" if fp8_qdq
                  else f"{tgt.dtype}" + (" (unquantized: FP8 Q/DQ not in the sharded graphs)"
                                         if tgt.weight_dtype == "fp8" else ""), "ranks": {}}

    def files_under(d: Path) -> list[Path]:
        return sorted(p for p in d.rglob("*") if p.is_file())

    def check(name: str, verify: dict) -> None:
        if verify.get("ok") is False:
            bad = {k: v["rel_err"] for k, v in verify["components"].items() if not v["ok"]}
            raise RuntimeError(f"{name}: ONNX Runtime differs from torch beyond {verify['tolerance']}: {bad}")

    def export_whole(dst: Path, components=None) -> list[Path]:
        shutil.rmtree(dst, ignore_errors=True)
        export_model(model, dst, verify=True, components=components, progress=log, **kw)
        check(str(dst.relative_to(work)), json.loads((dst / "manifest.json").read_text()).get("verify", {}))
        return files_under(dst)

    if lay.world == 1:
        piece("rank0/onnx", lambda: export_whole(work / "rank0" / "onnx"))
        dirs = {0: work / "rank0" / "onnx"}
        info["ranks"]["0"] = {"dir": "rank0/onnx", "verify": json.loads(
            (dirs[0] / "manifest.json").read_text()).get("verify")}
    else:
        from .runtime.model import RankModel

        kernels = PLUGIN_MODES[tgt.plugins]
        piece("onnx/replicated", lambda: export_whole(work / "replicated" / "onnx", REPLICATED))
        info["replicated"] = {"dir": "replicated/onnx", "components": REPLICATED, "verify": json.loads(
            (work / "replicated" / "onnx" / "manifest.json").read_text()).get("verify")}

        def make_graphs() -> list[Path]:
            shutil.rmtree(work / "onnx_graphs", ignore_errors=True)
            rm0 = RankModel.from_full(model, lay, 0, dtype=DTYPES[tgt.dtype], kernels=kernels)
            export_graphs(rm0, work / "onnx_graphs", plugins=tgt.plugins, max_seq_len=tgt.max_seq_len,
                          max_batch=tgt.max_batch, progress=log)
            return files_under(work / "onnx_graphs")
        piece("onnx/graphs", make_graphs)
        dirs = {}
        for r in range(lay.world):
            dst = work / f"rank{r}" / "onnx"
            dirs[r] = dst

            def make_rank(r=r, dst=dst) -> list[Path]:
                shutil.rmtree(dst, ignore_errors=True)
                rm = RankModel.from_full(model, lay, r, dtype=DTYPES[tgt.dtype], kernels=kernels)
                write_rank(rm, work / "onnx_graphs", dst, replicated="../../replicated/onnx", **kw)
                verify = verify_rank(rm, dst)
                (dst / "verify.json").write_text(json.dumps(verify, indent=2) + "\n")
                log(f"[build] rank{r}/onnx: verified, ok={verify.get('ok')}")
                check(f"rank{r}/onnx", verify)
                return files_under(dst)
            piece(f"rank{r}/onnx", make_rank)
            info["ranks"][str(r)] = {"dir": f"rank{r}/onnx",
                                     "verify": json.loads((dst / "verify.json").read_text())}
    if tgt.backend == "tensorrt":
        info["engines"] = _engines(work, tgt, lay, dirs, piece, log)
    return info


def _engines(work: Path, tgt: Target, lay, dirs: dict[int, Path], piece, log) -> dict:
    """TensorRT (here TensorRT-RTX) engines for every exported graph; reports, not failures, per graph."""
    from m3_trt.export.tensorrt_build import build_engines

    out: dict = {}

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
    return {"reports": out, "built": len(flat) - len(failed), "failed": failed}


def _rank_engines(rank_dir: Path, tgt: Target, log) -> list[Path]:
    """One engine per (layer, part) of a rank's split graphs (weights baked in)."""
    from m3_trt.export.tensorrt import build_in_subprocess
    from m3_trt.export.tensorrt_build import _relative, graph_for, profile_for

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
            reports[name] = _relative(rep.to_dict(), rank_dir)
            log(f"[tensorrt] rank{manifest['rank']} {name}: {'ok' if rep.ok else 'FAILED: ' + str(rep.error)}")
    (eng / "report.json").write_text(json.dumps(reports, indent=2) + "\n")
    return sorted(q for q in eng.iterdir() if q.is_file())
