"""``m3-trt make-synthetic``: a random MiniMax-M3-VL checkpoint in the real on-disk layout, at any width.

What is written is what transformers' ``save_pretrained`` writes for the same config: the original
MiniMax key names (``language_model.model.layers.N.block_sparse_moe.experts.E.w1.weight`` …),
``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes`` with
``model.safetensors.index.json``, ``config.json`` (+ ``generation_config.json``), plus the tiny
tokenizer and processor files (:mod:`m3_trt.checkpoints.tiny_tokenizer`; the model's vocabulary is larger
than the tokenizer's, which only ever emits the low ids) and the marker ``m3_trt_synthetic.json``.

Weights are drawn ONE TENSOR AT A TIME, in row chunks of at most :data:`CHUNK_ELEMS` values, and
streamed to their planned offsets (:class:`m3_trt.quant.quantize.ShardedWriter`): memory stays at one
chunk however wide or deep the model is. ``--format mxfp8`` stores the tensors the real checkpoint
stores as FP8 (:func:`m3_trt.quant.quantize.is_quantized_key`) as E4M3 codes + E8M0 ``[rows, cols/32]``
scales, with the ``quantization_config`` transformers reads; ``bf16`` stores everything in bf16
(the MoE ``e_score_correction_bias`` stays float32, as in MiniMax's checkpoints).

Presets (``--layers N`` sets the depth of each):

* ``m3``: the real widths (:func:`m3_trt.model.config.full_size`: hidden 6144, 64/4 heads, 128 experts ×
  3072, dense 12288, vocab 200064, vision 1280 × 32 layers) — one MoE layer is 14.8 GB in bf16;
* ``medium``: hidden 1024, 16 experts × 512, vocab 16384 (the memory-bound test's width);
* ``small``: hidden 256, 8 experts × 128, vocab ≈ the tokenizer's (the parity tests' width).

Layer pattern for N layers (the real checkpoint's own pattern is not public; this one covers the
variants): full attention on every 4th layer from 0 (sparse everywhere when N == 1), the first
``min(3, N // 2)`` layers dense, the rest MoE — so N = 1 is one sparse-MoE layer, N = 2 a
full-dense + sparse-MoE pair, N ≥ 5 all four variants, N = 60 matches :func:`full_size`.

Values: norms ``0.1·N(0,1)`` (Gemma ``x·(1+w)``; vision LayerNorm weights ``1 + 0.1·N``), biases
``0.02·N``, matrices ``0.8/√fan_in · N`` (activations keep unit size through the layers),
embeddings ``N(0, 1)``; each tensor has its own generator seeded from ``(seed, name)``.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from m3_trt.model import config as cfgmod
from m3_trt.model.checkpoint import SCALE_SUFFIX, original_layout
from m3_trt.model.modeling import M3ForConditionalGeneration
from m3_trt.options import add_command, opt
from m3_trt.outputs import SYNTHETIC, check_output
from m3_trt.quant.quantize import (DEFAULT_SHARD_BYTES, E4M3, ShardedWriter, TensorSpec, finish, is_quantized_key,
                       new_work_dir, quantization_config, quantize_mxfp8, scale_spec)
from m3_trt.checkpoints.tiny_tokenizer import write_tiny_tokenizer

FORMATS = ("mxfp8", "bf16")
MARKER = "m3_trt_synthetic.json"
MARKER_FORMAT = "m3-trt-synthetic/1"
# Values drawn per step (16 MiB of fp32), whatever the tensor's size. Small enough that the
# allocator reuses the blocks: 64 MiB chunks were mmap'd afresh each time and spent as long in page
# faults as in drawing.
CHUNK_ELEMS = 1 << 22


def layer_pattern(n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(layer_types, mlp_layer_types)`` for ``n`` layers (see the module docstring)."""
    if n < 1:
        raise ValueError(f"--layers must be >= 1, got {n}")
    attn = tuple("full_attention" if i % 4 == 0 and n > 1 else "minimax_m3_sparse" for i in range(n))
    dense = min(3, n // 2)
    return attn, tuple("dense" if i < dense else "sparse" for i in range(n))


def _tokens(ids: dict[str, int]) -> dict:
    return dict(bos_token_id=ids["bos"], eos_token_id=(ids["eos"],), pad_token_id=ids["pad"])


def _media(ids: dict[str, int]) -> dict:
    return dict(image_token_id=ids["image"], video_token_id=ids["video"])


def _m3(ids: dict[str, int]) -> cfgmod.M3Config:
    cfg = cfgmod.full_size()
    return replace(cfg, text=replace(cfg.text, **_tokens(ids)), **_media(ids))


def _medium(ids: dict[str, int]) -> cfgmod.M3Config:
    text = cfgmod.TextConfig(**_tokens(ids),
        vocab_size=16384, hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        rotary_dim=64, intermediate_size=512, dense_intermediate_size=2048, shared_intermediate_size=512,
        num_local_experts=16, num_experts_per_tok=4, index_n_heads=2, index_head_dim=128, index_block_size=64,
        index_topk_blocks=4, num_hidden_layers=1, layer_types=("minimax_m3_sparse",), mlp_layer_types=("sparse",))
    vision = cfgmod.VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4)
    return cfgmod.M3Config(text=text, vision=vision, projector_hidden_size=1024, **_media(ids))


