"""Build memory and time against depth and at full width, and the 60-layer projection (issue 12, item 10).

Three parts, each a median of ``--runs`` (>= 3) runs, each run its own subprocess:

1. **Depth** — ``build-engine`` of project-made checkpoints (original on-disk layout, bf16, no
   tokenizer files, so FP8 calibration runs on token-id prompts) ``--hidden`` wide with
   ``--experts`` experts at ``--layers`` depths (default 1024 wide, 32 experts, 4 and 12 layers),
   for ``--target cpu`` and ``b200x8-fp8``, both with ``--set onnx=false``: the depth bound is
   about the weights and calibration stages, and the per-rank ONNX export is not part of it (the
   sharded graphs had their own whole-model step; see the README's known limits). Peak RSS is
   the build's (``getrusage(RUSAGE_CHILDREN)`` of a small parent), with the 12/4 ratio.
2. **Full width** — ``make-synthetic --preset m3 --layers 1|2 --format mxfp8`` (the real widths:
   hidden 6144, 128 experts x 3072; 1 layer = one sparse-MoE layer, 2 = a dense + a MoE layer),
   then the build's **rank-weight conversion of the decoder layers** to ``b200x8-fp8`` (8 ranks,
   native FP8: ``m3_trt.build.rank_weights.stream_rank_weights``) in a child process. Not the whole
   ``build-engine``: its layer-by-layer FP8 calibration holds one layer in fp32 (29 GB at full
   width), and the embedding, LM head and vision tower are replicated into all 8 ranks (~40 GB of
   files); neither fits this kind of host, and neither is what the memory bound is about. Per run:
   the child's peak RSS (``VmHWM``) after setup (``baseline``) and after converting, seconds per
   layer, and input GB/s — against a **cold read** of the same byte ranges of the same shard files
   (pages evicted with ``posix_fadvise(DONTNEED)`` before each read and each conversion; dropping
   the whole page cache needs root). The issue's goals: conversion >= 0.8 x cold read; peak <=
   1.3 x the layer's stored bytes + 2 GiB.
3. **Projection** for the real 60-layer checkpoint (3 dense + 57 MoE layers, embedding, LM head,
   vision tower): host memory from :func:`m3_trt.build.plan.host_memory` (1 and 8 workers) and
   wall time of the weight conversion — 1 worker: the measured seconds per layer of each kind x
   their count + the rest of the bytes at the measured conversion GB/s; 8 workers: the larger of
   that / 8 and every byte once at the cold-read GB/s (one disk serves all workers). On paper,
   from the measured figures; calibration and engine builds are not included.

Disk and memory are checked before anything large is written (the full-width part needs about 23 GB
of disk at two layers; everything is written under a temp folder beside ``--out`` and removed).
The load average is recorded at the start; with a 1-minute load >= 1 the result is written with
``"quoted": false`` (do not quote it).

    python benchmarks/scale.py                               # the issue's sizes (needs ~25 GB free disk)
    python benchmarks/scale.py --skip-full-width             # depth part only
    python benchmarks/scale.py --smoke --out /tmp/scale      # smallest sizes, 1 run: checks the script runs

Writes ``<out>/scale-<machine>.json`` and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from convert_throughput import evict  # sibling benchmark (run as `python benchmarks/scale.py`): one page-cache eviction

GB = 1e9
GIB = 1 << 30
# Runs argv[1:] and prints its peak RSS (KiB). The build is the child of this small process: a
# child's ru_maxrss includes the RSS of the process it was (v)forked from.
MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
TARGET_SETS = {"cpu": ["--set", "onnx=false"], "b200x8-fp8": ["--set", "onnx=false"]}
# The conversion child: converts the given pieces one call each (fresh work folder per piece) and
# prints per-piece seconds and its VmHWM before/after (KiB; VmHWM starts at exec, unlike ru_maxrss).
CONVERT = r"""
import json, sys, time
from pathlib import Path
from m3_trt.build.rank_weights import stream_rank_weights
from m3_trt.build.targets import load_target
from m3_trt.model.pieces import PieceModel
from m3_trt.model.shard import Layout
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
ckpt, work, target, pieces = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
pm = PieceModel(ckpt)
tgt = load_target(target, {"onnx": False})
lay = Layout.of(tgt.tp, tgt.ep)
stream_rank_weights(pm, pm.cfg, tgt, lay, work / "setup", list(range(lay.world)), "bench", False, print, False,
                    {}, pieces=[])
