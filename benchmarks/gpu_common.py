"""Shared parts of the GPU check (``scripts/gpu_check.sh``): run profiles (real shapes, the
CPU dry run, the CPU scale-down), the timer, the step runner that records every error and goes
on, inputs at the real shapes, and the output folder rule.

Timing: CUDA events around each call, with the L2 flushed (256 MiB memset) before every rep
where asked (decode, MoE), median of a few reps sized to a per-measurement budget; on CPU
``perf_counter``. A step's error (an OOM, a failing kernel) is recorded in the JSON, which is
rewritten after every step, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from m3_trt.outputs import OutputError, Stage, check_output

FORMAT = "m3-trt-gpu-check/1"
GPU_CHECK = Stage("gpu-check", "gpu_check.json", "format", "m3-trt-gpu-check/")
SEED_DECODE_TOK_S = 31.0  # the seed's Hugging Face path on 8xB200 (bf16 + block-sparse kernel + cudagraph)


@dataclass(frozen=True)
class Profile:
    """Shapes and budgets of one run. ``attn``: Hq, G, D, block, topk, local, Di (indexer dim)."""

    name: str
    impl: str
    dtype: torch.dtype
    attn: dict
    prefill: tuple[int, ...]
    masked_max: int  # longest prefill with the dense-mask SDPA baseline (its mask is Hq * L^2)
    decode: tuple[int, ...]
    moe: dict  # E, top_k, D, F, Fs
    tokens: tuple[int, ...]
    check: dict = field(default_factory=dict)  # correctness sizes
    measure_s: float = 0.3  # time budget of one measurement (reps = budget / first time)
    max_reps: int = 20
    warmup: bool = True  # one untimed call first (compilation, allocator); the dry run skips it
    budget_s: float = 330.0  # the whole kernels run; later steps are skipped past it
    note: str = ""


REAL_ATTN = dict(Hq=64, G=4, D=128, block=128, topk=16, local=1, Di=128)
REAL_MOE = dict(E=128, top_k=4, D=6144, F=3072, Fs=3072)
PROFILES = {
    "gpu": Profile(
        "gpu", "triton", torch.bfloat16, REAL_ATTN, (2048, 4096, 8192, 16384, 32768, 65536), 16384,
        (8192, 16384, 32768, 65536, 131072), REAL_MOE, (1, 16, 256, 4096),
        check=dict(prefill=4096, decode=32768, decode_batch=2, moe_tokens=(1, 256),
                   big_batch=5, big_len=65536, big_queries=16),
        note="real shapes, bf16 timings"),
    # The interpreter pays per program and op: one size per step, a handful of queries.
    "dry-run": Profile(
        "dry-run", "triton", torch.bfloat16, dict(Hq=4, G=2, D=16, block=8, topk=2, local=1, Di=16),
        (24,), 24, (48,), dict(E=8, top_k=2, D=32, F=16, Fs=16), (1, 4),
        check=dict(prefill=16, decode=40, decode_batch=2, moe_tokens=(1, 4), big_batch=5, big_len=32, big_queries=2),
        measure_s=0.0, max_reps=1, warmup=False, budget_s=600.0,
        note="DRY RUN: tiny shapes, Triton interpreter on CPU; timings are interpreter times, not measurements"),
    "cpu": Profile(
        "cpu", "torch", torch.float32, dict(Hq=8, G=2, D=64, block=64, topk=8, local=1, Di=64),
        (512, 1024, 2048, 4096), 4096, (1024, 4096), dict(E=128, top_k=4, D=256, F=128, Fs=128), (1, 16, 256, 4096),
        measure_s=1.0, max_reps=5, budget_s=3600.0,
        note="CPU scale-down: attention Hq 64->8, G 4->2, d 128->64, block 128->64, top-16->8; MoE hidden "
             "6144->256, intermediate 3072->128; fp32; torch implementations; median of a few reps, 1 thread"),
}

# The goals of issue 14, reported (never asserted): (key, text, target).
# -- machine, timing, steps --------------------------------------------------------------------


def device_slug(name: str) -> str:
    """``NVIDIA H200`` -> ``h200``; ``NVIDIA H100 80GB HBM3`` -> ``h100``: the result files' suffix."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in ("nvidia", "tesla", "geforce")]
    return words[0] if words else "gpu"


