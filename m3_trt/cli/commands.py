"""``m3-trt make-tiny``, ``info`` and ``generate``: the commands over the model itself.

Each command is one options dataclass (``m3_trt.options``) and one function taking it; it prints
its resolved configuration before long work.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from m3_trt.checkpoints.tiny import make_tiny
from m3_trt.model.config import M3Config
from m3_trt.model.generate import generate
from m3_trt.model.modeling import M3ForConditionalGeneration
from m3_trt.model.params import param_counts
from m3_trt.options import add_command, opt
from m3_trt.processing import M3Processor


@dataclass(frozen=True, kw_only=True)
class MakeTinyOptions:
    out: Path = field(metadata=opt())
    seed: int = field(default=0, metadata=opt("--seed"))


@dataclass(frozen=True, kw_only=True)
class InfoOptions:
    ckpt: Path = field(metadata=opt())


@dataclass(frozen=True, kw_only=True)
class GenerateOptions:
    ckpt: Path = field(metadata=opt())
    prompt: str = field(metadata=opt("--prompt"))
    image: list[Path] = field(default_factory=list, metadata=opt("--image"))
    max_tokens: int = field(default=16, metadata=opt("--max-tokens"))
    kernels: str = field(default="torch", metadata=opt("--kernels", choices=("reference", "torch", "triton")))


def cmd_make_tiny(o: MakeTinyOptions) -> int:
    print(f"make-tiny: out={o.out} seed={o.seed}")
    path = make_tiny(o.out, seed=o.seed)
    print(f"wrote {path}")
    return 0


def cmd_info(o: InfoOptions) -> int:
    cfg = M3Config.from_pretrained(o.ckpt)
    t, v = cfg.text, cfg.vision
    print(f"checkpoint: {o.ckpt}")
    print(f"text: hidden {t.hidden_size}, {t.num_hidden_layers} layers, heads {t.num_attention_heads}/"
          f"{t.num_key_value_heads} kv, head_dim {t.head_dim} (rope on {t.rotary_dim}, theta {t.rope_theta:g}), "
          f"vocab {t.vocab_size}")
    variants: dict[str, list[int]] = {}
    for i in range(t.num_hidden_layers):
        variants.setdefault(t.layer_variant(i), []).append(i)
    for name, layers in variants.items():
        print(f"  {name:13s} {len(layers):3d} layers: {layers}")
    print(f"moe: {t.num_local_experts} experts top-{t.num_experts_per_tok}, inter {t.intermediate_size}, "
          f"shared {t.shared_intermediate_size}, scale {t.routed_scaling_factor}, swiglu alpha {t.swiglu_alpha} "
          f"limit {t.swiglu_limit}")
    if t.has_sparse_layers:
        print(f"indexer: {t.index_n_heads} heads x {t.index_head_dim}, block {t.index_block_size}, "
              f"top-{t.index_topk_blocks}, local {t.index_local_blocks}")
    print(f"vision: hidden {v.hidden_size}, {v.num_hidden_layers} layers, {v.num_attention_heads} heads, patch "
          f"{v.temporal_patch_size}x{v.patch_size}x{v.patch_size}, merge {v.spatial_merge_size}; "
          f"image token {cfg.image_token_id}, video token {cfg.video_token_id}")
    for k, n in param_counts(cfg).items():
        print(f"params {k:17s} {n:>16,d}")
    return 0


def cmd_generate(o: GenerateOptions) -> int:
    print(f"generate: ckpt={o.ckpt} kernels={o.kernels} max_tokens={o.max_tokens} images={[str(i) for i in o.image]}")
    proc = M3Processor.from_pretrained(o.ckpt)
    model = M3ForConditionalGeneration.from_pretrained(o.ckpt, kernels=o.kernels)
    enc = proc.encode_chat(o.prompt, [proc.decode_image(p.read_bytes()) for p in o.image])
    dec = proc.incremental_decoder()
    eos = model.config.text.eos_token_id
    toks = []
    for tok in generate(model, enc["input_ids"], pixel_values=enc.get("pixel_values"),
                        image_grid_thw=enc.get("image_grid_thw"), max_new_tokens=o.max_tokens, eos_token_id=eos):
        toks.append(tok)
        sys.stdout.write(dec.push(tok))
        sys.stdout.flush()
    print()
    print(json.dumps({"prompt_tokens": int(enc["input_ids"].shape[1]), "tokens": toks, "text": proc.decode(toks)}))
    return 0


def register(sub) -> None:
    """Add ``make-tiny``, ``info`` and ``generate`` to the ``m3-trt`` command line."""
    add_command(sub, "make-tiny", MakeTinyOptions, cmd_make_tiny,
                help="write the embedded tiny random M3-VL checkpoint")
    add_command(sub, "info", InfoOptions, cmd_info, help="print a checkpoint's config and parameter counts")
    add_command(sub, "generate", GenerateOptions, cmd_generate,
                help="generate text in-process with the torch reference")