base = hwm()
secs, native = {}, {}
for p in pieces:
    t0 = time.perf_counter()
    writers, _ = stream_rank_weights(pm, pm.cfg, tgt, lay, work / p, list(range(lay.world)), "bench", False,
                                     print, False, native, pieces=[p])
    for ws in writers.values():
        for w in ws:
            w.finish()
    secs[p] = time.perf_counter() - t0
print(json.dumps({"seconds": secs, "baseline_kib": base, "peak_kib": hwm(),
                  "native_tensors": len(native), "max_rel_weight_error": max((v["rel_error"] for v in native.values()),
                                                                             default=None)}))
"""


# -- part 1: depth ------------------------------------------------------------------------------

def make_checkpoint(out: Path, layers: int, hidden: int, experts: int, inter: int) -> Path:
    """Original-layout bf16 shards + config.json, one tensor drawn at a time (no whole model in memory)."""
    import torch

    from m3_trt.model import config as cfgmod
    from m3_trt.model.checkpoint import original_layout, write_sharded
    from m3_trt.model.modeling import M3ForConditionalGeneration

    cfg = cfgmod.tiny()
    # 8 query heads over 2 KV heads: divides over the 8 ranks of b200x8-* (KV heads replicated)
    text = replace(cfg.text, hidden_size=hidden, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                   rotary_dim=64, index_head_dim=64, intermediate_size=inter, dense_intermediate_size=2 * inter,
                   shared_intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=4,
                   vocab_size=32768, num_hidden_layers=layers, max_position_embeddings=131072,
                   layer_types=tuple("full_attention" if i % 4 == 0 else "minimax_m3_sparse" for i in range(layers)),
                   mlp_layer_types=tuple("dense" if i == 0 else "sparse" for i in range(layers)))
    cfg = replace(cfg, text=text, projector_hidden_size=hidden)
    with torch.device("meta"):
        meta = M3ForConditionalGeneration(cfg).state_dict()
    g = torch.Generator().manual_seed(0)

    def tensors():
        for k, t in original_layout(meta, layers):
            yield k, (torch.randn(t.shape, generator=g) * 0.02).to(torch.bfloat16)

    out.mkdir(parents=True)
    write_sharded(tensors(), out, 1 << 30)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return out


def run_build(ckpt: Path, target: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "m3_trt.cli.main", "build-engine", str(ckpt), "--target", target, "--out", str(out),
           "--no-progress", *TARGET_SETS.get(target, [])]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    if p.returncode:
        raise RuntimeError(f"build-engine {ckpt.name} --target {target} failed:\n{p.stderr[-2000:]}")
    return {"peak_rss_mib": int(p.stdout.split()[-1]) / 1024, "seconds": dt}


def depth_part(tmp: Path, a) -> dict:
    out: dict = {"width": {"hidden": a.hidden, "experts": a.experts, "inter": a.inter}, "targets": {},
                 "sets": {t: " ".join(TARGET_SETS[t]) for t in a.targets}}
    for n in a.layers:
        ckpt = make_checkpoint(tmp / f"depth{n}", n, a.hidden, a.experts, a.inter)
        stored = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        for target in a.targets:
            runs = [run_build(ckpt, target, tmp / f"out{n}") for _ in range(a.runs)]
            out["targets"].setdefault(target, {})[str(n)] = {
                "checkpoint_bytes": stored, "runs": runs,
                "peak_rss_mib": round(statistics.median(r["peak_rss_mib"] for r in runs), 1),
                "seconds": round(statistics.median(r["seconds"] for r in runs), 2)}
        shutil.rmtree(ckpt)
    for target, by in out["targets"].items():
        if len(by) >= 2:
            lo, hi = min(by, key=int), max(by, key=int)
            by["peak_ratio"] = {"layers": [int(lo), int(hi)],
                                "ratio": round(by[hi]["peak_rss_mib"] / by[lo]["peak_rss_mib"], 3), "bound": 1.25}
    return out


# -- part 2: full width -------------------------------------------------------------------------

def piece_ranges(ckpt: Path, pieces: list[str]) -> list[tuple[Path, int, int]]:
    """The byte ranges (file, begin, end) of the pieces' tensors and scales, in file order."""
    from m3_trt.model.pieces import PieceModel

    rd = PieceModel(ckpt).reader
    out = []
    for p in pieces:
        for e in rd.entries[p]:
            for k in (e.key, e.scale_key):
                if k:
                    path, _, _, begin, end = rd.files.loc[k]
                    out.append((path, begin, end))
    return sorted(out)


