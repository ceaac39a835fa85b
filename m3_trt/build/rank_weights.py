"""A build's rank weight files, written piece by piece from the checkpoint (serially or by a pool).

:func:`stream_rank_weights` reads each checkpoint piece once (:class:`m3_trt.model.pieces.PieceModel`),
converts it for every rank that still needs it (:func:`convert_piece`: shard, cast, FP8-quantize)
and appends it to the ranks' :class:`~m3_trt.build.weights_file.StreamingSafetensors`;
``parts.jsonl`` in the work folder records each finished (piece, rank, file) with its byte range,
sha256 and the build's input key, which is what lets ``--resume`` continue at the first piece a
killed build had not finished. With ``workers`` > 1 a spawn-context process pool converts pieces
in parallel; each worker writes its result to a spool file and this process appends the spool
files in piece order, so the rank files are byte-identical to a serial build's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from m3_trt.quant import fp8 as quant
from m3_trt.model.modeling import DTYPES
from m3_trt.model.pieces import PieceModel, piece_names
from m3_trt.quant.fp8 import is_fp8_weight
from m3_trt.build.targets import Target
from m3_trt.model.shard import shard_tensor
from m3_trt.build.weights_file import StreamingSafetensors, header_room, spool_tensors


def stream_rank_weights(pm, cfg, tgt: Target, lay, work: Path, todo: list[int], key: str, resume: bool,
                        log, progress: bool, native_errors: dict | None = None, workers: int = 1
                        ) -> tuple[dict[int, list], dict[int, int]]:
    """Rank weight files (and FP8 scale files) of the ranks in ``todo``, written piece by piece.

    Each piece is read once and converted for every rank in ``todo`` (:func:`convert_piece`) —
    in this process, or with ``workers`` > 1 in a pool of that many processes (each writes its
    result to a spool file; this process appends them in piece order) — and appended to the rank's
    files; ``parts.jsonl`` records each finished (piece, rank) with its byte range and sha256, so
    ``--resume`` continues at the first piece a killed build had not finished. ``native_errors``
    receives, per natively kept FP8 tensor, the relative error of its stored codes × scales
    against the checkpoint's own dequantized weight (0 when the codes are the checkpoint's). Returns the
    writers (finished by the caller) and, per rank, how many pieces were kept from a killed run.
    """
    from tqdm import tqdm

    fp8 = tgt.weight_dtype == "fp8"
    meta = pm.meta_state()
    names = piece_names(cfg)
    parts = _Parts(work / "parts.jsonl", key)
    writers: dict[int, list] = {}
    need: dict[str, list[int]] = {p: [] for p in names}
    kept_pieces: dict[int, int] = {}
    fp8_native = native_errors if native_errors is not None else {}
    for r in todo:
        shapes = [(k, tuple(shard_tensor(k, v, cfg.text, lay, r).shape)) for k, v in meta.items()]
        files = [work / f"rank{r}" / "weights.safetensors"] + ([work / f"rank{r}" / "fp8_scales.safetensors"]
                                                              if fp8 else [])
        ws = []
        for i, f in enumerate(files):
            room = header_room([(k + ("_scale_inv" if i else ""), s) for k, s in shapes])
            w = StreamingSafetensors(f, room)
            kept = w.keep(parts.records(f.relative_to(work).as_posix(), names)) if resume else (w.start() or 0)
            ws.append((w, kept))
        done = min(k for _, k in ws)
        if resume and done:
            log(f"[build] rank{r}/weights: resuming after {names[done - 1]} ({done} of {len(names)} pieces kept)")
        for w, kept in ws:
            if kept > done:  # a kill between a rank's two files: redo the piece in both
                w.keep(parts.records(w.path.relative_to(work).as_posix(), names)[:done])
        kept_pieces[r] = done
        for p in names[done:]:
            need[p].append(r)
        writers[r] = [w for w, _ in ws]
    part_delay = float(os.environ.get("M3_TRT_BUILD_PART_DELAY_S", "0") or 0)
    todo_pieces = [p for p in names if need[p]]

    def write(p: str, per_rank: dict[int, list], native: dict[str, float]) -> None:
        for k, err in native.items():
            fp8_native[k] = max(fp8_native.get(k, 0.0), err)
        for r, files in per_rank.items():
            for w, t in zip(writers[r], files):
                rec = w.append(t) if isinstance(t, dict) else w.append_spooled(*t)
                parts.record(w.path.relative_to(work).as_posix(), p, r, rec)
        if part_delay:
            time.sleep(part_delay)

    if workers <= 1:
        for p in tqdm(todo_pieces, desc="pieces", disable=not progress):
            write(p, *convert_piece(pm, p, need[p], tgt, lay))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        spool = work / "spool"
        spool.mkdir(exist_ok=True)
        # spawn, not fork: a forked torch with live intra-op threads can deadlock
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(str(pm.reader.path), tgt, lay)) as pool:
            jobs = [pool.submit(_worker_piece, p, need[p], str(spool)) for p in todo_pieces]
            for p, job in zip(tqdm(todo_pieces, desc=f"pieces ({workers} workers)", disable=not progress), jobs):
                per_rank, native = job.result()  # in piece order: the files stay in order
                write(p, per_rank, native)
                for files in per_rank.values():
                    for path, _ in files:
                        Path(path).unlink()
        shutil.rmtree(spool, ignore_errors=True)
    return writers, kept_pieces


def convert_piece(pm, p: str, ranks: list[int], tgt: Target, lay) -> tuple[dict[int, list], dict[str, float]]:
    """Piece ``p`` for each rank in ``ranks``: ``{rank: [weights, (fp8 scales)]}`` (tensor dicts), and
    per natively kept FP8 tensor its relative error against the checkpoint's dequantized weight.

    Loaded in fp32 (``from_pretrained``'s rule), sharded, cast to the stored dtype; FP8: quantized
    with the checkpoint's block scales where it has them and the build is one rank (re-coded from
    the checkpoint's own dequantized values, which gives back its codes bit for bit), else per
    output channel.
    """
    cfg = pm.cfg
    fp8 = tgt.weight_dtype == "fp8"
    store = DTYPES[tgt.dtype if fp8 else tgt.weight_dtype]
    out, native = {}, {}
    with pm.loaded(p, torch.float32) as state:
        state = {k: v.detach() for k, v in state.items()}
        block = pm.reader.block_scales(p) if fp8 and lay.world == 1 else {}
        block = {k: s for k, s in block.items() if is_fp8_weight(k, state[k])}
        for r in ranks:
            sl = {k: shard_tensor(k, v, cfg.text, lay, r) for k, v in state.items()}
            sl = {k: v if k in block else v.to(store).contiguous() for k, v in sl.items()}
            if fp8:
                codes, scales = quant.quantize_state(sl, block)
                for k in block:
                    native[k] = float((quant.dequantize_fp8(codes[k], scales[k + "_scale_inv"]) - sl[k]).norm()
                                      / sl[k].norm().clamp_min(1e-30))
                out[r] = [codes, {k: v.contiguous() for k, v in scales.items()}]
            else:
                out[r] = [sl]
    return out, native


_WORKER: dict = {}


def _worker_init(ckpt: str, tgt: Target, lay) -> None:
    torch.set_num_threads(1)  # N workers share the host's cores
    _WORKER.update(pm=PieceModel(ckpt), tgt=tgt, lay=lay)


def _worker_piece(p: str, ranks: list[int], spool: str) -> tuple[dict[int, list], dict[str, float]]:
    """One piece converted in a worker process; its bytes go to spool files the main process appends."""
    per_rank, native = convert_piece(_WORKER["pm"], p, ranks, _WORKER["tgt"], _WORKER["lay"])
    return {r: [spool_tensors(t, Path(spool) / f"{p}.rank{r}.{i}.bin") for i, t in enumerate(files)]
            for r, files in per_rank.items()}, native


class _Parts:
    """``parts.jsonl``: one line per (piece, rank, file) appended to a rank's streaming file."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.lines: list[dict] = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a kill mid-write
                if rec.get("key") == key:
                    self.lines.append(rec)

    def records(self, file: str, order: list[str]) -> list[dict]:
        """The file's records in piece order (the last one per piece wins)."""
        by_piece = {rec["piece"]: rec for rec in self.lines if rec["file"] == file}
        out = []
        for p in order:
            if p not in by_piece:
                break
            out.append(by_piece[p])
        return out

    def record(self, file: str, piece: str, rank: int, rec: dict) -> None:
        line = {"piece": piece, "rank": rank, "file": file, "key": self.key, **rec}
        self.lines.append(line)
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
