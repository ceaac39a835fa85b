"""Validate and time the custom operators' kernels: the kernel half of ``scripts/gpu_check.sh``.

    bash scripts/gpu_check.sh [--out DIR] [--dry-run]            the one command (sets PYTHONPATH)
    python benchmarks/kernels.py --out DIR [--section all|check|time] [--dry-run | --cpu]

Three profiles, picked by the machine and the flags:

* **gpu** (CUDA present): the real shapes (64 query / 4 KV heads, d128, block 128, top-16, local 1;
  128 experts top-4, hidden 6144, intermediate 3072) and the Triton kernels.
  ``check``: each kernel against its reference in fp32 and bf16, prefill and decode, the
  indexer by exact block sets, plus a 64-bit-offset case (prefill batch stride of B = 5 at 64K)
  and a negative control per check. ``time``: block-sparse prefill against SDPA with the block
  mask (L <= 16K: the mask is ``64·L²`` bf16) and against unmasked causal SDPA (flash) at 2K-64K;
  decode against flash decode at 8K-128K caches; the indexer's share; MoE at 1/16/256/4096
  tokens against the HBM floor (bytes of the experts actually chosen, plus the shared expert,
  over the measured copy bandwidth).
* **dry-run** (``--dry-run``, CPU, ``TRITON_INTERPRET=1``): every step at tiny shapes with the
  kernels in Triton's interpreter, so CI catches a broken step before the one GPU call. Its
  timings are interpreter times, not measurements.
* **cpu** (``--cpu``): the torch implementations at a stated scale-down (no Triton), the figures
  behind the README's CPU row.

Every step records its result or its error (an OOM, a failing kernel) and the run goes on; the
JSON (``kernels-<gpu>.json``) is rewritten after each step, so a run cut short keeps what it
measured. Timing: CUDA events around each call, L2 flushed (256 MiB memset) before every rep of
the decode and MoE steps, median of a few reps sized to a per-measurement budget.
``tests/tolerances.py`` (on ``PYTHONPATH``) is the tolerance table. Beside this file:
``gpu_common.py`` (profiles, timer, step runner), ``gpu_correctness.py`` (the checks),
``gpu_summary.py`` (goals, summary), ``gpu_layer.py`` (the layer half; writes the summary).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
from gpu_common import (FORMAT, MOE_KW, PROFILES, REAL_ATTN, REAL_MOE, Profile, Steps, Timer, _moe_args, attn_inputs,
                        copy_bandwidth, environment, moe_weights, pick_profile, prepare_out, run_slug, write_json)
from gpu_correctness import run_checks
from gpu_summary import evaluate_goals, write_summary

from m3_trt.plugins.block_sparse_attention import block_sparse_attention
from m3_trt.plugins.block_sparse_attention.reference import block_keep_mask
from m3_trt.plugins.indexer_topk import indexer_topk
from m3_trt.plugins.swiglu_moe import swiglu_moe
from m3_trt.plugins.swiglu_moe.reference import route


# -- timings -----------------------------------------------------------------------------------


def kept_keys(idx_BGSK: torch.Tensor, pos_BS: torch.Tensor, bs: int) -> int:
    """Keys the selection lets attend (selected blocks, slot <= position), without an [S, T] mask."""
    n = idx_BGSK.long()
    slots = (pos_BS[:, None, :, None] - n * bs + 1).clamp(0, bs)
    return int(torch.where(n >= 0, slots, 0).sum())


def flash_sdpa_time(timer: Timer, q, k, v, causal: bool, flush: bool) -> tuple[float, str]:
    """Unmasked SDPA with the flash backend forced (GQA without repeating K/V); if the flash
    kernel refuses the inputs, the default choice, and the reason is recorded."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return timer(fn, flush), "flash"
    except RuntimeError as e:
        return timer(fn, flush), f"default (flash refused: {str(e)[:160]})"