def cold_read(ranges) -> float:
    """Seconds to read ``ranges`` after evicting their files (16 MiB reads, file order)."""
    evict(sorted({p for p, _, _ in ranges}))
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    fh = {}
    try:
        for path, begin, end in ranges:
            f = fh.get(path) or fh.setdefault(path, open(path, "rb", buffering=0))
            f.seek(begin)
            left = end - begin
            while left:
                n = f.readinto(view[:min(left, len(buf))])
                if not n:
                    raise RuntimeError(f"{path}: short read")
                left -= n
    finally:
        for f in fh.values():
            f.close()
    return time.perf_counter() - t0


def synthetic_bytes(preset: str, layers: int) -> tuple[int, dict[str, int]]:
    """On-disk bytes of ``make-synthetic --preset P --layers N --format mxfp8`` and per decoder layer
    (computed from the specs before anything is written)."""
    from m3_trt.checkpoints.synthetic import preset_config, storage_specs, tensor_specs
    from m3_trt.checkpoints.tiny_tokenizer import write_tiny_tokenizer
    from m3_trt.model.checkpoint import SCALE_SUFFIX, map_key
    from m3_trt.model.pieces import piece_of

    with tempfile.TemporaryDirectory() as d:
        ids = write_tiny_tokenizer(Path(d))
    specs, _ = storage_specs(tensor_specs(preset_config(preset, layers, ids)), "mxfp8")
    per: dict[str, int] = {}
    for s in specs:
        key = s.name[: -len(SCALE_SUFFIX)] if s.name.endswith(SCALE_SUFFIX) else s.name
        hit = map_key(key)
        p = piece_of(hit[0]) if hit else "other"
        per[p] = per.get(p, 0) + s.nbytes
    return sum(per.values()), per


