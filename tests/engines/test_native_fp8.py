"""Native FP8 stays native: an FP8 checkpoint's E4M3 codes and scales reach an FP8 build's rank
files bit for bit — one rank, and sharded (TP rows/cols and EP experts cut along the scale blocks;
a split that cuts a block is re-blocked and named in the report) — and every rank, read back with
``load_rank``, has exactly the checkpoint's dequantized weights (relative error 0, which the build
also reports). (A bf16 checkpoint's sharded FP8 build reading back as the per-channel reference is
checked in ``test_streaming.py``'s workers test, on the build it already makes.)

Negative controls: one flipped bit in the checkpoint's codes is caught; a rank compared against
another rank's slice of the checkpoint differs; a re-blocked tensor's checkpoint-sized block
would not tile the rank's slice."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from m3_trt.build import rank_weights
from m3_trt.build.builder import build
from m3_trt.build.slicing import take_scales
from m3_trt.build.targets import load_target
from m3_trt.model.checkpoint import map_key, place
from m3_trt.model.modeling import M3ForConditionalGeneration
from m3_trt.model.shard import Layout, shard_state
from m3_trt.quant.fp8 import dequantize_fp8, is_fp8_weight, quantize_weight
from m3_trt.quant.quantize import quantize_fp8_block
from m3_trt.runtime.load import load_rank

_LAYER_LINEAR = re.compile(r"^language_model\.model\.layers\.\d+\..*(proj|w[123])\.weight$")


def _mxfp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes + E8M0 exponents per [1, 32] block (the MXFP8 layout)."""
    blocks = w.float().reshape(w.shape[0], -1, 32)
    e = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp_min(2.0 ** -100) / 448)).clamp(-127, 127)
    q = (blocks / (2.0 ** e)[..., None]).reshape(w.shape).to(torch.float8_e4m3fn)
    return q, (e + 127).to(torch.uint8)


def make_mxfp8(src: Path, dst: Path, quantize=_mxfp8) -> list[str]:
    """Copy of ``src`` with every decoder-layer projection / expert weight stored MXFP8 (or with
    ``quantize``'s format); returns their keys."""
    shutil.copytree(src, dst)
    index_file = dst / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    done = []
    for shard in sorted(set(index["weight_map"].values())):
        state = load_file(str(dst / shard))
        for k in list(state):
            if _LAYER_LINEAR.match(k) and state[k].dim() == 2 and state[k].shape[1] % 32 == 0:
                state[k], state[k + "_scale_inv"] = quantize(state[k])
                index["weight_map"][k + "_scale_inv"] = shard
                done.append(k)
        save_file(state, str(dst / shard), metadata={"format": "pt"})
    index_file.write_text(json.dumps(index, indent=2))
    return done


def _codes_match(build_dir: Path, ckpt: Path, keys: list[str], flip: str | None = None) -> bool:
    """Every FP8 key's codes and scales equal in the rank files; ``flip``: first flip one bit of that
    key's checkpoint codes (the negative control)."""
    with safe_open(str(build_dir / "rank0/weights.safetensors"), "pt") as fw, \
            safe_open(str(build_dir / "rank0/fp8_scales.safetensors"), "pt") as fs:
        ours = {k: fw.get_tensor(k) for k in fw.keys()}
        scales = {k: fs.get_tensor(k) for k in fs.keys()}
    src = {}
    for shard in {p.name for p in ckpt.glob("*.safetensors")}:
        src.update(load_file(str(ckpt / shard)))
    if flip:
        src[flip] = src[flip].clone()
        src[flip].view(torch.uint8)[0, 0] ^= 1
    for k in keys:
        target, how, expert = map_key(k)
        code_view, _ = place(ours[target].view(torch.uint8), how, expert)
        if not torch.equal(code_view, src[k].view(torch.uint8)):
            return False
        if scales[target + "_scale_inv"].dtype == torch.uint8:
            scale_view, _ = place(scales[target + "_scale_inv"], how, expert)
            if not torch.equal(scale_view, src[k + "_scale_inv"]):
                return False
        else:
            return False
    return True


def test_mxfp8_codes_and_scales_reach_the_rank_file_bit_identical(tiny_ckpt, tmp_path):
    ck = tmp_path / "mx"
    keys = make_mxfp8(tiny_ckpt, ck)
    assert len(keys) > 40, len(keys)  # attention, indexer, dense MLP, every expert's w1/w2/w3, shared
    tgt = load_target("cpu", {"onnx": False, "weight_dtype": "fp8", "dtype": "bf16"})
    m = build(ck, tgt, tmp_path / "native", progress=False)
    nat = m["quantization"]["native_fp8"]
    assert nat["tensors"] > 10 and nat["max_rel_weight_error"] == 0.0, nat
    assert _codes_match(tmp_path / "native", ck, keys)
    # negative control: one flipped bit in one expert's checkpoint codes is seen
    assert not _codes_match(tmp_path / "native", ck, keys, flip=next(k for k in keys if ".experts.5.w2" in k))


SHARDED = {"onnx": False, "weight_dtype": "fp8", "dtype": "bf16", "tp": 2, "ep": 2}


def _rank_errors(build_dir: Path, ref_state: dict, lay: Layout, cfg, ref_rank=None) -> dict[str, float]:
    """Per rank and FP8 weight: relative error of ``load_rank``'s weight against ``ref_state`` cut to
    the rank (``ref_rank``: cut to that rank instead, the negative control)."""
    out = {}
    for r in range(lay.world):
        got = load_rank(build_dir, r).state_dict()
        want = shard_state(ref_state, cfg.text, lay, r if ref_rank is None else ref_rank)
        for k, w in want.items():
            if is_fp8_weight(k, w):
                w = w.to(got[k].dtype).float()
                out[f"rank{r}:{k}"] = float((got[k].float() - w).norm() / w.norm())
    return out


