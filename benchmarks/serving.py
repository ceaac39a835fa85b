"""Serving benchmark: in-flight batched vs unbatched Triton repositories, and the same work in-process.

For each backend (``torch``: the torch reference; ``onnxruntime``: the checkpoint's ONNX export,
portable ops), each repository mode (``batched``: the llm step's KV pool has ``--max-batch``
slots, one forward per step for every active request; ``unbatched``: ``max_batch_size`` 1, one
request at a time) and 1, 4 and 16 concurrent clients (threads, each sending its share of N
streaming requests, alternating text-only and image+text), over our gRPC client:

- requests/s and generated tokens/s, time to first token (TTFT) and inter-token latency (ITL)
  p50/p99, request latency p50/p99;
- ``m3_trt.serving.pipeline.generate_in_process`` with the same backend at 1 client (the same
  work without the server): overhead = in-process req/s ÷ served req/s at one client;
- speed-up of 16 (and 4) clients over 1 client, per mode.

Models: ``--model tiny`` (the test checkpoint) or ``--model mid`` (1024 wide, 4 layers, 32
experts top-4, 8×128 query heads, 2 KV heads; random weights made with the project's own tools
and the tiny tokenizer), or ``--ckpt DIR`` (any checkpoint, e.g. a transformers-saved one).

Like for like: the same request list on every path; greedy with ``end_id=-1`` (no end token:
every request generates exactly ``--max-tokens`` tokens); every path timed from the call that
starts a request to its last text piece; the token count is read from the server's
``m3_llm_generated_tokens`` metric and must equal requests × max_tokens. Every path is warmed up
before it is timed. The load average is recorded before and after each path (the machine may be
shared: compare paths measured back to back, never across runs).
JSON → benchmarks/results/serving-<host>.json.

    python benchmarks/serving.py [--model tiny|mid | --ckpt DIR] [--requests 32] [--max-tokens 32]
        [--concurrency 1,4,16] [--backends torch,onnxruntime] [--modes batched,unbatched] [--max-batch 16]
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


def _median_run(make_stream, work, clients, rounds: int) -> dict:
    """``_run`` ``rounds`` times back to back; the round with the median wall time, with every round's wall."""
    runs = sorted((_run(make_stream, work, clients) for _ in range(rounds)), key=lambda r: r["wall_s"])
    best = dict(runs[len(runs) // 2])
    best["rounds"] = rounds
    best["walls_s"] = [r["wall_s"] for r in runs]
    return best


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
    rows = ["| backend | mode | clients | req/s | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | vs 1 client | overhead |",
            "|---|---|---|---|---|---|---|---|---|"]
    for backend, paths in results.items():
        for path, by_c in paths.items():
            for c in levels:
                r = by_c.get(str(c))
                if r is None:
                    continue
                ov = f"{r['overhead_vs_in_process']:.2f}x" if "overhead_vs_in_process" in r else "-"
                sp = f"{r['speedup_vs_1_client']:.2f}x" if "speedup_vs_1_client" in r else "-"
                rows.append(f"| {backend} | {path} | {c} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                            f"{r['ttft_ms_p50']:.1f} / {r['ttft_ms_p99']:.1f} | {r['itl_ms_p50']:.1f} / "
                            f"{r['itl_ms_p99']:.1f} | {sp} | {ov} |")
    return "\n".join(rows)


def mid_checkpoint(out: Path, seed: int = 0) -> Path:
    """A random 1024-wide, 4-layer, 32-expert M3-VL checkpoint (the tiny one's tokenizer and layer
    pattern, the tiny generator's weight initialisation) written with the project's checkpoint writer."""
    import dataclasses

    import torch

    from m3_trt.model.checkpoint import original_layout, write_sharded
    from m3_trt.model.config import M3Config
    from m3_trt.model.modeling import M3ForConditionalGeneration
    from m3_trt.checkpoints.tiny import _init_weights, make_tiny

    tiny = make_tiny(out.parent / f"{out.name}-tokenizer", seed=seed)
    hf = json.loads((tiny / "config.json").read_text())
    cfg = M3Config.from_pretrained(tiny)
    text = dataclasses.replace(cfg.text, hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                               rotary_dim=64, intermediate_size=512, dense_intermediate_size=2048,
                               shared_intermediate_size=512, num_local_experts=32, num_experts_per_tok=4,
                               index_n_heads=2, index_head_dim=128, index_block_size=64, index_topk_blocks=4)
    cfg = M3Config.from_dict(dataclasses.replace(cfg, text=text, projector_hidden_size=1024).to_hf_dict())
    model = M3ForConditionalGeneration(cfg)
    _init_weights(model, seed)
    out.mkdir(parents=True)
    write_sharded(original_layout(model.state_dict(), cfg.text.num_hidden_layers), out, 512 * 1024 * 1024)
    new = cfg.to_hf_dict()
    new["text_config"]["pad_token_id"] = hf["text_config"].get("pad_token_id")
    (out / "config.json").write_text(json.dumps(new, indent=2) + "\n")
    for f in tiny.iterdir():
        if f.suffix in (".jinja",) or (f.suffix == ".json" and f.name not in ("config.json",)
                                       and not f.name.endswith("index.json")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def _tokens(server) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("m3_llm_generated_tokens{"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, help="checkpoint (default: --model)")
    ap.add_argument("--model", choices=("tiny", "mid"), default="mid")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--backends", default="torch,onnxruntime")
    ap.add_argument("--modes", default="batched,unbatched")
    ap.add_argument("--max-batch", type=int, default=16, help="KV slots of the batched repository")
    ap.add_argument("--entry", default="ensemble", choices=("ensemble", "m3_bls"))
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per path; the median round is reported")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)

    import torch

    from m3_trt.processing.samples import demo_image_png
    from m3_trt.serving.client import M3Client
    from m3_trt.serving.pipeline import Preprocessor, SamplingParams, generate_in_process, load_steps
    from m3_trt.serving.repository import write_repository
    from m3_trt.serving.server import TritonServer

    tmp = Path(tempfile.mkdtemp(prefix="m3-serving-bench-"))
    ckpt = args.ckpt
    if ckpt is None:
        from m3_trt.checkpoints.tiny import make_tiny

        ckpt = make_tiny(tmp / "tiny", seed=0) if args.model == "tiny" else mid_checkpoint(tmp / "mid")
    image = demo_image_png()
    work = [(f"Question {i}: describe it.", [image] if i % 2 else []) for i in range(args.requests)]
    warm = [("warm up", []), ("warm up", [image])]
    levels = [int(c) for c in args.concurrency.split(",")]
    backends, modes = args.backends.split(","), args.modes.split(",")
    load_start = os.getloadavg()
    print(f"serving benchmark: ckpt={ckpt} requests={args.requests} max_tokens={args.max_tokens} "
          f"concurrency={levels} backends={backends} modes={modes} load={load_start}", flush=True)

    torch.set_num_threads(1)  # as each served step runs (torch_threads=1): like for like
    pre = Preprocessor(ckpt, max_input_len=4096, max_input_pixels=16 * 1024 * 1024)
    params = SamplingParams(max_tokens=args.max_tokens, end_id=-1)
    results: dict = {}
    for backend in backends:
        export = None
        if backend == "onnxruntime":
            from m3_trt.export.onnx import export_model

            export = export_model(ckpt, tmp / "export", plugins="none", max_seq_len=256, progress=None)
        res = results[backend] = {}
        for mode in modes:
            repo = write_repository(ckpt, tmp / f"repo-{backend}-{mode}", backend=backend, export=export,
                                    max_batch_size=args.max_batch if mode == "batched" else 1,
                                    max_input_len=None if backend == "onnxruntime" else 256, bls=True)
            if mode == "batched" and "in_process" not in res:
                settings = json.loads((repo / "manifest.json").read_text())["settings"]
                vision, gen = load_steps({k: str(v) for k, v in settings.items()})

                def local(prompt, images):
                    return generate_in_process(pre, vision, gen, prompt, images, params)

                for prompt, images in warm:
                    list(local(prompt, images))
                r = _median_run(local, work, 1, args.rounds)
                r["tokens_per_s"] = round(args.requests * args.max_tokens / r["wall_s"], 1)
                res["in_process"] = {"1": r}
                print(f"{backend:11s} in-process c= 1: {r}", flush=True)
            res[mode] = {}
            with TritonServer(repo) as server:
                client = M3Client(server.grpc_url, args.entry)

                def served(prompt, images):
                    return client.stream(prompt, images, max_tokens=args.max_tokens, end_id=-1)

                for prompt, images in warm:
                    list(served(prompt, images))
                for c in levels:
                    before = _tokens(server)
                    r = _median_run(served, work, c, args.rounds)
                    tokens = _tokens(server) - before
                    if tokens != args.rounds * args.requests * args.max_tokens:
                        raise RuntimeError(f"{backend}/{mode} c={c}: the server generated {tokens:.0f} tokens in "
                                           f"{args.rounds} rounds, expected {args.rounds * args.requests * args.max_tokens}")
                    r["tokens_per_s"] = round(args.requests * args.max_tokens / r["wall_s"], 1)
                    if c == 1 and "in_process" in res:
                        r["overhead_vs_in_process"] = round(res["in_process"]["1"]["requests_per_s"]
                                                            / r["requests_per_s"], 3)
                    if c != 1 and "1" in res[mode]:
                        r["speedup_vs_1_client"] = round(r["requests_per_s"] / res[mode]["1"]["requests_per_s"], 3)
                    res[mode][str(c)] = r
                    print(f"{backend:11s} {mode:9s} c={c:2d}: {r}", flush=True)

    load_end = os.getloadavg()
    report = {
        "benchmark": "serving", "checkpoint": str(ckpt), "model": None if args.ckpt else args.model,
        "requests": args.requests, "max_tokens": args.max_tokens, "max_batch": args.max_batch, "entry": args.entry,
        "sampling": "greedy, end_id=-1 (exactly max_tokens tokens per request)",
        "work": "alternating text-only / one PNG + text; streaming on every path",
        "machine": _machine(),
        "load_avg": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in load_end]},
        "load_note": (f"machine shared: 1-min load {max(load_start[0], load_end[0]):.1f} on {os.cpu_count()} cores; "
                      f"absolute figures are noisy, compare paths measured back to back"
                      if max(load_start[0], load_end[0]) > 0.5 * (os.cpu_count() or 1) else "quiet"),
        "notes": [
            "in-process: one request at a time through m3_trt.model.generate (the unbatched reference path), one thread",
            "unbatched: the llm step's KV pool has one slot (max_batch_size 1): requests queue and run alone",
            "onnxruntime sessions use one intra-op thread per step (torch_threads), both paths alike",
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