def full_width_part(tmp: Path, a) -> dict:
    from m3_trt.build.plan import host_available_bytes, host_memory, make_plan
    from m3_trt.build.targets import load_target
    from m3_trt.checkpoints.synthetic import make_synthetic
    from m3_trt.model.config import M3Config

    out: dict = {"preset": a.preset, "target": "b200x8-fp8", "stage": "rank-weight conversion of the decoder layers "
                 "(stream_rank_weights, 8 ranks, native MXFP8), not the whole build-engine", "layers": {}}
    for n in a.full_width_layers:
        total, per = synthetic_bytes(a.preset, n)
        layers = [f"layer.{i}" for i in range(n)]
        layer_bytes = sum(per[p] for p in layers)
        free = shutil.disk_usage(tmp).free
        need_disk = total + layer_bytes + 2 * GIB  # checkpoint + the ranks' files of one run + slack
        if need_disk > free:
            raise RuntimeError(f"full width, {n} layer(s): needs {need_disk / GB:.1f} GB of disk, {free / GB:.1f} GB "
                               f"free under {tmp}")
        ckpt = tmp / f"m3-{n}"
        t0 = time.perf_counter()
        make_synthetic(ckpt, preset=a.preset, layers=n, fmt="mxfp8")
        made = time.perf_counter() - t0
        make_plan(M3Config.from_pretrained(ckpt), load_target("b200x8-fp8"))  # refuses a split the model cannot take
        host = host_memory(M3Config.from_pretrained(ckpt), 1)
        if host["need_bytes"] > host_available_bytes():
            raise RuntimeError(f"full width: {host['text']}: does not fit this host")
        ranges = piece_ranges(ckpt, layers)
        shards = sorted(ckpt.glob("*.safetensors"))
        reads, runs = [], []
        for _ in range(a.runs):
            reads.append(cold_read(ranges))
            work = tmp / "convert"
            evict(shards)
            p = subprocess.run([sys.executable, "-c", CONVERT, str(ckpt), str(work), "b200x8-fp8", ",".join(layers)],
                               capture_output=True, text=True)
            shutil.rmtree(work, ignore_errors=True)
            os.sync()
            if p.returncode:
                raise RuntimeError(f"conversion of {ckpt} failed:\n{p.stderr[-2000:]}")
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        shutil.rmtree(ckpt)
        read_s = statistics.median(reads)
        conv_s = statistics.median(sum(r["seconds"].values()) for r in runs)
        per_layer = {q: round(statistics.median(r["seconds"][q] for r in runs), 2) for q in layers}
        peak = statistics.median(r["peak_kib"] for r in runs) * 1024
        base = statistics.median(r["baseline_kib"] for r in runs) * 1024
        moe = max(layers, key=lambda q: per[q])
        out["layers"][str(n)] = {
            "checkpoint_bytes": total, "layer_bytes": {q: per[q] for q in layers}, "make_synthetic_seconds": round(made, 1),
            "seconds_per_layer": per_layer, "convert_seconds": round(conv_s, 2), "cold_read_seconds": round(read_s, 2),
            "convert_GBps": round(layer_bytes / conv_s / GB, 3), "cold_read_GBps": round(layer_bytes / read_s / GB, 3),
            "convert_over_cold_read": round(read_s / conv_s, 3), "goal_convert_over_cold_read": 0.8,
            "peak_rss_bytes": int(peak), "baseline_rss_bytes": int(base),
            "bound_bytes": int(1.3 * per[moe] + 2 * GIB), "bound": "1.3 x the MoE layer's stored bytes + 2 GiB",
            "within_bound": peak <= 1.3 * per[moe] + 2 * GIB,
            "native_fp8": {"tensors": runs[0]["native_tensors"], "max_rel_weight_error": runs[0]["max_rel_weight_error"]},
            "runs": runs, "cold_reads_seconds": [round(x, 2) for x in reads]}
    return out


# -- part 3: projection -------------------------------------------------------------------------

def projection(full: dict) -> dict | None:
    """60-layer figures on paper from the full-width measurements (see the module docstring)."""
    from m3_trt.build.plan import host_memory
    from m3_trt.model.config import full_size

    if not full or not full.get("layers"):
        return None
    cfg = full_size()
    runs = full["layers"]
    one = runs.get("1") or next(iter(runs.values()))
    moe_s = max(one["seconds_per_layer"].values())
    two = runs.get("2")
    dense_s = min(two["seconds_per_layer"].values()) if two else moe_s
    convert_bps = min(r["convert_GBps"] for r in runs.values()) * GB
    read_bps = min(r["cold_read_GBps"] for r in runs.values()) * GB
    total, per = synthetic_bytes("m3", cfg.text.num_hidden_layers)
    layer_bytes = sum(v for k, v in per.items() if k.startswith("layer."))
    rest = total - layer_bytes
    n_dense = sum(t == "dense" for t in cfg.text.mlp_layer_types)
    n_moe = cfg.text.num_hidden_layers - n_dense
    t1 = n_moe * moe_s + n_dense * dense_s + rest / convert_bps
    t8 = max(t1 / 8, total / read_bps)
    return {"checkpoint_bytes": total, "layers": {"dense": n_dense, "moe": n_moe},
            "host_memory_1_worker_bytes": host_memory(cfg, 1, available=1 << 50)["need_bytes"],
            "host_memory_8_workers_bytes": host_memory(cfg, 8, available=1 << 50)["need_bytes"],
            "convert_seconds_1_worker": round(t1), "convert_seconds_8_workers": round(t8),
            "formula": "1 worker: moe_s x MoE layers + dense_s x dense layers + (embedding, head, vision bytes) / "
                       "measured convert GB/s; 8 workers: max(that / 8, all bytes / measured cold-read GB/s); "
                       "rank-weight conversion only (no calibration, ONNX or engines); replicated pieces written "
                       "to 8 ranks are counted once"}