def _expected_mx_reblocked(cfg, lay: Layout) -> set[str]:
    """Independently of the build: the FP8 weights whose rank slice cuts MXFP8's [1, 32] blocks —
    rows never (one-row blocks); columns when a rank's equal share of them is not a multiple of 32."""
    with torch.device("meta"):
        meta = M3ForConditionalGeneration(cfg).state_dict()
    out = set()
    for r in range(lay.world):
        for k, t in shard_state(meta, cfg.text, lay, r).items():
            if is_fp8_weight(k, t) and t.shape[-1] != meta[k].shape[-1] and t.shape[-1] % 32:
                out.add(k)
    return out


def test_sharded_mxfp8_build_keeps_codes_and_scales_per_rank(tiny_ckpt, tmp_path, monkeypatch):
    ck = tmp_path / "mx"
    keys = make_mxfp8(tiny_ckpt, ck)
    m = build(ck, load_target("cpu", SHARDED), tmp_path / "tp2", progress=False)
    nat = m["quantization"]["native_fp8"]
    ref = M3ForConditionalGeneration.from_pretrained(ck, dtype=torch.float32)  # the checkpoint dequantized
    lay, cfg = Layout.of(2, 2), ref.config
    errs = _rank_errors(tmp_path / "tp2", ref.state_dict(), lay, cfg)
    assert len(errs) > 40 and max(errs.values()) == 0.0, sorted(errs.items(), key=lambda kv: -kv[1])[:3]
    assert nat["tensors"] == len({k.split(":", 1)[1] for k in errs}) and nat["max_rel_weight_error"] == 0.0, nat
    # the re-blocked tensors are exactly those whose split cuts a [1, 32] block (dense and shared down_proj
    # columns: 96/2 = 48, 32/2 = 16), each named with the finer block its ranks got
    want = _expected_mx_reblocked(cfg, lay)
    assert want and set(nat["reblocked"]) == want, (sorted(nat["reblocked"]), sorted(want))
    assert all(v["checkpoint_block"] == [1, 32] and v["rank_blocks"] == [[1, 16]] for v in nat["reblocked"].values())
    # aligned tensors: each rank's codes and E8M0 bytes are the checkpoint's own (rank 1 holds experts 4-7)
    with safe_open(str(tmp_path / "tp2/rank1/weights.safetensors"), "pt") as fw, \
            safe_open(str(tmp_path / "tp2/rank1/fp8_scales.safetensors"), "pt") as fs:
        name = "model.language_model.layers.1.mlp.experts.down_proj"
        codes, scales = fw.get_tensor(name), fs.get_tensor(name + "_scale_inv")
    src = {}
    for shard in ck.glob("*.safetensors"):
        src.update(load_file(str(shard)))
    key = "language_model.model.layers.1.block_sparse_moe.experts.5.w2.weight"
    assert key in keys and scales.dtype == torch.uint8
    assert torch.equal(codes[1].view(torch.uint8), src[key].view(torch.uint8))
    assert torch.equal(scales[1], src[key + "_scale_inv"])
    # negative control: every rank against the other rank's slice differs
    wrong = _rank_errors(tmp_path / "tp2", ref.state_dict(), lay, cfg, ref_rank=0)
    assert max(wrong.values()) > 0.1
    # negative control for the build's own error report: scales one exponent off are measured as an error
    def off_by_one(*args):
        s, blk = take_scales(*args)
        return (None if s is None else s + 1), blk
    monkeypatch.setattr(rank_weights, "take_scales", off_by_one)
    m = build(ck, load_target("cpu", SHARDED), tmp_path / "off", progress=False)
    assert m["quantization"]["native_fp8"]["max_rel_weight_error"] > 0.5


def test_sharded_fp8_block_checkpoint_reblocks_and_stays_exact(tiny_ckpt, tmp_path):
    """128x128 float32 blocks: at this width every dimension is one block, so every TP split cuts
    blocks; the ranks still read back the checkpoint's dequantized weights exactly."""
    ck = tmp_path / "blk"
    make_mxfp8(tiny_ckpt, ck, quantize=lambda w: quantize_fp8_block(w.float()))
    m = build(ck, load_target("cpu", SHARDED), tmp_path / "tp2", progress=False)
    nat = m["quantization"]["native_fp8"]
    ref = M3ForConditionalGeneration.from_pretrained(ck, dtype=torch.float32)
    errs = _rank_errors(tmp_path / "tp2", ref.state_dict(), Layout.of(2, 2), ref.config)
    assert max(errs.values()) == 0.0 and nat["max_rel_weight_error"] == 0.0
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    # q rows 64 = one 64x64 block; each rank's 32 rows get 32x64 blocks, each with its parent's scale
    assert nat["reblocked"][q] == {"checkpoint_block": [64, 64], "rank_blocks": [[32, 64]]}, nat["reblocked"].get(q)
    with safe_open(str(tmp_path / "tp2/rank0/fp8_scales.safetensors"), "pt") as fs:
        s = fs.get_tensor(q + "_scale_inv")
    assert s.dtype == torch.float32 and s.shape == (1, 1)
    # negative control: re-deriving the rank's scales (per channel, what sharded builds did before) is
    # an error the same metric sees
    want = shard_state(ref.state_dict(), ref.config.text, Layout.of(2, 2), 0)[q]
    requant = dequantize_fp8(*quantize_weight(want.to(torch.bfloat16)), torch.float32)
    assert float((requant - want).norm() / want.norm()) > 1e-3
