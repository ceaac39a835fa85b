"""Shard-by-shard FP8 conversion throughput vs plain file-read speed, and the conversion's peak memory.

Writes a ~2 GB random bf16 checkpoint (4 shards of 64 MiB ``[4096, 8192]`` tensors, fsynced) into a
temp dir on the same disk as the output, then runs ``--rounds`` rounds (default 3) of, in this order:

* **cold read**: every file's pages evicted (``posix_fadvise(DONTNEED)``), then plain ``readinto``
  in 16 MiB chunks, one file after the other — the machine's plain file-read speed from disk;
* **cold conversion**: source pages evicted again, then ``m3_trt.quant.encode.convert_shards_fp8`` in a
  child process that does nothing else (imports, converts, exits). Its peak RSS is the child's own
  ``VmHWM`` (``/proc/self/status``), read right after its imports and after converting, so the
  conversion's own share (peak - baseline) is shown beside the whole-process figure;
* **warm read** and **warm conversion**: the same, the source now in the page cache.

Before each timed step the previous output is deleted and ``os.sync()`` run (see :func:`clear`).

Cold and warm figures are medians over the rounds; interleaving read and convert in each round
keeps both under the same load (the machine is shared: the load average is recorded before and
after). **Quantize only**: the conversion's per-row kernel on an in-memory tensor (no IO), one torch
thread, and two threads on two tensors at once — the compute ceiling of the conversion.
``--torch-kernel`` quantizes with torch ops instead of the fused C kernel (for comparison).

Speeds are input bytes per second (what a user's checkpoint size divides by); the conversion time
includes writing and fsyncing its output. JSON to ``benchmarks/results/convert-<host>.json``.
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
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
from m3_trt.quant.encode import convert_shards_fp8
def hwm():  # this process's own peak RSS (KiB); ru_maxrss would include the forking parent's
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
base = hwm()
t0 = time.perf_counter()
stats = convert_shards_fp8(sys.argv[1], sys.argv[2], workers=int(sys.argv[3]), chunk_bytes=int(sys.argv[4]))
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "baseline_rss_kib": base, "peak_rss_kib": hwm(), **stats}))
"""


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(paths: list[Path]) -> float:
    buf = bytearray(16 << 20)
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def clear(dst: Path) -> None:
    """Delete the last output and let the disk settle before timing anything: the root fs is mounted
    with ``discard``, and the trims of ~1 GB of freed blocks would otherwise run during the next run."""
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()


