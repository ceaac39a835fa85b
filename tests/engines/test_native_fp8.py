"""Native FP8 stays native: an MXFP8 checkpoint's E4M3 codes and E8M0 scales reach an FP8 build's
rank file bit for bit, and the build reports a weight error of 0 against the checkpoint's own
dequantized weights. Negative control: one flipped bit in the checkpoint's codes is caught."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from m3_trt.build.builder import build
from m3_trt.model.checkpoint import _place, map_key
from m3_trt.build.targets import load_target

_LAYER_LINEAR = re.compile(r"^language_model\.model\.layers\.\d+\..*(proj|w[123])\.weight$")


def _mxfp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes + E8M0 exponents per [1, 32] block (the MXFP8 layout)."""
    blocks = w.float().reshape(w.shape[0], -1, 32)
    e = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp_min(2.0 ** -100) / 448)).clamp(-127, 127)
    q = (blocks / (2.0 ** e)[..., None]).reshape(w.shape).to(torch.float8_e4m3fn)
    return q, (e + 127).to(torch.uint8)


def make_mxfp8(src: Path, dst: Path) -> list[str]:
    """Copy of ``src`` with every decoder-layer projection / expert weight stored MXFP8; returns their keys."""
    shutil.copytree(src, dst)
    index_file = dst / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    done = []
    for shard in sorted(set(index["weight_map"].values())):
        state = load_file(str(dst / shard))
        for k in list(state):
            if _LAYER_LINEAR.match(k) and state[k].dim() == 2 and state[k].shape[1] % 32 == 0:
                state[k], state[k + "_scale_inv"] = _mxfp8(state[k])
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
        target, place, expert = map_key(k)
        code_view, _ = _place(ours[target].view(torch.uint8), place, expert)
        if not torch.equal(code_view, src[k].view(torch.uint8)):
            return False
        if scales[target + "_scale_inv"].dtype == torch.uint8:
            scale_view, _ = _place(scales[target + "_scale_inv"], place, expert)
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
