"""TensorRT route (a) vs route (b) for the tiny checkpoint, fp16, in one run.

    python benchmarks/trt_routes.py [--ckpt DIR] [--max-seq-len 128] [--max-batch 4]

Route (a): ``m3-trt export --dtype fp16`` with ``--plugins none`` and ``--plugins m3``, then
``m3_trt.export.tensorrt_build.build_engines`` (TensorRT's ONNX parser; plugin creators registered
for the m3 variant). Route (b): ``m3_trt.export.tensorrt.network_build.build_network_engines``
(network API, native LLM layers; ``build-engine --set trt_route=network``). Builds run in child
processes (route (a): one per engine; route (b): one worker for all); per component the
JSON records build seconds (network parse/write + build, child start-up excluded), engine bytes,
layer count and layer types, plus route (b)'s IO check against the ``--plugins none`` manifest.
Engines cannot be run here (no GPU), so there is no latency column. Results go to
``benchmarks/results/trt_routes-<host>.json`` with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path


def _row(rep: dict | None) -> dict | None:
    if rep is None:
        return None
    return {"ok": rep["ok"], "seconds": round(rep["seconds"], 3), "engine_bytes": rep["engine_bytes"],
            "num_layers": rep["num_layers"], "layer_types": rep["layer_types"],
            **({"error": (rep.get("error") or "")[:500]} if not rep["ok"] else {}),
            **({"io_diff": rep["io_diff"]} if "io_diff" in rep else {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=None, help="tiny checkpoint (made fresh when omitted)")
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)

    import torch

    from m3_trt.export.onnx import export_model
    from m3_trt.export.tensorrt import backend_name
    from m3_trt.export.tensorrt.network_build import build_network_engines
    from m3_trt.export.tensorrt_build import build_engines
    from m3_trt.model.modeling import M3ForConditionalGeneration
    from m3_trt.checkpoints.tiny import make_tiny

    print(f"[trt_routes] fp16, max_seq_len={args.max_seq_len}, max_batch={args.max_batch}, backend={backend_name()}")
    with tempfile.TemporaryDirectory(prefix="trt_routes_") as tmp:
        tmp = Path(tmp)
        ckpt = args.ckpt or make_tiny(tmp / "tiny", seed=0)
        routes, wall = {}, {}
        for plugins in ("none", "m3"):
            t0 = time.perf_counter()
            exp = export_model(ckpt, tmp / f"onnx-{plugins}", dtype="fp16", plugins=plugins,
                               max_seq_len=args.max_seq_len, max_batch=args.max_batch, progress=None)
            export_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            routes[f"a_onnx_{plugins}"] = build_engines(exp, progress=print)
            wall[f"a_onnx_{plugins}"] = {"export_s": round(export_s, 2), "build_wall_s": round(time.perf_counter() - t0, 2)}
        model = M3ForConditionalGeneration.from_pretrained(ckpt)
        t0 = time.perf_counter()
        routes["b_network"] = build_network_engines(model, tmp / "network", dtype="fp16", max_batch=args.max_batch,
                                                    max_seq_len=args.max_seq_len,
                                                    manifest=tmp / "onnx-none" / "manifest.json")
        wall["b_network"] = {"export_s": 0.0, "build_wall_s": round(time.perf_counter() - t0, 2)}

    names = list(dict.fromkeys(n for reps in routes.values() for n in reps))
    table = {n: {r: _row(reps.get(n)) for r, reps in routes.items()} for n in names}
    result = {
        "benchmark": "trt_routes",
        "dtype": "fp16", "max_seq_len": args.max_seq_len, "max_batch": args.max_batch,
        "machine": {"host": socket.gethostname(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__, "tensorrt": backend_name(),
                    "gpu": None},
        "note": "build seconds exclude child-process start-up; engines cannot run without a GPU, so no latency",
        "wall": wall,
        "components": table,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"trt_routes-{socket.gethostname()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'component':<16}" + "".join(f"{r:>34}" for r in routes))
    for n, row in table.items():
        cells = [("-" if v is None else (f"{v['seconds']:.2f}s {v['engine_bytes'] / 1e6:.2f}MB {v['num_layers']}L"
                                         if v["ok"] else "FAILED")) for v in row.values()]
        print(f"{n:<16}" + "".join(f"{c:>34}" for c in cells))
    print(f"[trt_routes] wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
