"""Shard-by-shard FP8 conversion throughput vs plain file-read speed, and peak memory.

Writes a ~2 GB random bf16 checkpoint (several shards) into a temp dir, reads every file once
(plain ``read`` in 16 MiB chunks: the "file-read speed"; the files were just written, so they are
mostly in the page cache — "cold-ish", not cold), then converts it with
``m3_trt.quant.convert_shards_fp8`` (per-output-channel E4M3) and measures MB/s of input bytes and
peak RSS (``resource.getrusage``, the whole process) against 2x the largest tensor.
JSON to ``benchmarks/results/convert-<host>.json``.
"""

from __future__ import annotations

import json
import platform
import resource
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(total_gb: float = 2.0, n_shards: int = 4, tensor_mb: int = 64) -> dict:
    from safetensors.torch import save_file

    from m3_trt.quant import convert_shards_fp8

    tmp = Path(tempfile.mkdtemp(prefix="m3-convert-"))
    try:
        src, dst = tmp / "src", tmp / "dst"
        src.mkdir()
        rows = 4096
        cols = tensor_mb * 2**20 // (2 * rows)
        per_shard = int(total_gb * 1e9 / n_shards / (rows * cols * 2))
        g = torch.Generator().manual_seed(0)
        for s in range(n_shards):
            save_file({f"layers.{s}.{i}.weight": torch.randn(rows, cols, generator=g).to(torch.bfloat16)
                       for i in range(per_shard)}, str(src / f"model-{s:05d}.safetensors"))
        largest = rows * cols * 2
        rss_before = _rss_mib()
        files = sorted(src.glob("*.safetensors"))
        total = sum(f.stat().st_size for f in files)
        t0 = time.perf_counter()
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(16 << 20):
                    pass
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = convert_shards_fp8(src, dst)
        conv_s = time.perf_counter() - t0
        peak = _rss_mib()
        res = {
            "host": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "checkpoint_bytes": total, "shards": n_shards,
            "largest_tensor_bytes": largest, "read_MBps": round(total / read_s / 1e6, 1),
            "convert_MBps": round(total / conv_s / 1e6, 1),
            "convert_over_read": round((total / conv_s) / (total / read_s), 3),
            "peak_rss_MiB": round(peak, 1), "rss_before_convert_MiB": round(rss_before, 1),
            "peak_rss_over_2x_largest_tensor": round(peak * 2**20 / (2 * largest), 2),
            "bytes_out": stats["bytes_out"],
            "note": "read after writing (page cache warm: cold-ish); peak RSS is the whole process "
                    "(Python + torch ~300 MiB included) and is the max over the run, incl. writing the source",
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