def convert_in_child(src: Path, dst: Path, workers: int, chunk_bytes: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), str(workers), str(chunk_bytes)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def quantize_only(x_RC, threads: int, repeats: int = 3) -> float:
    """Input MB/s of the conversion's row kernel on in-memory data, ``threads`` tensors at once."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from m3_trt.quant.encode import _SUB_BYTES, E4M3, _RowQuantizer

    rows, cols = x_RC.shape
    sub = _SUB_BYTES // (cols * x_RC.element_size())

    def one(_):
        q = _RowQuantizer(x_RC.dtype, cols, sub)
        codes, scales = torch.empty(rows, cols, dtype=E4M3), torch.empty(rows, 1)
        for r in range(0, rows, sub):
            q(x_RC[r:r + sub], codes[r:r + sub], scales[r:r + sub])

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    best = float("inf")
    try:
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(pool.map(one, range(threads)))
                best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return threads * x_RC.nbytes / best / 1e6


def main(total_gb: float = 2.0, n_shards: int = 4, tensor_mb: int = 64, rounds: int = 3, workers: int = 4,
         chunk_mib: int = 1) -> dict:
    import torch
    from safetensors.torch import save_file

    chunk_bytes = chunk_mib << 20
    load_before = [round(x, 2) for x in os.getloadavg()]
    tmp = Path(tempfile.mkdtemp(prefix="m3-convert-", dir=os.environ.get("M3_BENCH_TMP")))
    try:
        src, dst = tmp / "src", tmp / "dst"
        src.mkdir()
        rows = 4096
        cols = tensor_mb * 2**20 // (2 * rows)
        per_shard = int(total_gb * 1e9 / n_shards / (rows * cols * 2))
        g = torch.Generator().manual_seed(0)
        for s in range(n_shards):
            save_file({f"layers.{s}.{i}.weight": torch.randn(rows, cols, generator=g).to(torch.bfloat16)
                       for i in range(per_shard)} | {f"layers.{s}.norm.weight": torch.ones(cols)},
                      str(src / f"model-{s:05d}.safetensors"))
        x_RC = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
        q1, q2 = quantize_only(x_RC, 1), quantize_only(x_RC, 2)
        del x_RC
        files = sorted(src.glob("*.safetensors"))
        total = sum(f.stat().st_size for f in files)
        largest = rows * cols * 2
        runs = {"read_cold": [], "convert_cold": [], "read_warm": [], "convert_warm": []}
        children = []
        for _ in range(rounds):
            clear(dst)
            evict(files)
            runs["read_cold"].append(read_all(files))
            evict(files)
            children.append(convert_in_child(src, dst, workers, chunk_bytes))
            runs["convert_cold"].append(children[-1]["seconds"])
            clear(dst)
            runs["read_warm"].append(read_all(files))
            children.append(convert_in_child(src, dst, workers, chunk_bytes))
            runs["convert_warm"].append(children[-1]["seconds"])
        mbps = {k: [round(total / s / 1e6, 1) for s in v] for k, v in runs.items()}
        med = {k: statistics.median(v) for k, v in mbps.items()}
        peak_mib = max(c["peak_rss_kib"] for c in children) / 1024
        base_mib = min(c["baseline_rss_kib"] for c in children) / 1024
        extra_mib = max(c["peak_rss_kib"] - c["baseline_rss_kib"] for c in children) / 1024
        from m3_trt.quant.encode import _c_kernel

        res = {
            "host": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
            "quantize_kernel": "fused C (m3_trt.quant.encode._c_kernel)" if _c_kernel() else "torch div + cast",
            "cores": os.cpu_count(), "load_average_1_5_15_before": load_before,
            "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
            "method": f"{rounds} rounds of (evict, cold read, evict, cold convert, warm read, warm convert); "
                      "medians; read = readinto 16 MiB one file after the other; convert = child process, "
                      "timed from after imports to after fsync of every output file; previous output deleted and "
                      "os.sync() before each timed step",
            "convert_workers": workers, "convert_chunk_MiB": chunk_mib, "convert_torch_threads_per_worker": 1,
            "checkpoint_bytes": total, "shards": n_shards, "largest_tensor_bytes": largest,
            "runs_MBps": mbps,
            "read_cold_MBps": med["read_cold"], "read_warm_MBps": med["read_warm"],
            "convert_cold_MBps": med["convert_cold"], "convert_warm_MBps": med["convert_warm"],
            "quantize_only_MBps_1_thread": round(q1, 1), "quantize_only_MBps_2_threads": round(q2, 1),
            "convert_cold_over_read_cold": round(med["convert_cold"] / med["read_cold"], 3),
            "convert_warm_over_read_warm": round(med["convert_warm"] / med["read_warm"], 3),
            "target_half_of_cold_read_met": med["convert_cold"] >= 0.5 * med["read_cold"],
            "child_peak_rss_MiB": round(peak_mib, 1), "child_rss_after_imports_MiB": round(base_mib, 1),
            "conversion_extra_rss_MiB": round(extra_mib, 1),
            "two_x_largest_tensor_MiB": round(2 * largest / 2**20, 1),
            "conversion_extra_under_2x_largest": extra_mib * 2**20 < 2 * largest,
            "whole_child_under_2x_largest": peak_mib * 2**20 < 2 * largest,
            "bytes_out": children[0]["bytes_out"],
            "note": "convert time includes writing + fsync of the output (bytes_out); RSS of the child includes "
                    "Python + torch imports (child_rss_after_imports_MiB)",
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(__file__).parent / "results" / f"convert-{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--chunk-mib", type=int, default=1)
    ap.add_argument("--total-gb", type=float, default=2.0)
    ap.add_argument("--torch-kernel", action="store_true", help="quantize with torch ops, not the fused C kernel")
    a = ap.parse_args()
    if a.torch_kernel:
        os.environ["M3_TRT_NO_CKERNEL"] = "1"  # read on first use here and in the children
    main(total_gb=a.total_gb, rounds=a.rounds, workers=a.workers, chunk_mib=a.chunk_mib)
