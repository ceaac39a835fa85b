"""Shard-by-shard FP8 conversion throughput vs plain file-read speed, and the conversion's peak memory.

Writes a ~2 GB random bf16 checkpoint (several shards, fsynced) into a temp dir on the same disk as
the output, then, in this order:

* **cold read**: every file's pages evicted (``posix_fadvise(DONTNEED)``), then plain ``readinto``
  in 16 MiB chunks — the machine's plain file-read speed from disk;
* **warm read**: the same read again (files now in the page cache);
* **cold conversion**: source pages evicted again, then ``m3_trt.quant.convert_shards_fp8`` in a
  child process that does nothing else (imports, converts, exits). Its peak RSS is the child's own
  ``VmHWM`` (``/proc/self/status``), read right after its imports and after converting, so the
  conversion's own share (peak - baseline) is shown beside the whole-process figure.
  ``getrusage(RUSAGE_CHILDREN)`` is recorded too but is not the child's own figure: Linux carries
  ``ru_maxrss`` across fork + exec, so it starts at this parent's RSS;
* **warm conversion**: the same, source in the page cache.

Speeds are input bytes per second (what a user's checkpoint size divides by); the conversion time
includes writing and fsyncing its output. JSON to ``benchmarks/results/convert-<host>.json`` with the
machine and the load average (the machine is shared: numbers move with the load).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
from m3_trt.quant import convert_shards_fp8
def hwm():  # this process's own peak RSS (KiB); ru_maxrss would include the forking parent's
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
base = hwm()
t0 = time.perf_counter()
stats = convert_shards_fp8(sys.argv[1], sys.argv[2])
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "baseline_rss_kib": base, "peak_rss_kib": hwm(),
                  "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, **stats}))
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


def convert_in_child(src: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst)], check=True, capture_output=True,
                         text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # RUSAGE_CHILDREN is reported for reference only: Linux keeps a process's maxrss across
    # fork + exec, so it starts at this (parent) process's RSS, which holds the generated checkpoint
    res["rusage_children_maxrss_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return res


def main(total_gb: float = 2.0, n_shards: int = 4, tensor_mb: int = 64) -> dict:
    import torch
    from safetensors.torch import save_file

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
        files = sorted(src.glob("*.safetensors"))
        total = sum(f.stat().st_size for f in files)
        largest = rows * cols * 2
        evict(files)
        cold_s = read_all(files)
        warm_s = read_all(files)
        evict(files)
        cold = convert_in_child(src, dst)
        warm = convert_in_child(src, dst)  # source pages are cached now
        mb = lambda s: round(total / s / 1e6, 1)  # noqa: E731
        peak_mib = max(cold["peak_rss_kib"], warm["peak_rss_kib"]) / 1024
        ru_children_mib = warm["rusage_children_maxrss_kib"] / 1024
        base_mib = cold["baseline_rss_kib"] / 1024
        res = {
            "host": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "convert_workers": 2, "convert_torch_threads_per_worker": 1, "checkpoint_bytes": total, "shards": n_shards,
            "largest_tensor_bytes": largest,
            "read_cold_MBps": mb(cold_s), "read_warm_MBps": mb(warm_s),
            "convert_cold_MBps": mb(cold["seconds"]), "convert_warm_MBps": mb(warm["seconds"]),
            "convert_cold_over_read_cold": round(cold_s / cold["seconds"], 3),
            "convert_warm_over_read_warm": round(warm_s / warm["seconds"], 3),
            "target_half_of_cold_read_met": cold_s / cold["seconds"] >= 0.5,
            "child_peak_rss_MiB": round(peak_mib, 1), "child_rss_after_imports_MiB": round(base_mib, 1),
            "conversion_extra_rss_MiB": round(peak_mib - base_mib, 1),
            "rusage_children_maxrss_MiB_inherits_parent": round(ru_children_mib, 1),
            "two_x_largest_tensor_MiB": round(2 * largest / 2**20, 1),
            "conversion_extra_under_2x_largest": (peak_mib - base_mib) * 2**20 < 2 * largest,
            "whole_child_under_2x_largest": peak_mib * 2**20 < 2 * largest,
            "bytes_out": cold["bytes_out"],
            "note": "convert time includes writing + fsync of the output; RSS of the child includes "
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
    main()
