"""A build's rank weight files, written piece by piece and tensor by tensor from the checkpoint.

:func:`stream_rank_weights` converts each checkpoint piece once for every rank that still needs
it (:func:`convert_piece`) and appends it to the ranks' :class:`~m3_trt.build.weights_file.StreamingSafetensors`;
``parts.jsonl`` in the work folder records each finished (piece, rank, file) with its byte range,
sha256 and the build's input key, which is what lets ``--resume`` continue at the first piece a
killed build had not finished. With ``workers`` > 1 a spawn-context process pool converts pieces
in parallel; each worker writes its result to spool files and this process appends them in piece
order, so the rank files are byte-identical to a serial build's.

Memory: a piece is never materialized. Each parameter is read in chunks of dim-0 rows (whole
experts of an expert stack; :meth:`m3_trt.model.pieces.PieceReader.chunk_rows`) in its stored
dtype, each rank's part of the chunk is cut (:mod:`m3_trt.build.slicing`), cast or FP8-quantized
and streamed to the rank's file (:class:`~m3_trt.build.weights_file.PieceSink`). The working set
is one chunk in fp32 plus its per-rank casts — at full width one expert (151 MB in fp32), or the
largest tensor that is read whole (the dense MLP's fused gate‖up, 604 MB) — whatever the depth or
the width of a piece.

FP8 (``weight_dtype = fp8``):

* **native** — a parameter whose checkpoint entries are all E4M3 with one block shape (MXFP8
  ``[1, 32]`` E8M0, or 128×128 float32 blocks): every rank gets the checkpoint's codes and scales
  as stored, cut along the scale blocks (TP rows/cols, EP experts). Where a split cuts a block the
  rank's grid is made finer (:func:`m3_trt.build.slicing.block_ranges`: each new block repeats its
  parent's scale, so codes and dequantized values stay the checkpoint's) and the parameter is
  named in the report. The weight error against the checkpoint's own dequantized weight is
  measured for every rank on each 2-D weight, and on expert 0 of each expert stack for the ranks
  that hold it (one per distinct cut of an expert's rows/cols): the rank's codes dequantized with
  the rank's scales (as ``load_rank`` does) against the checkpoint's codes dequantized with its
  block scales, cut to the rank — on the rank's first ~1 M values (:func:`_sample_error`;
  dequantizing every code would cost about as much as the conversion; the tests compare every
  weight of every rank through ``load_rank``);
* **per channel** — anything else (a bf16 checkpoint): the rank slice cast to the activation
  dtype, then one fp32 scale per output row, ``amax / 448`` (:func:`m3_trt.quant.fp8.quantize_weight`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from m3_trt.build.slicing import check_selection, gather, selection, take, take_scales
from m3_trt.build.targets import Target
from m3_trt.build.weights_file import PieceSink, StreamingSafetensors, header_room, spool_sink
from m3_trt.model.checkpoint import SCALE_SUFFIX, dequantize_fp8
from m3_trt.model.modeling import DTYPES
from m3_trt.model.pieces import E4M3, PieceModel, piece_names
from m3_trt.model.shard import shard_tensor
from m3_trt.quant.fp8 import is_fp8_weight, quantize_weight


def stream_rank_weights(pm, cfg, tgt: Target, lay, work: Path, todo: list[int], key: str, resume: bool,
                        log, progress: bool, native_report: dict | None = None, workers: int = 1,
                        pieces: list[str] | None = None) -> tuple[dict[int, list], dict[int, int]]:
    """Rank weight files (and FP8 scale files) of the ranks in ``todo``, written piece by piece.

    Each piece is converted once for every rank in ``todo`` (:func:`convert_piece`) — in this
    process, or with ``workers`` > 1 in a pool of that many processes (each writes its result to
    spool files; this process appends them in piece order) — and appended to the rank's files;
    ``parts.jsonl`` records each finished (piece, rank) with its byte range and sha256, so
    ``--resume`` continues at the first piece a killed build had not finished. ``native_report``
    receives, per natively kept FP8 parameter, :func:`convert_piece`'s record (weight error against
    the checkpoint's dequantized weight, checkpoint and rank blocks). ``pieces``: convert only these
    (the scale benchmark's layers; the files are then not a complete build). Returns the writers
    (finished by the caller) and, per rank, how many pieces were kept from a killed run.
    """
    from tqdm import tqdm

    fp8 = tgt.weight_dtype == "fp8"
    meta = pm.meta_state()
    names = piece_names(cfg) if pieces is None else list(pieces)
    parts = _Parts(work / "parts.jsonl", key)
    writers: dict[int, list] = {}
    need: dict[str, list[int]] = {p: [] for p in names}
    kept_pieces: dict[int, int] = {}
    report = native_report if native_report is not None else {}
    for r in todo:
        shapes = [(k, tuple(shard_tensor(k, v, cfg.text, lay, r).shape)) for k, v in meta.items()]
        files = [work / f"rank{r}" / "weights.safetensors"] + ([work / f"rank{r}" / "fp8_scales.safetensors"]
                                                              if fp8 else [])
        ws = []
        for i, f in enumerate(files):
            room = header_room([(k + (SCALE_SUFFIX if i else ""), s) for k, s in shapes])
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

    def record(p: str, recs: dict[int, list[dict]], native: dict[str, dict]) -> None:
        for k, rec in native.items():
            merge_native(report, k, rec)
        for r, per_file in recs.items():
            for w, rec in zip(writers[r], per_file):
                parts.record(w.path.relative_to(work).as_posix(), p, r, rec)
        if part_delay:
            time.sleep(part_delay)

    if workers <= 1:
        for p in tqdm(todo_pieces, desc="pieces", disable=not progress):
            files = piece_files(pm, p, fp8)
            sinks = {r: [w.piece(n) for w, n in zip(writers[r], files)] for r in need[p]}
            native = convert_piece(pm, p, need[p], tgt, lay, sinks)
            record(p, {r: [w.commit(s.close()) for w, s in zip(writers[r], sinks[r])] for r in need[p]}, native)
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
                recs = {r: [w.append_spooled(*f) for w, f in zip(writers[r], files)] for r, files in per_rank.items()}
                record(p, recs, native)
                for files in per_rank.values():
                    for path, _ in files:
                        Path(path).unlink()
        shutil.rmtree(spool, ignore_errors=True)
    return writers, kept_pieces


def piece_files(pm, p: str, fp8: bool) -> list[list[str]]:
    """The tensor names piece ``p`` puts in each rank file: ``[weights]`` or ``[weights, fp8 scales]``."""
    names = sorted(k for k in pm.reader.parameters(p))
    if not fp8:
        return [names]
    return [names, [k + SCALE_SUFFIX for k in names if is_fp8_weight(k, pm.reader.targets[k])]]


def merge_native(report: dict, name: str, rec: dict) -> None:
    """Fold one piece's record of a native FP8 parameter into the build's (worst error, all blocks)."""
    old = report.get(name)
    if old is None:
        report[name] = {**rec, "rank_blocks": sorted(rec["rank_blocks"])}
        return
    old["rel_error"] = max(old["rel_error"], rec["rel_error"])
    old["rank_blocks"] = sorted({tuple(b) for b in old["rank_blocks"]} | {tuple(b) for b in rec["rank_blocks"]})


def convert_piece(pm, p: str, ranks: list[int], tgt: Target, lay, sinks: dict[int, list[PieceSink]]
                  ) -> dict[str, dict]:
    """Piece ``p`` for each rank in ``ranks``, streamed into ``sinks[r]`` (``[weights, (fp8 scales)]``,
    tensors named as :func:`piece_files` says), parameter by parameter, chunk by chunk.

    Returns, per natively kept FP8 parameter, ``{"rel_error", "checkpoint_block", "rank_blocks"}``:
    ``rel_error`` = max over ranks of ‖rank codes × rank scales − the checkpoint's dequantized
    slice‖ / ‖slice‖ (:func:`_sample_error`: 2-D weights; expert 0 of a stack); a rank block smaller than the checkpoint's
    block means the split cut blocks (see the module docstring).
    """
    cfg = pm.cfg.text
    fp8 = tgt.weight_dtype == "fp8"
    store = DTYPES[tgt.dtype if fp8 else tgt.weight_dtype]
    rd = pm.reader
    native: dict[str, dict] = {}
    for name, entries in rd.parameters(p).items():
        meta = rd.targets[name]
        shape = tuple(meta.shape)
        sels = {r: selection(name, shape, cfg, lay, r) for r in ranks}
        for r in ranks:
            check_selection(name, meta, sels[r], cfg, lay, r)
        quant = fp8 and is_fp8_weight(name, meta)
        block = rd.native_block(entries) if quant else None
        rows = shape[0] if shape else 1
        step = rd.chunk_rows(name, entries)
        for a in range(0, rows, step):
            b = min(a + step, rows)
            if block:
                codes, grid = rd.read_fp8_rows(name, entries, a, b, block)
                for r in ranks:
                    c = take(codes, sels[r], a, b)
                    if c is None:
                        continue
                    s, rblock = take_scales(grid, sels[r], a, b, block)
                    c = c.view(E4M3)
                    sinks[r][0].write(name, c)
                    sinks[r][1].write(name + SCALE_SUFFIX, s)
                    rec = native.setdefault(name, {"rel_error": 0.0, "checkpoint_block": list(block),
                                                   "rank_blocks": set()})
                    rec["rank_blocks"].add(rblock)
                    if codes.dim() == 2:
                        err = _sample_error(codes, grid, c, s, sels[r][0], sels[r][1], block, rblock, name)
                    elif a == 0 and sels[r][0][0][0] == 0:  # a stack: expert 0, by every rank holding it
                        err = _sample_error(codes[0], grid[0], c[0], s[0], sels[r][1], sels[r][2], block, rblock, name)
                    else:
                        continue
                    rec["rel_error"] = max(rec["rel_error"], err)
                del codes, grid
                continue
            x = rd.read_rows(name, entries, a, b)
            for r in ranks:
                v = take(x, sels[r], a, b)
                if v is None:
                    continue
                v = v.to(store)
                if quant:
                    c, s = quantize_weight(v)
                    sinks[r][0].write(name, c)
                    sinks[r][1].write(name + SCALE_SUFFIX, s)
                else:
                    sinks[r][0].write(name, v)
            del x
        for r in ranks:
            sinks[r][0].done(name)
            if quant:
                sinks[r][1].done(name + SCALE_SUFFIX)
    return native


# Values per rank and parameter on which the native FP8 weight error is measured: dequantizing
# every FP8 code on CPU (~20-100 M values/s) would cost as much as the conversion.
ERROR_SAMPLE = 1 << 20


def _sample_error(codes: torch.Tensor, grid: torch.Tensor, c: torch.Tensor, s: torch.Tensor, rows, cols,
                  block: tuple[int, int], rblock: tuple[int, int], name: str) -> float:
    """‖rank codes × rank scales − checkpoint codes × block scales‖ / ‖…‖ on the rank's first rows.

    ``codes [R, C]`` / ``grid [R/br, C/bc]``: the checkpoint's (one expert of a stack); ``c`` /
    ``s``: the rank's slice (rows ``rows``, cols ``cols`` of it) with blocks ``rblock``. Measured on
    the rows of the rank's first row range inside a window of whole checkpoint blocks holding about
    :data:`ERROR_SAMPLE` values — the window ends on a checkpoint block, the range's ends on rank
    blocks, so both sides dequantize whole blocks of their own grid.
    """
    br, gr = block[0], rblock[0]
    s0, t0 = rows[0]
    base = s0 // br * br
    k = max(br, -(-ERROR_SAMPLE // max(codes.shape[1], 1)) // br * br)
    end = min(t0, base + k)
    hi = -(-end // br) * br
    want = dequantize_fp8(codes[base:hi].view(E4M3), grid[base // br:hi // br], torch.float32, name=name)
    want = gather(want[s0 - base:end - base], 1, cols)
    got = dequantize_fp8(c[:end - s0], s[:(end - s0) // gr], torch.float32, name=name)
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


_WORKER: dict = {}


def _worker_init(ckpt: str, tgt: Target, lay) -> None:
    torch.set_num_threads(1)  # N workers share the host's cores
    _WORKER.update(pm=PieceModel(ckpt), tgt=tgt, lay=lay)


def _worker_piece(p: str, ranks: list[int], spool: str) -> tuple[dict[int, list], dict[str, dict]]:
    """One piece converted in a worker process into spool files the main process appends."""
    pm, tgt = _WORKER["pm"], _WORKER["tgt"]
    files = piece_files(pm, p, tgt.weight_dtype == "fp8")
    paths = {r: [Path(spool) / f"{p}.rank{r}.{i}.bin" for i in range(len(files))] for r in ranks}
    sinks = {r: [spool_sink(path, n) for path, n in zip(paths[r], files)] for r in ranks}
    native = convert_piece(pm, p, ranks, tgt, _WORKER["lay"], sinks)
    return {r: [(str(path), s.close()["tensors"]) for path, s in zip(paths[r], sinks[r])] for r in ranks}, native


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


def native_fp8_report(native: dict[str, dict]) -> dict:
    """build.json's ``quantization.native_fp8``: how many parameters kept the checkpoint's FP8 codes
    and scales, the worst weight error against its dequantized weights, and every re-blocked one."""
    reblocked = {k: {"checkpoint_block": v["checkpoint_block"], "rank_blocks": [list(b) for b in v["rank_blocks"]]}
                 for k, v in sorted(native.items())
                 if any(tuple(b) != tuple(v["checkpoint_block"]) for b in v["rank_blocks"])}
    return {"tensors": len(native), "max_rel_weight_error": max(v["rel_error"] for v in native.values()),
            "reference": "the checkpoint's own dequantized weights: each rank's codes x its scales (as load_rank "
                         "dequantizes them) against the checkpoint's codes x block scales, cut to the rank, on each "
                         "rank's first ~1 M values of every 2-D weight and of expert 0 of every expert stack",
            "layout": "codes and scales as stored in the checkpoint, cut along the scale blocks per rank",
            "reblocked": reblocked,
            "reblocked_why": "a tensor-parallel split cuts the checkpoint's scale blocks: the rank's grid uses blocks "
                             "of gcd(block, split ends) rows/cols, each repeating its checkpoint block's scale (codes "
                             "and dequantized values unchanged)" if reblocked else None}
