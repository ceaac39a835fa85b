"""FP8 build of the tiny checkpoint: per-layer error report in the manifest, top-1 agreement with bf16."""

from __future__ import annotations

import copy
import json
import math

import torch

from tolerances import FP8_TOP1_AGREEMENT

from m3_trt.quant import fp8 as quant
from m3_trt.quant.encode import convert_shards_fp8
from m3_trt.build.builder import build
from m3_trt.model.modeling import M3ForConditionalGeneration
from m3_trt.build.targets import load_target


def _agreement(model, ref, prompts) -> float:
    hit = tot = 0
    with torch.no_grad():
        for ids in prompts:
            a, b = ref(ids)[0].argmax(-1), model(ids)[0].argmax(-1)
            hit, tot = hit + int((a == b).sum()), tot + a.numel()
    return hit / tot


def test_fp8_build_report_and_top1_agreement(tiny_ckpt, tmp_path):
    out = tmp_path / "fp8"
    m = build(tiny_ckpt, load_target("cpu", {"onnx": False, "weight_dtype": "fp8", "dtype": "bf16"}), out,
              progress=False)
    errs = m["quantization"]["layer_errors"]
    assert [e["layer"] for e in errs] == [0, 1, 2, 3]
    assert all(0 < e["isolated"] < 0.5 and math.isfinite(e["cumulative"]) for e in errs), errs
    assert json.loads((out / "build.json").read_text())["quantization"]["layer_errors"] == errs
    from safetensors import safe_open
    with safe_open(str(out / "rank0/weights.safetensors"), "pt") as f:
        assert f.get_tensor("model.language_model.layers.1.mlp.experts.gate_up_proj").dtype == torch.float8_e4m3fn

    ref = M3ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, ref.config.image_token_id, (1, 64), generator=g) for _ in range(16)]
    inputs = quant.calibration_inputs(tiny_ckpt)
    fp8 = copy.deepcopy(ref)
    quant.calibrate(fp8, inputs)
    agree = _agreement(fp8, ref, prompts)
    print(f"fp8 vs bf16 top-1 agreement: {agree:.3f}")
    assert agree >= FP8_TOP1_AGREEMENT
    # negative control: activation scales 64x too small saturate every input above amax/64
    bad = copy.deepcopy(ref)
    emu = quant.calibrate(bad, inputs)
    emu.amax = {k: v / 64 for k, v in emu.amax.items()}
    assert _agreement(bad, ref, prompts) < FP8_TOP1_AGREEMENT  # the gate catches a broken calibration


def test_weight_roundtrip_keeps_block_scales():
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    q, s = quant.quantize_weight(w, torch.full((2, 1), 0.01))
    q2, s2 = quant.quantize_weight(quant.dequantize_fp8(q, s), s)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8))
    qc, sc = quant.quantize_weight(w)
    assert sc.shape == (256, 1)
    rel = float((quant.dequantize_fp8(qc, sc) - w).norm() / w.norm())
    assert rel < 0.04  # E4M3 keeps 3 mantissa bits: ~2-3% relative rounding error


def test_streaming_shard_conversion_equals_quantize_weight(tmp_path):
    """convert_shards_fp8 (header first, rows streamed in chunks, 2 shards in parallel) is bit-identical
    to quantize_weight per tensor; 1-D / integer tensors are copied. Chunks of 1000 bytes force many
    chunks per tensor, including a partial last one and a zero row."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    shards = [{"a.weight": torch.randn(300, 70, generator=g).to(torch.bfloat16), "b.norm": torch.randn(70, generator=g),
               "c.experts": torch.randn(3, 40, 33, generator=g) * 5, "d.ids": torch.arange(7),
               "e.half": torch.randn(17, 9, generator=g).half()},
              {"z.weight": torch.randn(64, 64, generator=g)}]
    shards[0]["a.weight"][5] = 0
    (tmp_path / "src").mkdir()
    for i, sh in enumerate(shards):
        save_file(sh, str(tmp_path / "src" / f"m-{i}.safetensors"))
    stats = convert_shards_fp8(tmp_path / "src", tmp_path / "dst", chunk_bytes=1000)
    assert stats["largest_tensor_bytes"] == 300 * 70 * 2
    for i, sh in enumerate(shards):
        out = load_file(str(tmp_path / "dst" / f"m-{i}.safetensors"))
        for k, v in sh.items():
            if v.is_floating_point() and v.dim() >= 2:
                q, s = quant.quantize_weight(v)
                assert torch.equal(out[k].view(torch.uint8), q.view(torch.uint8)), k
                assert torch.equal(out[k + "_scale_inv"], s), k
                # negative control: one scale for the whole tensor gives different codes
                per_tensor = (v.float() / (v.float().abs().max() / 448)).to(torch.float8_e4m3fn)
                assert not torch.equal(out[k].view(torch.uint8), per_tensor.view(torch.uint8)), k
            else:
                assert torch.equal(out[k], v), k
        assert len(out) == len(sh) + sum(v.is_floating_point() and v.dim() >= 2 for v in sh.values())


def test_layerwise_calibration_equals_whole_model(tiny_ckpt):
    """calibrate_layerwise (one layer in memory, hidden states carried) gives today's whole-model
    scales and per-layer errors exactly. Negative control: two of the prompts alone give other scales."""
    from m3_trt.model.pieces import PieceModel

    inputs = quant.calibration_inputs(tiny_ckpt)
    ref = M3ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    q = copy.deepcopy(ref)
    whole = quant.calibrate(q, inputs)
    whole_errors = quant.layer_errors(ref, q, inputs)
    emu, errors = quant.calibrate_layerwise(PieceModel(tiny_ckpt), inputs, torch.bfloat16)
    assert emu.scales() == whole.scales()
    assert errors == whole_errors
    fewer, _ = quant.calibrate_layerwise(PieceModel(tiny_ckpt), inputs[:2], torch.bfloat16)
    assert fewer.scales() != whole.scales()


def test_fp8_build_without_tokenizer_calibrates_from_token_ids(tiny_ckpt, tmp_path):
    import shutil

    ck = shutil.copytree(tiny_ckpt, tmp_path / "notok")
    for f in ck.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            f.unlink()
    assert not quant.has_tokenizer(ck)
    m = build(ck, load_target("cpu", {"onnx": False, "weight_dtype": "fp8", "dtype": "bf16"}), tmp_path / "o",
              progress=False)
    rep = m["quantization"]
    assert "no tokenizer files" in rep["calib"] and rep["prompts"] == quant.TOKEN_ID_PROMPTS, rep["calib"]
    assert all(0 < e["isolated"] < 0.5 for e in rep["layer_errors"])
    bad = tmp_path / "calib.jsonl"
    bad.write_text(json.dumps({"text": "hello"}) + "\n")
    import pytest
    with pytest.raises(ValueError, match="no tokenizer files.*input_ids"):
        quant.calibration_inputs(ck, bad)
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"input_ids": [5, 6, 7, 8]}) + "\n")
    assert quant.calibration_inputs(ck, ids)[0]["input_ids"].tolist() == [[5, 6, 7, 8]]
