"""Time the custom operators against their dense baselines on whatever device is present.

    python benchmarks/kernels.py [--quick]

Block-sparse attention (prefill: S = T = L; decode: S = 1 against a cache of L slots) against
(a) SDPA with the reference's additive ``[B, Hq, S, T]`` block mask and (b) unmasked causal SDPA
(the flash path on GPU, the harder baseline); the indexer top-k against its dense reference;
the MoE against the reference expert loop at 1, 16, 256 and 4096 tokens.

Shapes: on CUDA the real ones (64 q heads, 4 KV heads, d128, block 128, top-16; 128 experts,
top-4, hidden 6144, intermediate 3072, bf16) and the Triton kernels. On CPU a stated scale-down
(``CPU_SCALE``) and the torch implementations (the Triton interpreter is a test tool, not a
runtime). Baseline masks are built outside the timed region (this favours the baseline).
Results go to ``benchmarks/results/kernels-<device>.json`` with the machine description.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from m3_trt.plugins.block_sparse_attention import block_sparse_attention
from m3_trt.plugins.block_sparse_attention.reference import block_keep_mask
from m3_trt.plugins.indexer_topk import indexer_topk
from m3_trt.plugins.swiglu_moe import swiglu_moe

GPU_SHAPES = dict(
    attn=dict(Hq=64, G=4, D=128, block=128, topk=16, local=1, Di=128, lengths=[2048, 4096, 8192, 16384]),
    moe=dict(E=128, top_k=4, D=6144, F=3072, tokens=[1, 16, 256, 4096]),
    dtype=torch.bfloat16,
)
CPU_SCALE = dict(
    attn=dict(Hq=8, G=2, D=64, block=64, topk=8, local=1, Di=64, lengths=[512, 1024, 2048, 4096]),
    moe=dict(E=128, top_k=4, D=256, F=128, tokens=[1, 16, 256, 4096]),
    dtype=torch.float32,
    note="CPU scale-down: attention Hq 64->8, G 4->2, d 128->64, block 128->64, top-16->8, lengths /4; "
         "MoE hidden 6144->256, intermediate 3072->128 (128 experts, top-4 kept); fp32; 1 thread; "
         "indexer inputs random (no locality: a tile's union of blocks is near-dense, the worst case)",
)


def _timer(device):
    def run(fn, reps):
        fn()  # warm-up (compilation, caches)
        times = []
        for _ in range(reps):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        # min on CPU: other work on a shared machine only ever adds time; median on GPU.
        return min(times) if device == "cpu" else statistics.median(times)
    return run


def machine(device):
    info = dict(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu"] = cpu
    return info


def _indexer_queries(G, S, Di, selection, device, dtype):
    """``random``: independent per query (no locality: a tile's union of blocks is near-dense,
    the worst case for tiling). ``smooth``: a random walk over positions, so neighbouring
    queries prefer similar blocks, as neighbouring tokens' hidden states do in a real model."""
    if selection == "random":
        return torch.randn(1, G, S, Di, device=device, dtype=dtype)
    walk = torch.randn(1, G, S, Di, device=device).mul_(0.05).cumsum(dim=2)
    return (walk + torch.randn(1, G, 1, Di, device=device)).to(dtype)


def bench_attention(cfg, dtype, device, impl, timer, reps):
    rows = []
    Hq, G, D, bs, topk, local, Di = (cfg[k] for k in ("Hq", "G", "D", "block", "topk", "local", "Di"))
    for L in cfg["lengths"]:
        for mode, selection in (("prefill", "random"), ("prefill", "smooth"), ("decode", "random")):
            S = L if mode == "prefill" else 1
            pos = (torch.arange(S, device=device) + (L - S))[None]
            q = torch.randn(1, Hq, S, D, device=device, dtype=dtype)
            k = torch.randn(1, G, L, D, device=device, dtype=dtype)
            v = torch.randn(1, G, L, D, device=device, dtype=dtype)
            iq = _indexer_queries(G, S, Di, selection, device, dtype)
            ik = torch.randn(1, L, Di, device=device, dtype=dtype)
            sel = dict(block_size=bs, topk=topk, local_blocks=local)
            idx = indexer_topk(iq, ik, pos, **sel, impl=impl)
            t_sparse = timer(lambda: block_sparse_attention(q, k, v, idx, pos, block_size=bs, scale=D**-0.5, impl=impl), reps)
            t_index = timer(lambda: indexer_topk(iq, ik, pos, **sel, impl=impl), reps)
            row = dict(L=L, mode=mode, selection=selection, sparse_s=t_sparse, indexer_s=t_index)
            keep = block_keep_mask(idx, pos, L, bs)
            row["density_of_causal"] = keep.sum().item() / (G * (pos + 1).sum().item())
            keep = keep.repeat_interleave(Hq // G, dim=1)
            mask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, torch.finfo(dtype).min)
            del keep
            kr, vr = k.repeat_interleave(Hq // G, 1), v.repeat_interleave(Hq // G, 1)
            row["sdpa_masked_s"] = timer(lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask), reps)
            del mask
            causal = mode == "prefill"  # decode: one query at the end of the cache sees every slot
            row["sdpa_causal_s"] = timer(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True), reps)
            if L <= cfg["lengths"][1]:
                row["indexer_reference_s"] = timer(lambda: indexer_topk(iq, ik, pos, **sel, impl="reference"), reps)
                row["indexer_speedup"] = row["indexer_reference_s"] / t_index
            row["speedup_vs_masked_sdpa"] = row["sdpa_masked_s"] / t_sparse
            row["speedup_vs_causal_sdpa"] = row["sdpa_causal_s"] / t_sparse
            rows.append(row)
            print(f"attention {mode:7s} {selection:6s} L={L:6d}: sparse {t_sparse*1e3:9.2f} ms"
                  f"  vs masked SDPA x{row['speedup_vs_masked_sdpa']:.2f}  vs causal SDPA x{row['speedup_vs_causal_sdpa']:.2f}"
                  f"  (indexer {t_index*1e3:.2f} ms, kept {row['density_of_causal']:.0%} of causal)", flush=True)
    return rows