def run_slug(profile: Profile) -> str:
    return device_slug(torch.cuda.get_device_name(0)) if profile.name == "gpu" else profile.name.replace("-", "")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Median seconds per call of ``fn``. CUDA: events around each call, with ``flush`` a 256 MiB
    memset before each rep so no weights or cache lines survive in L2 (50 MiB on an H200). CPU:
    ``perf_counter``. One untimed warm-up call first (compilation, allocator) unless the profile
    says otherwise. ``last`` holds the result of the last call."""

    def __init__(self, device: str, profile: Profile):
        self.device, self.p = device, profile
        self._l2 = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda") if device == "cuda" else None

    def _once(self, fn, flush: bool) -> float:
        if self.device != "cuda":
            t0 = time.perf_counter()
            self.last = fn()
            return time.perf_counter() - t0
        if flush:
            self._l2.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.last = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def __call__(self, fn, flush: bool = False) -> float:
        self.last = None
        if self.p.warmup:
            fn()
            sync(self.device)
        first = self._once(fn, flush)
        reps = max(1, min(self.p.max_reps, int(self.p.measure_s / max(first, 1e-9))))
        return statistics.median([first] + [self._once(fn, flush) for _ in range(reps - 1)])


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Steps:
    """Runs named steps, recording each one's result or error into ``record`` and rewriting
    ``path`` after every step; steps past ``deadline`` (monotonic seconds) are skipped."""

    def __init__(self, record: dict, path: Path, deadline: float):
        self.record, self.path, self.deadline = record, path, deadline

    def __call__(self, section: str, name: str, fn):
        box = self.record.setdefault(section, {})
        if time.monotonic() > self.deadline:
            box[name] = {"skipped": "time budget of this run spent"}
            print(f"  {section}/{name}: skipped (time budget)", flush=True)
            return None
        t0 = time.monotonic()
        try:
            out = fn()
            box[name] = out
        except Exception as e:  # noqa: BLE001 - every failure is recorded and the run goes on
            box[name] = {"error": f"{type(e).__name__}: {str(e)[:1500]}",
                         "where": traceback.format_exc(limit=-4)[-2000:]}
            print(f"  {section}/{name}: ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
            out = None
        free_memory()
        if isinstance(box.get(name), dict):
            box[name]["step_s"] = round(time.monotonic() - t0, 2)
        write_json(self.path, self.record)
        return out


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy, bytes read + written per second (median of 10, 1 GiB on CUDA)."""
    n = (2**30 if device == "cuda" else 2**25) // 4
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    prof = Profile("bw", "", torch.float32, {}, (), 0, (), {}, (), measure_s=1e9, max_reps=10)
    return 2 * a.numel() * 4 / Timer(device, prof)(lambda: b.copy_(a))


def environment(device: str, profile: Profile) -> dict:
    import triton

    info = dict(profile=profile.name, note=profile.note, python=platform.python_version(), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, host=platform.node(),
                cpu_threads=torch.get_num_threads())
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                    sm_count=p.multi_processor_count, memory_GiB=round(p.total_memory / 2**30, 1))
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["driver"] = f"unknown ({type(e).__name__})"
    else:
        info["gpu"] = None
    info["copy_bandwidth_GBps"] = round(copy_bandwidth(device) / 1e9, 1)
    return info


# -- inputs ------------------------------------------------------------------------------------


def attn_inputs(a: dict, B: int, S: int, T: int, dtype, device, smooth: bool = True):
    """q/k/v, indexer q/k and positions for S queries at the end of a T-slot cache. ``smooth``:
    indexer queries follow a random walk over positions (neighbours prefer similar blocks, as a
    real model's hidden states do); else independent (a tile's union of blocks is near-dense)."""
    Hq, G, D, Di = a["Hq"], a["G"], a["D"], a["Di"]
    pos = (torch.arange(S, device=device) + (T - S))[None].expand(B, S).contiguous()
    q = torch.randn(B, Hq, S, D, device=device, dtype=dtype)
    k = torch.randn(B, G, T, D, device=device, dtype=dtype)
    v = torch.randn(B, G, T, D, device=device, dtype=dtype)
    if smooth:
        iq = torch.randn(B, G, S, Di, device=device).mul_(0.05).cumsum(dim=2)
        iq = (iq + torch.randn(B, G, 1, Di, device=device)).to(dtype)
    else:
        iq = torch.randn(B, G, S, Di, device=device, dtype=dtype)
    ik = torch.randn(B, T, Di, device=device, dtype=dtype)
    return q, k, v, iq, ik, pos


def moe_weights(m: dict, dtype, device) -> dict:
    E, D, Fi, Fs = m["E"], m["D"], m["F"], m["Fs"]
    return dict(router_w_ED=torch.randn(E, D, device=device) * D**-0.5,
                e_bias_E=torch.randn(E, device=device) * 0.01,
                w13_EFD=(torch.randn(E, 2 * Fi, D, device=device, dtype=dtype) * D**-0.5),
                w2_EDF=(torch.randn(E, D, Fi, device=device, dtype=dtype) * Fi**-0.5),
                w13s_FD=(torch.randn(2 * Fs, D, device=device, dtype=dtype) * D**-0.5),
                w2s_DF=(torch.randn(D, Fs, device=device, dtype=dtype) * Fs**-0.5))


MOE_KW = dict(routed_scaling=2.0, alpha=1.702, limit=7.0)


def _moe_args(w: dict, x):
    return (x, w["router_w_ED"], w["e_bias_E"], w["w13_EFD"], w["w2_EDF"], w["w13s_FD"], w["w2s_DF"])


# -- profile and output folder ----------------------------------------------------------------


def pick_profile(args) -> tuple[Profile, str]:
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run runs the kernels in Triton's interpreter: export TRITON_INTERPRET=1 "
                             "before Python starts (scripts/gpu_check.sh does)")
        return PROFILES["dry-run"], "cpu"
    if args.cpu:
        return PROFILES["cpu"], "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run (tiny shapes, Triton interpreter) or --cpu "
                         "(torch implementations, scaled down)")
    return PROFILES["gpu"], "cuda"


REFUSED_OUT = 3  # exit status when the output folder is refused (gpu_check.sh stops on it)


def prepare_out(out: str, overwrite: bool = False) -> Path:
    """``out`` checked by the one output rule (refuses a foreign folder: exit 3); marker written."""
    try:
        path = check_output(out, stage=GPU_CHECK, overwrite=overwrite)
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(REFUSED_OUT) from None
    path.mkdir(parents=True, exist_ok=True)
    marker = path / GPU_CHECK.marker
    if not GPU_CHECK.owns(path):
        write_json(marker, dict(format=FORMAT, written_by="benchmarks/kernels.py"))
    return path


