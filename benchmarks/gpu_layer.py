"""One full-size decoder layer (sparse attention + MoE, bf16, random weights) on the GPU: the
layer half of ``scripts/gpu_check.sh``, which also writes the run's one-screen summary.

    bash scripts/gpu_check.sh [--out DIR] [--dry-run]
    python benchmarks/gpu_layer.py --out DIR [--dry-run]      (PYTHONPATH as the script sets it)

The layer is ``m3_trt.model.modeling.DecoderLayer`` at the full-size dimensions (``config.full_size``:
hidden 6144, 64/4 heads, d128, indexer 4x128 with block 128 / top-16 / local 1, 128 experts
top-4 + shared expert, intermediate 3072), built on the device in bf16 with fan-in-scaled random
weights (~14.8 GB). It runs twice per measurement: ``kernels="triton"`` (the Triton kernels) and
``kernels="reference"`` (the readable specs: dense-mask attention, expert loop). Measured:

* prefill of 8K tokens into an empty cache;
* one decode step at 8K, 32K and 128K context (cache filled with random keys/values; L2 flushed
  before each rep), with the step's HBM floor: attention and chosen-expert weights, the 16
  selected KV blocks and the indexer keys read once. The model's cache write is out-of-place
  (export-friendly ``scatter``): it copies the whole layer cache every step, listed apart;
* the output difference between the two paths (the layer's residual update, relative L2);
* from the decode step: the per-token time of 60 such layers at this GPU's speed, how many layers
  one GPU holds, and a paper projection for 8xB200 next to the seed's ~31 tok/s (assumptions in
  the JSON's ``projection.assumptions``).

``--dry-run``: the same steps on CPU with a 1-layer tiny config and the kernels in Triton's
interpreter (the times are interpreter times, never figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import torch
from gpu_common import (SEED_DECODE_TOK_S, Profile, Steps, Timer, copy_bandwidth, pick_profile, prepare_out,
                        run_slug, write_json)
from gpu_summary import write_summary
from tolerances import TOLERANCES, rel_err

from m3_trt.model.cache import LayerCache
from m3_trt.model.config import TextConfig, full_size, tiny
from m3_trt.model.modeling import DecoderLayer, rope_cos_sin

LAYERS = 60
# Paper projection for 8xB200 (stated, not measured).
B200 = dict(
    hbm_TBps=8.0,  # B200 datasheet
    h200_hbm_TBps_datasheet=4.8,  # the copy efficiency measured here (measured / datasheet) is assumed on B200
    gpus=8,
    sharding="TP8 attention (4 KV heads replicated 2x), EP8 experts: each GPU reads 1/8 of the layer's bytes "
             "(optimistic at batch 1: top-4 routing lands on <= 4 GPUs, the busiest bounds the step)",
    collectives_per_layer=3,  # attention all-reduce, MoE dispatch + combine all-to-all
    collective_latency_us=10.0,  # small-message NCCL over NVLink, per collective (assumed)
    nvlink_GBps_per_direction=900.0,  # NVLink 5 per GPU
    overhead="the measured step time above its HBM floor (launches, small kernels) is kept unscaled",
)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    cfg: TextConfig
    prefill: int
    contexts: tuple[int, ...]


def layer_plan(profile: Profile) -> LayerPlan:
    one = dict(num_hidden_layers=1, layer_types=("minimax_m3_sparse",), mlp_layer_types=("sparse",))
    if profile.name == "gpu":
        return LayerPlan(dataclasses.replace(full_size().text, **one), 8192, (8192, 32768, 131072))
    if profile.name == "dry-run":
        return LayerPlan(dataclasses.replace(tiny().text, **one), 16, (24, 40))
    raise SystemExit("the layer step runs on a GPU or with --dry-run")


def build_layer(cfg: TextConfig, dtype: torch.dtype, device: str) -> DecoderLayer:
    """The layer allocated straight in ``dtype`` on ``device``; norms 0 (Gemma: ``x * (1 + 0)``),
    weights N(0, 1/fan_in) so activations stay O(1), routing bias N(0, 0.01)."""
    with torch.device("meta"):
        layer = DecoderLayer(cfg, 0)
    layer = layer.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, t in itertools.chain(layer.named_parameters(), layer.named_buffers()):
            if name.endswith("norm.weight"):
                t.zero_()
            elif name.endswith("e_score_correction_bias"):
                t.normal_(0.0, 0.01, generator=gen)
            else:
                t.normal_(0.0, t.shape[-1] ** -0.5, generator=gen)
    return layer.eval()


def set_kernels(layer: DecoderLayer, impl: str) -> None:
    layer.self_attn.kernels = impl
    layer.mlp.kernels = impl


def new_cache(cfg: TextConfig, T: int, dtype, device, fill: bool) -> LayerCache:
    shape = (1, cfg.num_key_value_heads, T, cfg.head_dim)
    make = torch.randn if fill else torch.zeros
    return LayerCache(k_BGTD=make(shape, dtype=dtype, device=device), v_BGTD=make(shape, dtype=dtype, device=device),
                      idx_k_BTD=make((1, T, cfg.index_head_dim), dtype=dtype, device=device))


def _both_paths(layer, cfg, x, pos, base: LayerCache, timer_fast, timer_ref, flush: bool) -> dict:
    """Times the layer with the Triton kernels and with the reference path on the same input and
    cache contents; the residual updates ``out - x`` of the two are compared. (The model writes
    the cache out of place: each call replaces the tensors in its own ``LayerCache`` copy.)"""
    cos, sin = rope_cos_sin(pos, cfg, x.dtype)
    outs, row = {}, {}
    for impl, timer in (("triton", timer_fast), ("reference", timer_ref)):
        set_kernels(layer, impl)
        cache = dataclasses.replace(base)
        row[f"{impl}_s"] = timer(lambda: layer(x, cos, sin, pos, cache), flush=flush)
        outs[impl] = timer.last - x
        timer.last = None
        del cache
    err = rel_err(outs["triton"], outs["reference"])
    tol = TOLERANCES[("kernel", "bf16")]
    row.update(rel_err_vs_reference=err, tolerance=tol, within_tolerance=err <= tol,
               triton_speedup_vs_reference=row["reference_s"] / row["triton_s"])
    return row


def decode_floor(layer: DecoderLayer, cfg: TextConfig, ctx: int, esize: int, bw: float) -> dict:
    attn_w = sum(p.numel() for p in layer.self_attn.parameters())
    moe = layer.mlp
    expert = moe.experts.gate_up_proj[0].numel() + moe.experts.down_proj[0].numel()
    shared = sum(p.numel() for p in moe.shared_experts.parameters())
    kv = cfg.num_key_value_heads * cfg.index_topk_blocks * cfg.index_block_size * cfg.head_dim * 2
    weights = (attn_w + moe.gate.weight.numel() + cfg.num_experts_per_tok * expert + shared) * esize
    reads = kv * esize + ctx * cfg.index_head_dim * esize
    cache = (2 * cfg.num_key_value_heads * ctx * cfg.head_dim + ctx * cfg.index_head_dim) * esize
    return dict(weight_bytes=weights, cache_read_bytes=reads, floor_s=(weights + reads) / bw,
                cache_copy_bytes=2 * cache, cache_copy_s=2 * cache / bw, cache_bytes=cache)


def projection(layer: DecoderLayer, cfg: TextConfig, row: dict, bw: float, mem_bytes: float | None) -> dict:
    """Per-token decode time of 60 layers from one measured layer step, and the 8xB200 paper figure."""
    t = row["triton_s"]
    esize = next(layer.parameters()).element_size()
    layer_bytes = sum(p.numel() for p in layer.parameters()) * esize
    fit = int(0.9 * mem_bytes // (layer_bytes + row["cache_bytes"])) if mem_bytes else None
    eff = bw / (B200["h200_hbm_TBps_datasheet"] * 1e12)
    b200_bw = B200["hbm_TBps"] * 1e12 * eff
    floor_b200 = (row["weight_bytes"] + row["cache_read_bytes"]) / B200["gpus"] / b200_bw
    overhead = max(0.0, t - row["floor_s"])
    msg = cfg.hidden_size * esize * (1 + 2 * cfg.num_experts_per_tok)
    comm = B200["collectives_per_layer"] * B200["collective_latency_us"] * 1e-6 + msg / (B200["nvlink_GBps_per_direction"] * 1e9)
    per_token = LAYERS * (floor_b200 + overhead + comm)
    return dict(
        context=row["context"], measured_layer_decode_s=t, per_token_60_layers_s=LAYERS * t,
        per_token_60_layers_assumption="every layer costs as this sparse-attention + MoE layer (the real pattern "
                                       "has full-attention and dense-MLP layers too)",
        layer_weight_bytes=layer_bytes, layers_fit_per_gpu=fit, per_gpu_share_s=None if fit is None else fit * t,
        b200x8_layer_s=floor_b200 + overhead + comm, b200x8_tok_s=1.0 / per_token,
        b200x8_bandwidth_only_tok_s=1.0 / (LAYERS * (floor_b200 + comm)),
        seed_tok_s=SEED_DECODE_TOK_S, assumptions=dict(B200, measured_copy_efficiency=eff,
                                                        message_bytes_per_layer=msg),
        note="paper projection from one H200 layer measurement; not a measurement on B200")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--budget-s", type=float, help="soft time budget; later steps are skipped")
    args = ap.parse_args()
    args.cpu = False
    profile, device = pick_profile(args)
    out = prepare_out(args.out, args.overwrite)
    plan = layer_plan(profile)
    slug = run_slug(profile)
    path = out / f"layer-{slug}.json"
    record = dict(format="m3-trt-gpu-check/1", profile=profile.name, note=profile.note,
                  config={k: v for k, v in dataclasses.asdict(plan.cfg).items()
                          if k not in ("layer_types", "mlp_layer_types", "eos_token_id")})
    steps = Steps(record, path, time.monotonic() + (args.budget_s or (200.0 if profile.name == "gpu" else 600.0)))
    fast = Timer(device, dataclasses.replace(profile, measure_s=min(profile.measure_s, 0.5), max_reps=min(profile.max_reps, 10)))
    slow = Timer(device, dataclasses.replace(profile, measure_s=0.0, max_reps=1))
    dtype = torch.bfloat16
    print(f"layer: profile {profile.name}, device {device} -> {path}", flush=True)
    if profile.name == "dry-run":
        g = layer_plan(dataclasses.replace(profile, name="gpu"))
        print(f"  [dry run] on a GPU this measures: the full-size layer (hidden {g.cfg.hidden_size}, "
              f"{g.cfg.num_local_experts} experts) prefill {g.prefill}, decode at {list(g.contexts)}", flush=True)
    held = {}

    def make():
        torch.manual_seed(0)
        held["layer"] = build_layer(plan.cfg, dtype, device)
        held["bw"] = copy_bandwidth(device)
        return dict(weight_bytes=sum(p.numel() * p.element_size() for p in held["layer"].parameters()),
                    copy_bandwidth_GBps=held["bw"] / 1e9)

    with torch.inference_mode():
        steps("setup", "layer", make)
        if "layer" in held:
            layer, cfg, bw = held["layer"], plan.cfg, held["bw"]
            H = cfg.hidden_size

            def prefill():
                S = plan.prefill
                x = torch.randn(1, S, H, device=device, dtype=dtype)
                pos = torch.arange(S, device=device)[None]
                row = _both_paths(layer, cfg, x, pos, new_cache(cfg, S, dtype, device, fill=False), fast, slow,
                                  flush=False)
                print(f"  prefill {S}: triton {row['triton_s']*1e3:.2f} ms, reference {row['reference_s']*1e3:.2f} ms, "
                      f"rel err {row['rel_err_vs_reference']:.2e}", flush=True)
                return dict(tokens=S, **row)

            steps("layer", "prefill", prefill)
            record["prefill"] = record["layer"].pop("prefill")
            for ctx in plan.contexts:
                def decode(ctx=ctx):
                    x = torch.randn(1, 1, H, device=device, dtype=dtype)
                    pos = torch.tensor([[ctx - 1]], device=device)
                    row = _both_paths(layer, cfg, x, pos, new_cache(cfg, ctx, dtype, device, fill=True), fast, fast,
                                      flush=True)
                    row.update(context=ctx, **decode_floor(layer, cfg, ctx, 2, bw))
                    print(f"  decode ctx {ctx}: triton {row['triton_s']*1e3:.3f} ms (floor {row['floor_s']*1e3:.3f} ms "
                          f"+ cache copy {row['cache_copy_s']*1e3:.3f} ms), reference {row['reference_s']*1e3:.3f} ms", flush=True)
                    return row

                steps("decode", f"ctx{ctx}", decode)
            mem = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None
            for name, row in record.get("decode", {}).items():
                if isinstance(row, dict) and "triton_s" in row:
                    steps("projections", name, lambda row=row: projection(layer, cfg, row, bw, mem))
            first = next((r for r in record.get("projections", {}).values() if isinstance(r, dict) and "context" in r), None)
            if first is not None:
                record["projection"] = first
            record.pop("layer", None)
        held.clear()
    write_json(path, record)
    print(f"wrote {path}", flush=True)
    write_summary(out, slug)


if __name__ == "__main__":
    main()