def time_prefill(p: Profile, device: str, timer: Timer, L: int) -> dict:
    a = p.attn
    q, k, v, iq, ik, pos = attn_inputs(a, 1, L, L, p.dtype, device)
    sel = dict(block_size=a["block"], topk=a["topk"], local_blocks=a["local"])
    idx = indexer_topk(iq, ik, pos, **sel, impl=p.impl)
    row = dict(L=L, kept_of_causal=kept_keys(idx, pos, a["block"]) / (a["G"] * L * (L + 1) / 2))
    row["sparse_s"] = timer(lambda: block_sparse_attention(q, k, v, idx, pos, block_size=a["block"],
                                                           scale=a["D"] ** -0.5, impl=p.impl))
    row["indexer_s"] = timer(lambda: indexer_topk(iq, ik, pos, **sel, impl=p.impl))
    row["indexer_share"] = row["indexer_s"] / (row["indexer_s"] + row["sparse_s"])
    row["sdpa_causal_s"], row["sdpa_causal_backend"] = flash_sdpa_time(timer, q, k, v, causal=True, flush=False)
    row["speedup_vs_flash"] = row["sdpa_causal_s"] / (row["sparse_s"] + row["indexer_s"])
    row["speedup_vs_flash_attention_only"] = row["sdpa_causal_s"] / row["sparse_s"]
    if L <= p.masked_max:
        # The additive [1, Hq, L, L] mask transformers' SDPA path builds, made outside the timed
        # region one KV group at a time (peak = the mask + one group's [L, L] booleans).
        R = a["Hq"] // a["G"]
        mask = torch.zeros(1, a["Hq"], L, L, dtype=p.dtype, device=device)
        for g in range(a["G"]):
            drop = ~block_keep_mask(idx[:, g:g + 1], pos, L, a["block"])
            mask[:, g * R:(g + 1) * R].masked_fill_(drop, torch.finfo(p.dtype).min)
            del drop
        kr, vr = k.repeat_interleave(R, 1), v.repeat_interleave(R, 1)
        row["sdpa_masked_s"] = timer(lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask))
        row["speedup_vs_masked"] = row["sdpa_masked_s"] / row["sparse_s"]
    else:
        row["sdpa_masked_s"] = None
        row["sdpa_masked_skipped"] = f"mask would take {a['Hq'] * L * L * 2 / 2**30:.0f} GiB"
    print(f"  prefill L={L:6d}: sparse {row['sparse_s']*1e3:8.2f} ms + indexer {row['indexer_s']*1e3:8.2f} ms | "
          f"flash x{row['speedup_vs_flash']:.2f}" + (f" | masked x{row['speedup_vs_masked']:.2f}" if row["sdpa_masked_s"] else ""),
          flush=True)
    return row


def time_decode(p: Profile, device: str, timer: Timer, L: int) -> dict:
    a = p.attn
    q, k, v, iq, ik, pos = attn_inputs(a, 1, 1, L, p.dtype, device)
    sel = dict(block_size=a["block"], topk=a["topk"], local_blocks=a["local"])
    idx = indexer_topk(iq, ik, pos, **sel, impl=p.impl)
    row = dict(L=L)
    row["sparse_s"] = timer(lambda: block_sparse_attention(q, k, v, idx, pos, block_size=a["block"],
                                                           scale=a["D"] ** -0.5, impl=p.impl), flush=True)
    row["indexer_s"] = timer(lambda: indexer_topk(iq, ik, pos, **sel, impl=p.impl), flush=True)
    row["indexer_share"] = row["indexer_s"] / (row["indexer_s"] + row["sparse_s"])
    # one query at the end of the cache sees every slot: no mask, flash / flash-decoding path
    row["flash_decode_s"], row["flash_backend"] = flash_sdpa_time(timer, q, k, v, causal=False, flush=True)
    row["speedup_vs_flash"] = row["flash_decode_s"] / (row["sparse_s"] + row["indexer_s"])
    esize = torch.finfo(p.dtype).bits // 8
    row["bytes_floor"] = (a["G"] * a["topk"] * a["block"] * a["D"] * 2 + L * a["Di"]) * esize
    print(f"  decode  L={L:6d}: sparse {row['sparse_s']*1e6:8.1f} us + indexer {row['indexer_s']*1e6:8.1f} us | "
          f"flash decode {row['flash_decode_s']*1e6:8.1f} us -> x{row['speedup_vs_flash']:.2f}", flush=True)
    return row


