"""Serving benchmark: the tiny checkpoint's Triton repositories vs the same pipeline in-process.

For each backend (``torch``: the torch reference; ``onnxruntime``: the checkpoint's ONNX export,
portable ops) and for 1, 4 and 16 concurrent clients (threads, each sending its share of N
streaming requests, alternating text-only and image+text):

- requests/s, time to first token (TTFT) and inter-token latency (ITL) p50/p99,
- for the live server (``ensemble`` and ``m3_bls`` entry points, gRPC streaming) and for
  ``m3_trt.serving.pipeline.generate_in_process`` with the same backend, run by the same threads
  in this process; overhead = in-process req/s ÷ served req/s.

Like for like: the same request list on every path; greedy, and ``end_id=-1`` so every request
generates exactly ``--max-tokens`` tokens (EOS cannot end one path early); both paths timed from
the call that starts the request to its last text piece; the number of pieces is counted on both
sides and must agree. Every path is warmed up (a text and an image request per entry) before it
is timed. The load average is recorded before and after each path (the machine may be shared).
JSON → benchmarks/results/serving-<host>.json.

    python benchmarks/serving.py [--ckpt DIR] [--requests 32] [--max-tokens 16] [--backends torch,onnxruntime]
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


def _timed(start_request):
    """Start a request, consume its pieces; (TTFT, gaps between pieces, total, n pieces) from the start."""
    t0 = time.perf_counter()
    stamps = [time.perf_counter() - t0 for _ in start_request()]
    total = time.perf_counter() - t0
    return (stamps[0] if stamps else total), list(np.diff(stamps)), total, len(stamps)


def _run(make_stream, work, clients):
    lock = threading.Lock()
    ttft, itl, latency, pieces = [], [], [], 0

    def worker(i):
        nonlocal pieces
        for prompt, images in work[i::clients]:
            first, gaps, total, n = _timed(lambda: make_stream(prompt, images))
            with lock:
                ttft.append(first)
                itl.extend(gaps)
                latency.append(total)
                pieces += n

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - t0
    pct = lambda xs, q: round(float(np.percentile(xs, q) * 1e3), 2) if xs else None  # noqa: E731
    return {"requests": len(work), "pieces": pieces, "wall_s": round(wall, 3),
            "requests_per_s": round(len(work) / wall, 2),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99),
            "latency_ms_p50": pct(latency, 50), "latency_ms_p99": pct(latency, 99),
            "load_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def _machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    import onnxruntime

    return {"host": socket.gethostname(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "mem_gib": round(int(mem) / 2**20, 1) if mem else None, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def _table(results: dict, levels: list[int]) -> str:
    rows = ["| backend | path | clients | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | overhead |",
            "|---|---|---|---|---|---|---|"]
    for backend, paths in results.items():
        for path, by_c in paths.items():
            for c in levels:
                r = by_c[str(c)]
                ov = f"{r['overhead_vs_in_process']:.2f}x" if "overhead_vs_in_process" in r else "-"
                rows.append(f"| {backend} | {path} | {c} | {r['requests_per_s']:.1f} | {r['ttft_ms_p50']:.1f} / "
                            f"{r['ttft_ms_p99']:.1f} | {r['itl_ms_p50']:.1f} / {r['itl_ms_p99']:.1f} | {ov} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, help="checkpoint (default: make the tiny one in a temp dir)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--backends", default="torch,onnxruntime")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)

    import torch

    from m3_trt.demo import demo_image_png
    from m3_trt.serving.client import M3Client
    from m3_trt.serving.pipeline import Preprocessor, SamplingParams, generate_in_process, load_steps
    from m3_trt.serving.repository import write_repository
    from m3_trt.serving.server import TritonServer

    tmp = Path(tempfile.mkdtemp(prefix="m3-serving-bench-"))
    ckpt = args.ckpt
    if ckpt is None:
        from m3_trt.tiny import make_tiny

        ckpt = make_tiny(tmp / "tiny", seed=0)
    image = demo_image_png()
    work = [(f"Question {i}: describe it.", [image] if i % 2 else []) for i in range(args.requests)]
    warm = [("warm up", []), ("warm up", [image])]
    levels = [int(c) for c in args.concurrency.split(",")]
    backends = args.backends.split(",")
    load_start = os.getloadavg()
    print(f"serving benchmark: ckpt={ckpt} requests={args.requests} max_tokens={args.max_tokens} "
          f"concurrency={levels} backends={backends} load={load_start}", flush=True)

    torch.set_num_threads(1)  # as each served step runs (torch_threads=1): like for like
    pre = Preprocessor(ckpt, max_input_len=4096, max_input_pixels=16 * 1024 * 1024)
    results: dict = {}
    for backend in backends:
        export = None
        if backend == "onnxruntime":
            from m3_trt.export.onnx import export_model

            export = export_model(ckpt, tmp / "export", plugins="none", max_seq_len=256, progress=None)
        repo = write_repository(ckpt, tmp / f"repo-{backend}", backend=backend, export=export, bls=True)
        settings = json.loads((repo / "manifest.json").read_text())["settings"]
        vision, gen = load_steps({k: str(v) for k, v in settings.items()})
        params = SamplingParams(max_tokens=args.max_tokens, end_id=-1)
        res = results[backend] = {"in_process": {}, "ensemble": {}, "m3_bls": {}}

        def local(prompt, images):
            return generate_in_process(pre, vision, gen, prompt, images, params)

        for prompt, images in warm:
            list(local(prompt, images))
        for c in levels:
            res["in_process"][str(c)] = _run(local, work, c)
            print(f"{backend:11s} in-process c={c:2d}: {res['in_process'][str(c)]}", flush=True)
        with TritonServer(repo) as server:
            for entry in ("ensemble", "m3_bls"):
                client = M3Client(server.grpc_url, entry)

                def served(prompt, images):
                    return client.stream(prompt, images, max_tokens=args.max_tokens, end_id=-1)

                for prompt, images in warm:
                    list(served(prompt, images))
                for c in levels:
                    r = _run(served, work, c)
                    base = res["in_process"][str(c)]
                    if r["pieces"] != base["pieces"]:
                        raise RuntimeError(f"{backend}/{entry} c={c}: {r['pieces']} text pieces served vs "
                                           f"{base['pieces']} in-process: the two paths did different work")
                    r["overhead_vs_in_process"] = round(base["requests_per_s"] / r["requests_per_s"], 3)
                    res[entry][str(c)] = r
                    print(f"{backend:11s} {entry:10s} c={c:2d}: {r}", flush=True)

    load_end = os.getloadavg()
    report = {
        "benchmark": "serving", "checkpoint": str(ckpt), "requests": args.requests, "max_tokens": args.max_tokens,
        "sampling": "greedy, end_id=-1 (exactly max_tokens tokens per request)",
        "work": "alternating text-only / one 112x84 PNG + text; streaming on every path",
        "machine": _machine(),
        "load_avg": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in load_end]},
        "load_note": (f"machine shared: 1-min load {max(load_start[0], load_end[0]):.1f} on {os.cpu_count()} cores; "
                      f"absolute figures are noisy, compare paths measured back to back"
                      if max(load_start[0], load_end[0]) > 0.5 * (os.cpu_count() or 1) else "quiet"),
        "notes": [
            "in-process: one process, threads share the GIL and torch_threads=1, so it uses ~1 core; the server "
            "spreads preprocessing, vision, llm and postprocessing over separate stub processes (both cores), "
            "which is why overhead can be < 1",
            "onnxruntime sessions use ONNX Runtime's default intra-op threads (both paths alike)",
        ],
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serving-{report['machine']['host']}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(results, levels))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
