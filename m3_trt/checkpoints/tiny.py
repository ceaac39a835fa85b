"""The embedded default: a tiny random MiniMax-M3-VL checkpoint in the real on-disk layout.

``make_tiny(out, seed)`` writes sharded safetensors in the original MiniMax key layout (+ index),
a ``config.json`` transformers reads (mixed full/sparse attention, dense and MoE MLPs), a real
byte-level BPE tokenizer with the M3 special tokens, and the image/video processor configs. The
shapes (``m3_trt.model.config.tiny``) exercise every branch on a CPU budget: several key blocks per
prompt with top-k below the block count, 8 experts top-2, GQA 2.

Weights are random but shaped like a trained model's in the way accuracy comparisons depend on:
activations keep unit size through the layers, and the next-token distribution is peaked (each
LM-head row is aligned with the embedding of a fixed permutation of the vocabulary, plus noise,
so the top token usually stands clear of the rest). With a flat random LM head every top-1
comparison is a coin flip among near-tied tokens: an FP8-emulated forward then agrees with bf16
on ~0.79 of positions, against ~0.96 with this shaping (the rest are mostly MoE routing and
indexer block choices that flip under FP8 noise, which random experts turn into large errors).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from m3_trt.model import config as cfgmod
from m3_trt.model.checkpoint import original_layout, write_sharded
from m3_trt.model.modeling import M3ForConditionalGeneration
from m3_trt.checkpoints.tiny_tokenizer import write_tiny_tokenizer


def _init_weights(model: M3ForConditionalGeneration, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                std = 1.0
            elif "norm" in name or "layrnorm" in name:
                p.copy_((1.0 if "vision" in name and name.endswith("weight") else 0.0)
                        + 0.1 * torch.randn(p.shape, generator=g))
                continue
            elif name.endswith(".bias"):
                std = 0.02
            elif p.dim() >= 2:
                fan_in = p[0].numel() if p.dim() == 2 else p.shape[-1]
                if "embeddings.proj" in name:
                    fan_in = p[0].numel()
                std = 0.8 / fan_in ** 0.5
            else:
                std = 0.02
            p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
        # peaked next-token distribution: LM-head row j follows the embedding of token perm[j]
        emb = model.model.language_model.embed_tokens.weight
        perm = torch.randperm(emb.shape[0], generator=g)
        aligned = emb[perm] / emb[perm].norm(dim=-1, keepdim=True)
        noise = torch.randn(emb.shape, generator=g) / emb.shape[1] ** 0.5
        model.lm_head.weight.copy_(10.0 * aligned + 0.5 * noise)


def make_tiny(out: str | Path, seed: int = 0, max_shard_bytes: int = 256 * 1024) -> Path:
    """Write the tiny checkpoint to ``out`` (must not exist); written in a temp folder, then renamed."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ids = write_tiny_tokenizer(tmp)
        vocab = -(-ids["vocab_size"] // 64) * 64
        cfg = cfgmod.tiny(vocab_size=vocab, image_token_id=ids["image"], video_token_id=ids["video"],
                          bos_token_id=ids["bos"], eos_token_id=(ids["eos"],))
        model = M3ForConditionalGeneration(cfg)
        _init_weights(model, seed)
        state = model.state_dict()
        write_sharded(original_layout(state, cfg.text.num_hidden_layers), tmp, max_shard_bytes)
        hf = cfg.to_hf_dict()
        hf["text_config"]["pad_token_id"] = ids["pad"]
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
             "do_sample": False}, indent=2) + "\n")
        # mkdtemp creates 0700; a checkpoint is meant to be shared like any other folder
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
