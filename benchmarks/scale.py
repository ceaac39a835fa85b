"""Peak RSS and wall time of ``build-engine`` at 4 and 12 layers of one width (issue 12, item 10).

Each build runs in its own subprocess; its peak RSS comes from ``getrusage(RUSAGE_CHILDREN)`` of
a small parent process (the kernel's ``ru_maxrss``). Checkpoints are project-made (original
on-disk layout, bf16, no tokenizer files: FP8 calibration then runs on token-id prompts) at
``--hidden`` width with ``--experts`` experts; targets default to ``cpu`` and ``b200x8-fp8``
(the latter with ``onnx=false``: its sharded ONNX graphs still hold the whole model, see the
README's known limits; its rank weight files and layer-by-layer calibration stream).

    python benchmarks/scale.py                       # 1024 wide, 32 experts, 4 and 12 layers
    python benchmarks/scale.py --hidden 256 --experts 8 --layers 1 2 --targets cpu   # smoke
    python benchmarks/scale.py --full-width --layers 1 2 --targets b200x8-fp8         # needs a big host

Writes ``benchmarks/results/scale-<machine>.json``. Run it on a quiet machine: timings taken
while other work runs are not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from m3_trt.model import config as cfgmod
from m3_trt.model.checkpoint import original_layout, write_sharded
from m3_trt.model.modeling import M3ForConditionalGeneration

# Runs argv[1:] and prints its peak RSS (KiB). The build is the child of this small process: a
# child's ru_maxrss includes the RSS of the process it was (v)forked from (here: the one that drew
# the checkpoint).
MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
TARGET_SETS = {"cpu": [], "b200x8-fp8": ["--set", "onnx=false"]}


def make_checkpoint(out: Path, layers: int, hidden: int, experts: int, inter: int) -> Path:
    """Original-layout bf16 shards + config.json, one tensor drawn at a time (no whole model in memory)."""
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
    code = p.returncode
    peak = int(p.stdout.split()[-1]) / 1024 if code == 0 else None
    return {"target": target, "exit": code, "peak_rss_mib": round(peak, 1) if peak else None,
            "seconds": round(time.perf_counter() - t0, 2), "log_tail": p.stderr[-1500:] if code else ""}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    ap.add_argument("--targets", nargs="+", default=list(TARGET_SETS))
    ap.add_argument("--full-width", action="store_true",
                    help="full-width MXFP8 checkpoints from m3-trt make-synthetic --preset m3 (one layer is "
                         "~7.5 GB on disk; the build needs the host memory its plan states) instead of --hidden")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="m3-scale-", dir=a.out.parent if a.full_width else None) as tmp:
        for n in a.layers:
            if a.full_width:
                from m3_trt.checkpoints.synthetic import make_synthetic

                ckpt = Path(tmp) / f"ckpt{n}"
                make_synthetic(ckpt, preset="m3", layers=n, fmt="mxfp8")
            else:
                ckpt = make_checkpoint(Path(tmp) / f"ckpt{n}", n, a.hidden, a.experts, a.inter)
            stored = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            for target in a.targets:
                r = run_build(ckpt, target, Path(tmp) / f"out-{n}-{target}")
                r.update(layers=n, checkpoint_bytes=stored)
                print(json.dumps({k: v for k, v in r.items() if k != "log_tail"}), flush=True)
                runs.append(r)
    ratios = {}
    for target in a.targets:
        by = {r["layers"]: r["peak_rss_mib"] for r in runs if r["target"] == target and r["exit"] == 0}
        if len(by) >= 2:
            lo, hi = min(by), max(by)
            ratios[target] = {"layers": [lo, hi], "peak_ratio": round(by[hi] / by[lo], 3)}
    machine = socket.gethostname().split(".")[0]
    result = {"machine": machine, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_avg": os.getloadavg(), "width": {"hidden": a.hidden, "experts": a.experts, "inter": a.inter},
              "full_width": a.full_width, "runs": runs, "ratios": ratios}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"scale-{machine}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}: {json.dumps(ratios)}")
    return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
