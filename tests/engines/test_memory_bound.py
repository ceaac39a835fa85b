"""Converting one MoE layer to 8 ranks holds about one chunk, not the layer (issue 12, item 2).

The bound: the rank-weight conversion of a checkpoint's MoE layer (``stream_rank_weights``, the
build's streaming stage, TP8/EP8 as in ``b200x8-fp8``) peaks at no more than

    peak RSS <= baseline + 1.3 x (the layer's bytes as stored in the checkpoint)

where ``baseline`` is the peak of the same process after a first ``stream_rank_weights`` call that
converts no piece (Python, torch, the model on ``meta``, the shard headers, the eight ranks' open
writers: the fixed overhead the issue allows 2 GiB for) — measured, not assumed; the layer is then
converted by a second call into fresh files, and (bf16 only) then loaded whole in fp32. The layer
is 1024 wide with 32 experts x 1024 (214 MB in bf16, 110 MB in MXFP8), large against the conversion's chunk (2 M values,
:data:`m3_trt.model.pieces.CHUNK_ELEMS`) so the bound can only hold when the layer is not held
whole: reading it whole in fp32 (what the build did before, ``PieceModel.loaded``) is 2x (bf16) or
4x (MXFP8) the stored bytes — the negative control, which must break the same bound. Each run is
its own subprocess; peaks are its ``VmHWM`` (``ru_maxrss`` would include the parent's RSS at fork).
Weights are a tiled random block (memory and bytes are what is measured, not values).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from m3_trt.model import config as cfgmod
from m3_trt.model.checkpoint import SCALE_SUFFIX, original_layout, write_sharded
from m3_trt.model.modeling import M3ForConditionalGeneration
from m3_trt.model.pieces import PieceModel
from m3_trt.quant.quantize import is_quantized_key, quantize_mxfp8

BOUND = 1.3  # issue 12: peak <= 1.3 x the layer's stored bytes + a fixed overhead

CHILD = r"""
import sys
from pathlib import Path
import torch
from m3_trt.build.rank_weights import stream_rank_weights
from m3_trt.build.targets import load_target
from m3_trt.model.pieces import PieceModel
from m3_trt.model.shard import Layout
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
ckpt, work, mode = sys.argv[1:4]
pm = PieceModel(ckpt)
tgt = load_target("b200x8-fp8", {"onnx": False})
lay = Layout.of(tgt.tp, tgt.ep)
def convert(pieces, work):
    stream_rank_weights(pm, pm.cfg, tgt, lay, Path(work), list(range(lay.world)), "test", False, print, False,
                        {}, pieces=pieces)
convert([], work + "-none")
base = hwm()
convert(["layer.0"], work)
peak = hwm()
if mode == "whole":  # then the negative control: the layer materialized in fp32, as the build did before
    with pm.loaded("layer.0", torch.float32):
        pass
print(base, peak, hwm())
"""


def make_layer_ckpt(out: Path, fmt: str) -> Path:
    """One sparse-MoE layer 1024 wide (32 experts x 1024, 8 query / 2 KV heads), small vocab and vision."""
    cfg = cfgmod.tiny()
    text = replace(cfg.text, hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                   rotary_dim=64, index_head_dim=64, intermediate_size=1024, dense_intermediate_size=1024,
                   shared_intermediate_size=1024, num_local_experts=32, num_experts_per_tok=4, vocab_size=4096,
                   num_hidden_layers=1, layer_types=("minimax_m3_sparse",), mlp_layer_types=("sparse",))
    cfg = replace(cfg, text=text, projector_hidden_size=1024)
    with torch.device("meta"):
        meta = M3ForConditionalGeneration(cfg).state_dict()
    g = torch.Generator().manual_seed(0)
    block = torch.randn(1 << 20, generator=g) * 0.02  # tiled: drawing 107 M values would dominate the test
    codes, scales = quantize_mxfp8(block.reshape(-1, 32))

    def tile(t: torch.Tensor, n: int) -> torch.Tensor:
        return t.flatten().repeat(-(-n // t.numel()))[:n]

    def tensors():
        for k, t in original_layout(meta, 1):
            n = t.numel()
            if fmt == "mxfp8" and is_quantized_key(k, tuple(t.shape)):  # 32-value groups keep their exponent
                yield k, tile(codes, n).reshape(t.shape)
                yield k + SCALE_SUFFIX, tile(scales, n // 32).reshape(*t.shape[:-1], t.shape[-1] // 32)
            else:
                yield k, tile(block, n).reshape(t.shape).to(torch.bfloat16)

    out.mkdir(parents=True)
    write_sharded(tensors(), out, 1 << 30)
    cfg_dict = cfg.to_hf_dict()
    (out / "config.json").write_text(json.dumps(cfg_dict))
    return out


def _peaks_mib(ckpt: Path, work: Path, mode: str) -> tuple[float, float, float]:
    """VmHWM (MiB) of a child after converting no piece, after converting layer.0, and after then
    (``mode == "whole"``) loading the layer whole in fp32."""
    p = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(work), mode], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return tuple(int(x) / 1024 for x in p.stdout.split()[-3:])  # KiB


def _layer_stored_mib(ckpt: Path) -> float:
    files = PieceModel(ckpt).reader
    n = 0
    for e in files.entries["layer.0"]:
        for k in (e.key, e.scale_key):
            if k:
                _, _, _, begin, end = files.files.loc[k]
                n += end - begin
    return n / 2**20


def test_one_moe_layer_converts_within_1p3x_its_stored_bytes(tmp_path):
    results = {}
    for fmt in ("bf16", "mxfp8"):
        ck = make_layer_ckpt(tmp_path / fmt, fmt)
        stored = _layer_stored_mib(ck)
        base, peak, whole = _peaks_mib(ck, tmp_path / f"w-{fmt}", "whole" if fmt == "bf16" else "layer")
        results[fmt] = {"stored_MiB": round(stored, 1), "baseline_MiB": round(base, 1), "peak_MiB": round(peak, 1),
                        "bound_MiB": round(base + BOUND * stored, 1), "whole_fp32_MiB": round(whole, 1)}
        # the eight ranks' files hold the whole layer (cut, not copied: TP8/EP8; bf16 -> 1-byte codes)
        written = sum(f.stat().st_size for f in (tmp_path / f"w-{fmt}").rglob("*.partial"))
        assert written > (0.45 if fmt == "bf16" else 0.9) * stored * 2**20, (written, stored)
    print(json.dumps(results))
    assert results["bf16"]["stored_MiB"] > 200 and results["mxfp8"]["stored_MiB"] > 100, results
    for fmt in ("bf16", "mxfp8"):
        assert results[fmt]["peak_MiB"] <= results[fmt]["bound_MiB"], (fmt, results[fmt])
    # negative control: the layer held whole in fp32 (loaded after the conversion, in the same process)
    # breaks the same bound
    r = results["bf16"]
    assert r["whole_fp32_MiB"] > r["bound_MiB"], r