def _small(ids: dict[str, int]) -> cfgmod.M3Config:
    text = cfgmod.TextConfig(
        **_tokens(ids), vocab_size=-(-ids["vocab_size"] // 64) * 64, hidden_size=256, num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64, rotary_dim=32, intermediate_size=128, dense_intermediate_size=512,
        shared_intermediate_size=128, num_local_experts=8, num_experts_per_tok=2, index_n_heads=2,
        index_head_dim=32, index_block_size=16, index_topk_blocks=3, max_position_embeddings=4096,
        num_hidden_layers=1, layer_types=("minimax_m3_sparse",), mlp_layer_types=("sparse",))
    vision = cfgmod.VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    return cfgmod.M3Config(text=text, vision=vision, projector_hidden_size=256, **_media(ids))


PRESETS = {"m3": _m3, "medium": _medium, "small": _small}


def preset_config(preset: str, layers: int, ids: dict[str, int]) -> cfgmod.M3Config:
    """The preset's widths, ``layers`` deep, with the tokenizer's special-token ids."""
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset](ids)
    attn, mlp = layer_pattern(layers)
    text = replace(cfg.text, num_hidden_layers=layers, layer_types=attn, mlp_layer_types=mlp)
    if text.vocab_size < ids["vocab_size"]:
        raise ValueError(f"preset {preset}: vocab {text.vocab_size} is smaller than the tokenizer's "
                         f"{ids['vocab_size']}")
    return replace(cfg, text=text)


def tensor_specs(cfg: cfgmod.M3Config) -> list[TensorSpec]:
    """Every tensor of the original on-disk layout with its shape, in model order (no values)."""
    with torch.device("meta"):
        model = M3ForConditionalGeneration(cfg)
    state = dict(model.state_dict())
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return [TensorSpec(k, torch.float32, tuple(t.shape)) for k, t in original_layout(state, cfg.text.num_hidden_layers)]


def init_std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """``(mean, std)`` of the random values of tensor ``name`` (original key)."""
    if name.endswith("embed_tokens.weight"):
        return 0.0, 1.0
    if "norm" in name or "layrnorm" in name:
        return (1.0 if name.startswith("vision_tower") and name.endswith(".weight") else 0.0), 0.1
    if name.endswith("e_score_correction_bias"):
        return 0.0, 0.05
    if name.endswith(".bias") or len(shape) < 2:
        return 0.0, 0.02
    return 0.0, 0.8 / math.prod(shape[1:]) ** 0.5


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF


def draw_chunks(spec: TensorSpec, seed: int):
    """``(row, fp32 values)`` chunks of tensor ``spec`` along dim 0, at most CHUNK_ELEMS values each."""
    mean, std = init_std(spec.name, spec.shape)
    g = torch.Generator().manual_seed(_seed_for(seed, spec.name))
    rows = spec.shape[0] if spec.shape else 1
    per_row = math.prod(spec.shape[1:]) if spec.shape else 1
    step = max(1, CHUNK_ELEMS // max(per_row, 1))
    for r in range(0, rows, step):
        n = min(step, rows - r)
        x = torch.randn((n, *spec.shape[1:]) if spec.shape else (), generator=g)
        x.mul_(std)
        yield r, (x.add_(mean) if mean else x)


def storage_specs(specs: list[TensorSpec], fmt: str) -> tuple[list[TensorSpec], dict[str, bool]]:
    """The on-disk specs for ``fmt`` (FP8 codes + scales where the real checkpoint has them)."""
    out, quant = [], {}
    for s in specs:
        q = fmt == "mxfp8" and is_quantized_key(s.name, s.shape)
        quant[s.name] = q
        if q:
            sdt, sshape = scale_spec("mxfp8", s.shape, s.name)
            out += [TensorSpec(s.name, E4M3, s.shape), TensorSpec(s.name + SCALE_SUFFIX, sdt, sshape)]
        else:
            dt = torch.float32 if s.name.endswith("e_score_correction_bias") else torch.bfloat16
            out.append(TensorSpec(s.name, dt, s.shape))
    return out, quant


def make_synthetic(out: str | Path, *, preset: str = "m3", layers: int = 1, fmt: str = "mxfp8", seed: int = 0,
                   overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress=None) -> dict:
    """Write the synthetic checkpoint to ``out`` (via a sibling temp folder); returns the marker dict."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = check_output(Path(out), stage=SYNTHETIC, overwrite=overwrite)
    work = new_work_dir(out)
    t0 = time.perf_counter()
    try:
        ids = write_tiny_tokenizer(work)
        cfg = preset_config(preset, layers, ids)
        specs, quant = storage_specs(tensor_specs(cfg), fmt)
        if progress:
            total = sum(s.nbytes for s in specs)
            progress(f"make-synthetic: preset {preset}, {layers} layers, {fmt}: {len(specs)} tensors, "
                     f"{total / 2**30:.2f} GiB")
        writer = ShardedWriter(work, specs, max_shard_bytes)
        by_name = {s.name: s for s in specs}
        done = 0
        for name, q in quant.items():
            spec = by_name[name]
            src = TensorSpec(name, torch.float32, spec.shape)
            for row, x in draw_chunks(src, seed):
                if q:
                    codes, scale = quantize_mxfp8(x, name)
                    writer.write(name, codes, row)
                    writer.write(name + SCALE_SUFFIX, scale, row)
                else:
                    writer.write(name, x.to(spec.dtype), row)
                del x
            done += 1
            if progress and (done % 100 == 0 or done == len(quant)):
                progress(f"  [{done}/{len(quant)}] {name}")
        index = writer.close()
        hf = cfg.to_hf_dict()
        hf["text_config"]["pad_token_id"] = ids["pad"]
        hf["dtype"] = "bfloat16"
        if fmt == "mxfp8":
            hf["quantization_config"] = quantization_config("mxfp8")
        (work / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (work / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"], "do_sample": False},
            indent=2) + "\n")
        marker = {"format": MARKER_FORMAT, "preset": preset, "layers": layers, "weights": fmt, "seed": seed,
                  "layer_variants": [cfg.text.layer_variant(i) for i in range(layers)],
                  "tensors": len(index["weight_map"]), "bytes": index["metadata"]["total_size"],
                  "shards": len(set(index["weight_map"].values())),
                  "largest_tensor_bytes": max(s.nbytes for s in specs),
                  "seconds": round(time.perf_counter() - t0, 2),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        (work / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        finish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return marker


@dataclass(frozen=True, kw_only=True)
class MakeSyntheticOptions:
    out: Path = field(metadata=opt())
    preset: str = field(default="m3", metadata=opt("--preset", choices=list(PRESETS)))
    layers: int = field(metadata=opt("--layers"))
    fmt: str = field(default="mxfp8", metadata=opt("--format", choices=FORMATS))
    seed: int = field(default=0, metadata=opt("--seed"))
    overwrite: bool = field(default=False, metadata=opt(
        "--overwrite", help="replace an existing folder that is not ours"))


def cmd_make_synthetic(o: MakeSyntheticOptions) -> int:
    out = o.out
    print(f"make-synthetic: out={out} preset={o.preset} layers={o.layers} format={o.fmt} seed={o.seed}", flush=True)
    m = make_synthetic(out, preset=o.preset, layers=o.layers, fmt=o.fmt, seed=o.seed, overwrite=o.overwrite,
                       progress=lambda s: print(s, flush=True))
    print(f"wrote {out}: {m['tensors']} tensors in {m['shards']} shards, {m['bytes'] / 2**30:.2f} GiB, "
          f"{m['seconds']} s, peak RSS {m['peak_rss_mib']} MiB; layers {m['layer_variants']}")
    return 0


def register(sub) -> None:
    """Add ``make-synthetic`` to the ``m3-trt`` command line."""
    add_command(sub, "make-synthetic", MakeSyntheticOptions, cmd_make_synthetic,
                help="random M3-VL checkpoint in the real layout at full (or preset) width")
