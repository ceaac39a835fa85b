"""The ``m3-trt`` command line: thin commands over the library.

Each command is a function with explicit keyword options; it prints its resolved configuration
before long work. Commands whose libraries are optional import them lazily.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from m3_trt.model.params import param_counts


def cmd_make_tiny(*, out: Path, seed: int) -> int:
    from m3_trt.checkpoints.tiny import make_tiny

    print(f"make-tiny: out={out} seed={seed}")
    path = make_tiny(out, seed=seed)
    print(f"wrote {path}")
    return 0


def cmd_info(*, ckpt: Path) -> int:
    from m3_trt.model.config import M3Config

    cfg = M3Config.from_pretrained(ckpt)
    t, v = cfg.text, cfg.vision
    print(f"checkpoint: {ckpt}")
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


def cmd_generate(*, ckpt: Path, prompt: str, images: list[Path], max_tokens: int, kernels: str) -> int:
    from m3_trt.model.generate import generate
    from m3_trt.model.modeling import M3ForConditionalGeneration
    from m3_trt.processing import M3Processor

    print(f"generate: ckpt={ckpt} kernels={kernels} max_tokens={max_tokens} images={[str(i) for i in images]}")
    proc = M3Processor.from_pretrained(ckpt)
    model = M3ForConditionalGeneration.from_pretrained(ckpt, kernels=kernels)
    pics = [proc.decode_image(p.read_bytes()) for p in images]
    content = [{"type": "image"} for _ in pics] + [{"type": "text", "text": prompt}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    enc = proc(text, images=pics or None)
    dec = proc.incremental_decoder()
    eos = model.config.text.eos_token_id
    toks = []
    for tok in generate(model, enc["input_ids"], pixel_values=enc.get("pixel_values"),
                        image_grid_thw=enc.get("image_grid_thw"), max_new_tokens=max_tokens, eos_token_id=eos):
        toks.append(tok)
        sys.stdout.write(dec.push(tok))
        sys.stdout.flush()
    print()
    print(json.dumps({"prompt_tokens": int(enc["input_ids"].shape[1]), "tokens": toks, "text": proc.decode(toks)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3-trt", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-tiny", help="write the embedded tiny random M3-VL checkpoint")
    s.add_argument("out", type=Path)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=lambda a: cmd_make_tiny(out=a.out, seed=a.seed))

    s = sub.add_parser("info", help="print a checkpoint's config and parameter counts")
    s.add_argument("ckpt", type=Path)
    s.set_defaults(fn=lambda a: cmd_info(ckpt=a.ckpt))

    s = sub.add_parser("generate", help="generate text in-process with the torch reference")
    s.add_argument("ckpt", type=Path)
    s.add_argument("--prompt", required=True)
    s.add_argument("--image", type=Path, action="append", default=[])
    s.add_argument("--max-tokens", type=int, default=16)
    s.add_argument("--kernels", choices=("reference", "torch", "triton"), default="torch")
    s.set_defaults(fn=lambda a: cmd_generate(ckpt=a.ckpt, prompt=a.prompt, images=a.image,
                                             max_tokens=a.max_tokens, kernels=a.kernels))

    s = sub.add_parser("demo", help="run the whole product on the embedded tiny checkpoint")
    s.add_argument("--workdir", type=Path, default=Path("artifacts/demo"))
    s.add_argument("--prompt", default="Describe the picture.")
    s.add_argument("--max-tokens", type=int, default=12)
    s.set_defaults(fn=lambda a: __import__("m3_trt.cli.demo", fromlist=["run_demo"]).run_demo(
        a.workdir, prompt=a.prompt, max_tokens=a.max_tokens))

    for register in _extension_registrars():
        register(sub)
    return p


def _extension_registrars():
    """Commands that live beside their libraries (export, engines, serving, compare)."""
    import importlib

    for mod, fn in (("m3_trt.export.cli", "register"), ("m3_trt.build.cli", "register"),
                    ("m3_trt.serving.cli", "register"), ("m3_trt.compare.cli", "register"),
                    ("m3_trt.checkpoints.synthetic", "register"), ("m3_trt.quant.quantize", "register")):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):
                continue  # that part of the product is not installed in this tree
            raise
        if hasattr(m, fn):
            yield getattr(m, fn)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as e:
        print(f"m3-trt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