# -- main ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    ap.add_argument("--targets", nargs="+", default=list(TARGET_SETS), choices=list(TARGET_SETS))
    ap.add_argument("--full-width-layers", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--preset", default="m3", help="make-synthetic preset of the full-width part (m3 = real widths)")
    ap.add_argument("--skip-full-width", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--smoke", action="store_true",
                    help="small sizes, one run (256 wide at 1 and 2 layers; make-synthetic preset medium, the smallest "
                         "that splits over 8 ranks): checks the script only")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args(argv)
    if a.smoke:
        a.hidden, a.experts, a.inter, a.layers, a.preset, a.runs = 256, 8, 128, [1, 2], "medium", 1
    elif a.runs < 3:
        ap.error("--runs: the figures are medians of at least 3 runs (use --smoke to check the script)")
    load = os.getloadavg()
    quoted = load[0] < 1 and not a.smoke
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".m3-scale-", dir=a.out) as d:
        tmp = Path(d)
        depth = depth_part(tmp, a)
        full = None if a.skip_full_width or not a.full_width_layers else full_width_part(tmp, a)
    proj = projection(full) if full and a.preset == "m3" else None
    machine = socket.gethostname().split(".")[0]
    result = {"machine": machine, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
              "load_avg_at_start": [round(x, 2) for x in load], "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
              "quoted": quoted, "smoke": a.smoke, "runs_per_figure": a.runs,
              "why_not_quoted": None if quoted else ("smoke run" if a.smoke else f"1-minute load {load[0]:.2f} >= 1 at "
                                                                                 "start"),
              "depth": depth, "full_width": full, "projection_60_layers": proj,
              "seconds": round(time.perf_counter() - t0, 1)}
    path = a.out / f"scale-{machine}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {path}" + ("" if quoted else " (quoted: false)"))
    return 0


def print_table(res: dict) -> None:
    print(f"{'what':48s} {'peak RSS':>12s} {'seconds':>9s}  note")
    for target, by in res["depth"]["targets"].items():
        for n, r in by.items():
            if n == "peak_ratio":
                continue
            what = f"{target}, {n} layers, {res['depth']['width']['hidden']} wide"
            print(f"{what:48s} {r['peak_rss_mib']:8.0f} MiB {r['seconds']:9.1f}")
        if "peak_ratio" in by:
            pr = by["peak_ratio"]
            print(f"{'  ' + target + ' peak ratio ' + str(pr['layers'][1]) + '/' + str(pr['layers'][0]):48s} "
                  f"{pr['ratio']:12.3f} {'':9s}  bound {pr['bound']}")
    for n, r in ((res["full_width"] or {}).get("layers") or {}).items():
        print(f"{'full width ' + n + ' layer(s) -> 8 ranks':48s} {r['peak_rss_bytes'] / GIB:8.2f} GiB "
              f"{r['convert_seconds']:9.1f}  {r['convert_GBps']} GB/s vs cold read {r['cold_read_GBps']} GB/s "
              f"({r['convert_over_cold_read']}x); bound {r['bound_bytes'] / GIB:.2f} GiB")
    p = res.get("projection_60_layers")
    if p:
        print(f"{'projection: 60 layers, 1 worker':48s} {p['host_memory_1_worker_bytes'] / GIB:8.2f} GiB "
              f"{p['convert_seconds_1_worker']:9d}")
        print(f"{'projection: 60 layers, 8 workers':48s} {p['host_memory_8_workers_bytes'] / GIB:8.2f} GiB "
              f"{p['convert_seconds_8_workers']:9d}")


if __name__ == "__main__":
    raise SystemExit(main())