def time_moe(p: Profile, device: str, timer: Timer, bw: float, w: dict, T: int) -> dict:
    m = p.moe
    x = torch.randn(T, m["D"], device=device, dtype=p.dtype)
    kw = dict(MOE_KW, top_k=m["top_k"])
    args = _moe_args(w, x)
    t_fast = timer(lambda: swiglu_moe(*args, **kw, impl=p.impl), flush=True)
    t_ref = timer(lambda: swiglu_moe(*args, **kw, impl="reference"), flush=True)
    n_used = int(route(x, w["router_w_ED"], w["e_bias_E"], m["top_k"])[1].unique().numel())
    esize = torch.finfo(p.dtype).bits // 8
    floor_bytes = (n_used * 3 * m["F"] + 3 * m["Fs"]) * m["D"] * esize
    row = dict(tokens=T, fast_s=t_fast, reference_s=t_ref, speedup_vs_reference=t_ref / t_fast, experts_used=n_used,
               floor_bytes=floor_bytes, hbm_floor_s=floor_bytes / bw, over_floor=t_fast / (floor_bytes / bw))
    print(f"  moe T={T:5d}: {p.impl} {t_fast*1e3:8.3f} ms, reference {t_ref*1e3:8.3f} ms, {n_used} experts, "
          f"{row['over_floor']:.2f}x the HBM floor", flush=True)
    return row


def run_timings(p: Profile, device: str, steps: Steps, bw: float) -> None:
    timer = Timer(device, p)
    torch.manual_seed(5)
    for L in p.prefill:
        steps("prefill", f"L{L}", lambda: time_prefill(p, device, timer, L))
    for L in p.decode:
        steps("decode", f"L{L}", lambda: time_decode(p, device, timer, L))
    held = {}

    def make():
        held["w"] = moe_weights(p.moe, p.dtype, device)
        return dict(bytes=sum(t.numel() * t.element_size() for t in held["w"].values()))

    steps("moe", "weights", make)
    if "w" in held:
        for T in p.tokens:
            steps("moe", f"T{T}", lambda: time_moe(p, device, timer, bw, held["w"], T))
    held.clear()


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--section", choices=("all", "check", "time"), default="all")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, Triton interpreter on CPU")
    ap.add_argument("--cpu", action="store_true", help="torch implementations at a CPU scale-down")
    ap.add_argument("--overwrite", action="store_true", help="write into a folder that is not a gpu-check output")
    ap.add_argument("--budget-s", type=float, help="soft time budget; later steps are skipped (default: profile's)")
    ap.add_argument("--summary", action="store_true", help="only (re)write DIR/summary.txt from the JSON files")
    args = ap.parse_args()
    if args.summary:
        write_summary(prepare_out(args.out, args.overwrite), "dryrun" if args.dry_run else None)
        return
    profile, device = pick_profile(args)
    if args.budget_s:
        profile = replace(profile, budget_s=args.budget_s)
    out = prepare_out(args.out, args.overwrite)
    if device == "cpu" and profile.name == "cpu":
        torch.set_num_threads(1)  # a busy shared core stalls every OpenMP barrier
    path = out / f"kernels-{run_slug(profile)}.json"
    # the time section joins what this run's check section wrote; every other run starts afresh
    record = json.loads(path.read_text()) if path.is_file() and args.section == "time" else {}
    record["format"] = FORMAT
    steps = Steps(record, path, time.monotonic() + profile.budget_s)
    print(f"kernels: profile {profile.name}, device {device}, impl {profile.impl} -> {path}", flush=True)
    if profile.name == "dry-run":
        g = PROFILES["gpu"]
        print(f"  [dry run] on a GPU this measures: prefill L={list(g.prefill)} (masked SDPA up to {g.masked_max}), "
              f"decode L={list(g.decode)}, MoE tokens={list(g.tokens)} at {REAL_ATTN} / {REAL_MOE}", flush=True)
    if args.section in ("all", "check"):
        steps("environment", "info", lambda: environment(device, profile))
        record["environment"] = record["environment"]["info"]
        record["profile"] = {k: v for k, v in asdict(profile).items() if k != "dtype"} | {"dtype": str(profile.dtype)}
    with torch.inference_mode():
        if args.section in ("all", "check") and profile.name != "cpu":
            run_checks(profile, device, steps)
        if args.section in ("all", "time"):
            bw = record.get("environment", {}).get("copy_bandwidth_GBps")
            bw = bw * 1e9 if bw else copy_bandwidth(device)
            run_timings(profile, device, steps, bw)
    record["goals"] = evaluate_goals(record)
    write_json(path, record)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