def bandwidth(device, dtype):
    n = (1 << 28 if device == "cuda" else 1 << 25) // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    t = _timer(device)(lambda: b.copy_(a), 5)
    return 2 * a.numel() * 4 / t


def bench_moe(cfg, dtype, device, impl, timer, reps):
    E, K, D, Fi = cfg["E"], cfg["top_k"], cfg["D"], cfg["F"]
    w = dict(router_w_ED=torch.randn(E, D, device=device, dtype=dtype) * D**-0.5,
             e_bias_E=torch.randn(E, device=device) * 0.01,
             w13_EFD=torch.randn(E, 2 * Fi, D, device=device, dtype=dtype) * D**-0.5,
             w2_EDF=torch.randn(E, D, Fi, device=device, dtype=dtype) * Fi**-0.5,
             w13s_FD=torch.randn(2 * Fi, D, device=device, dtype=dtype) * D**-0.5,
             w2s_DF=torch.randn(D, Fi, device=device, dtype=dtype) * Fi**-0.5)
    kw = dict(top_k=K, routed_scaling=2.0, alpha=1.702, limit=7.0)
    bw = bandwidth(device, dtype)
    expert_bytes = 3 * Fi * D * torch.finfo(dtype).bits // 8
    rows = []
    for T in cfg["tokens"]:
        x = torch.randn(T, D, device=device, dtype=dtype)
        args = (x, w["router_w_ED"], w["e_bias_E"], w["w13_EFD"], w["w2_EDF"], w["w13s_FD"], w["w2s_DF"])
        t_fast = timer(lambda: swiglu_moe(*args, **kw, impl=impl), reps)
        t_ref = timer(lambda: swiglu_moe(*args, **kw, impl="reference"), reps)
        # Bandwidth floor: every distinct selected expert's weights (+ shared expert) read once.
        from m3_trt.plugins.swiglu_moe.reference import route

        n_used = int(route(x, w["router_w_ED"], w["e_bias_E"], K)[1].unique().numel())
        floor = (n_used + 1) * expert_bytes / bw
        rows.append(dict(tokens=T, fast_s=t_fast, reference_s=t_ref, speedup=t_ref / t_fast,
                         experts_used=n_used, bandwidth_floor_s=floor, over_floor=t_fast / floor))
        print(f"moe T={T:5d}: {impl} {t_fast*1e3:9.2f} ms  reference {t_ref*1e3:9.2f} ms  x{t_ref/t_fast:.2f}"
              f"  ({t_fast/floor:.1f}x the bandwidth floor)", flush=True)
    return rows, bw


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two smallest sizes only (smoke run)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads; 1 by default because on a shared 2-core machine a busy core stalls "
                         "every OpenMP barrier (measured: 0.15 ms -> 117 ms for one decode step)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    shapes = GPU_SHAPES if device == "cuda" else CPU_SCALE
    impl = "triton" if device == "cuda" else "torch"
    reps = 20 if device == "cuda" else 5
    attn_cfg, moe_cfg = dict(shapes["attn"]), dict(shapes["moe"])
    if args.quick:
        attn_cfg["lengths"], moe_cfg["tokens"] = attn_cfg["lengths"][:2], moe_cfg["tokens"][:2]
    print(f"device {device}, impl {impl}, {shapes.get('note', 'real shapes')}", flush=True)
    timer = _timer(device)
    torch.manual_seed(0)
    with torch.inference_mode():
        attn = bench_attention(attn_cfg, shapes["dtype"], device, impl, timer, reps)
        moe, bw = bench_moe(moe_cfg, shapes["dtype"], device, impl, timer, reps)
    result = dict(
        device=device, impl=impl, machine=machine(device), scale=shapes.get("note", "real shapes"),
        dtype=str(shapes["dtype"]), attention_config={k: v for k, v in attn_cfg.items()},
        moe_config=moe_cfg, measured_copy_bandwidth_GBps=bw / 1e9, attention=attn, moe=moe,
        timing=f"{'median' if device == 'cuda' else 'min'} of {reps} after one warm-up; baseline masks built outside the timed region",
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels-{device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
