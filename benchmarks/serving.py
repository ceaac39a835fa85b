"""Serving benchmark: the tiny checkpoint's Triton repository vs the same pipeline in-process.

For 1, 4 and 16 concurrent clients (threads, each sending its share of N streaming requests,
alternating text-only and image+text): requests/s, time to first token (TTFT) and inter-token
latency (ITL) p50/p99, for the live server (``ensemble`` and ``m3_bls`` entry points) and for
``m3_trt.serving.pipeline.generate_in_process`` run by the same threads in this process.
overhead = in-process req/s ÷ served req/s. JSON → benchmarks/results/serving-<host>.json.

    python benchmarks/serving.py [--ckpt DIR] [--requests 32] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _timed(pieces):
    """Consume a piece iterator; return (t_first, [gaps between pieces], t_total) from its start."""
    t0 = time.perf_counter()
    stamps = [time.perf_counter() - t0 for _ in pieces]
    total = time.perf_counter() - t0
    return (stamps[0] if stamps else total), list(np.diff(stamps)), total


def _run(make_stream, work, clients):
    lock = threading.Lock()
    ttft, itl = [], []

    def worker(i):
        for prompt, images in work[i::clients]:
            first, gaps, _ = _timed(make_stream(prompt, images))
            with lock:
                ttft.append(first)
                itl.extend(gaps)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - t0
    pct = lambda xs, q: float(np.percentile(xs, q) * 1e3) if xs else None  # noqa: E731
    return {"requests": len(work), "wall_s": wall, "requests_per_s": len(work) / wall,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, help="checkpoint (default: make the tiny one in a temp dir)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)

    import torch

    from m3_trt.demo import demo_image_png
    from m3_trt.model import M3ForConditionalGeneration
    from m3_trt.serving.client import M3Client
    from m3_trt.serving.pipeline import (Preprocessor, SamplingParams, TokenGenerator, VisionEncoder,
                                         generate_in_process)
    from m3_trt.serving.repository import write_repository
    from m3_trt.serving.server import TritonServer

    tmp = Path(tempfile.mkdtemp(prefix="m3-serving-bench-"))
    ckpt = args.ckpt
    if ckpt is None:
        from m3_trt.tiny import make_tiny

        ckpt = make_tiny(tmp / "tiny", seed=0)
    repo = write_repository(ckpt, tmp / "repo", bls=True)
    image = demo_image_png()
    work = [(f"Question {i}: describe it.", [image] if i % 2 else []) for i in range(args.requests)]
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"serving benchmark: ckpt={ckpt} requests={args.requests} max_tokens={args.max_tokens} "
          f"concurrency={levels}", flush=True)

    torch.set_num_threads(1)  # as each served step runs (torch_threads=1): like for like
    model = M3ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    pre = Preprocessor(ckpt, max_input_len=4096, max_input_pixels=16 * 1024 * 1024)
    vision, gen = VisionEncoder(model), TokenGenerator(model)
    params = SamplingParams(max_tokens=args.max_tokens)
    results = {"in_process": {}, "ensemble": {}, "m3_bls": {}}
    list(generate_in_process(pre, vision, gen, "warm up", [image], SamplingParams(max_tokens=2)))
    for c in levels:
        results["in_process"][c] = _run(lambda p, im: generate_in_process(pre, vision, gen, p, im, params), work, c)
        print(f"in-process  c={c:2d}: {results['in_process'][c]}", flush=True)
    with TritonServer(repo) as server:
        for entry in ("ensemble", "m3_bls"):
            client = M3Client(server.grpc_url, entry)
            client.generate("warm up", [image], max_tokens=2)
            for c in levels:
                r = _run(lambda p, im: client.stream(p, im, max_tokens=args.max_tokens), work, c)
                r["overhead_vs_in_process"] = results["in_process"][c]["requests_per_s"] / r["requests_per_s"]
                results[entry][c] = r
                print(f"{entry:10s} c={c:2d}: {r}", flush=True)

    host = socket.gethostname()
    report = {
        "benchmark": "serving", "checkpoint": str(ckpt), "requests": args.requests, "max_tokens": args.max_tokens,
        "machine": {"host": host, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_avg_at_end": os.getloadavg()},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serving-{host}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
