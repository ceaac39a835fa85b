"""``m3-trt quantize``: bf16 -> MXFP8 / FP8 128x128 checkpoints that transformers 5.23 loads (CPU: dequantized)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tolerances import TOLERANCES, assert_close, rel_err

from m3_trt.model.checkpoint import SCALE_SUFFIX, SafetensorsCheckpoint, dequantize_fp8
from m3_trt.model.modeling import M3ForConditionalGeneration
from m3_trt.outputs import OutputError
from m3_trt.quant.fp8 import is_fp8_weight
from m3_trt.quant.quantize import QUANTIZERS, QuantizeError, quantize_checkpoint, quantize_fp8_block, quantize_mxfp8

FORMATS = ("mxfp8", "fp8-block")
IDS = torch.randint(0, 1000, (1, 60), generator=torch.Generator().manual_seed(0))  # 4 key blocks of 16, top-3


@pytest.fixture(scope="module")
def quantized(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {fmt: (quantize_checkpoint(tiny_ckpt, root / fmt, fmt=fmt), root / fmt) for fmt in FORMATS}


def _qdq(w2d: torch.Tensor, fmt: str) -> torch.Tensor:
    return dequantize_fp8(*QUANTIZERS[fmt](w2d), torch.float32)


def emulated(ckpt, fmt: str) -> M3ForConditionalGeneration:
    """The bf16 model with each on-disk FP8 tensor replaced by its quantize->dequantize value, computed
    here from the source weights: per original tensor (gate and up halves, each expert, separately)."""
    model = M3ForConditionalGeneration.from_pretrained(ckpt)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not is_fp8_weight(name, p):
                continue
            for sub in (p if p.dim() == 3 else p[None]):  # experts [E, rows, cols] one by one
                halves = sub.chunk(2, dim=0) if "gate_up_proj" in name else (sub,)
                for h in halves:
                    h.copy_(_qdq(h, fmt))
    return model


@pytest.fixture(scope="module")
def emulation(tiny_ckpt):
    """``fmt -> logits [1, S, V]`` of the emulated FP8 model on IDS (each built once)."""
    cache = {}

    def get(fmt):
        if fmt not in cache:
            with torch.no_grad():
                cache[fmt] = emulated(tiny_ckpt, fmt)(IDS)[0]
        return cache[fmt]

    return get


def _transformers(path):
    from transformers import MiniMaxM3SparseForConditionalGeneration

    hf, info = MiniMaxM3SparseForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # transformers keeps non-dequantized tensors in their stored dtype under a quantization_config
    return hf.float().eval()


@pytest.mark.parametrize("fmt", FORMATS)
def test_transformers_loads_and_matches_fp8_emulation(quantized, tiny_ckpt, emulation, fmt):
    """transformers (CPU: its FP8 loader dequantizes) == our dequantized load == our emulation, fp32."""
    _, out = quantized[fmt]
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["weight_block_size"] == ([1, 32] if fmt == "mxfp8" else [128, 128])
    hf = _transformers(out)
    ours = M3ForConditionalGeneration.from_pretrained(out)
    with torch.no_grad():
        ref = hf(input_ids=IDS).logits
        assert_close(ours(IDS)[0], ref, "parity_transformers", what=f"{fmt}: our dequantized load")
        assert_close(emulation(fmt), ref, "parity_transformers", what=f"{fmt}: our FP8 emulation")
        # the FP8 model is a different model from the bf16 one (so the match above is not vacuous)
        src = M3ForConditionalGeneration.from_pretrained(tiny_ckpt)(IDS)[0]
    assert rel_err(src, ref) > 1e-2


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_scale_is_detected(quantized, emulation, tmp_path, fmt):
    """Negative control: one scale one exponent off (x2) in one expert moves transformers' logits."""
    _, out = quantized[fmt]
    bad = shutil.copytree(out, tmp_path / "bad")
    key = "language_model.model.layers.1.block_sparse_moe.experts.0.w2.weight" + SCALE_SUFFIX
    shard = bad / json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"][key]
    state = load_file(shard)
    s = state[key]
    state[key] = s + 1 if s.dtype == torch.uint8 else s * 2  # E8M0: +1 on the exponent byte
    save_file(state, shard, metadata={"format": "pt"})
    with torch.no_grad():
        err = rel_err(emulation(fmt), _transformers(bad)(input_ids=IDS).logits)
    assert err > 100 * TOLERANCES[("parity_transformers", "fp32")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_which_tensors_are_fp8_and_the_error_report(quantized, tiny_ckpt, fmt):
    report, out = quantized[fmt]
    q, src = SafetensorsCheckpoint(out), SafetensorsCheckpoint(tiny_ckpt)
    fp8 = {k for k in q.keys() if q.get(k).dtype == torch.float8_e4m3fn}
    assert {k[: -len(SCALE_SUFFIX)] for k in q.keys() if k.endswith(SCALE_SUFFIX)} == fp8
    assert set(q.keys()) == set(src.keys()) | {k + SCALE_SUFFIX for k in fp8}
    assert all(k.startswith("language_model.model.layers.") for k in fp8)
    assert not any(".block_sparse_moe.gate." in k or "norm" in k for k in fp8)
    assert any(".experts.7.w3." in k for k in fp8) and any("shared_experts.down_proj" in k for k in fp8)
    for k in src.keys():  # everything else is carried bit for bit
        if k not in fp8:
            assert torch.equal(q.get(k), src.get(k)), k
    # the report's per-layer error, recomputed from the files
    err2 = ref2 = 0.0
    for k in fp8:
        if k.startswith("language_model.model.layers.1."):
            w = src.get(k).double()
            err2 += float((dequantize_fp8(q.get(k), q.get(k + SCALE_SUFFIX), torch.float64) - w).pow(2).sum())
            ref2 += float(w.pow(2).sum())
    row = next(r for r in report["layers"] if r["layer"] == "layer.1")
    assert row["rel_err"] == pytest.approx((err2 / ref2) ** 0.5, rel=1e-6)
    # E4M3 keeps 3 mantissa bits: a few percent, never more than 2^-4 relative
    assert all(0.005 < r["rel_err"] < 0.0625 for r in report["layers"])


def test_scales_are_the_tightest_that_do_not_saturate():
    """MXFP8: the smallest power-of-two scale that keeps each block's max <= 448; 128x128: max at 448."""
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 2, 384)
    codes, e8 = quantize_mxfp8(w)
    top = codes.float().abs().reshape(256, 12, 32).amax(-1)
    assert e8.dtype == torch.uint8 and e8.shape == (256, 12)
    assert bool(((top >= 224) & (top <= 448)).all())  # 224 < amax/scale, which may round down to 224
    amax = w.abs().reshape(256, 12, 32).amax(-1)
    assert bool((amax / (e8.float() - 128).exp2() > 448).all())  # one exponent less would saturate
    codes, s = quantize_fp8_block(w)
    assert s.shape == (2, 3) and bool((codes.float().abs().reshape(2, 128, 3, 128).amax((1, 3)) == 448).all())
    with pytest.raises(QuantizeError, match=r"w_odd: dimension 200 of shape \(200, 64\)"):
        quantize_fp8_block(torch.zeros(200, 64), "w_odd")


def test_refusals(quantized, tiny_ckpt, tmp_path):
    _, out = quantized["mxfp8"]
    with pytest.raises(QuantizeError, match="already has a quantization_config"):
        quantize_checkpoint(out, tmp_path / "again", fmt="fp8-block")
    with pytest.raises(OutputError, match="is inside the input"):
        quantize_checkpoint(tiny_ckpt, tiny_ckpt / "q", fmt="mxfp8")
    assert not (tiny_ckpt / "q").exists()
    bad = tmp_path / "bad.jsonl"  # a bad --calib line is named before any conversion work
    bad.write_text(json.dumps({"text": "ok"}) + "\nnot json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object"):
        quantize_checkpoint(tiny_ckpt, tmp_path / "x", fmt="mxfp8", calib=bad)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.partial*"))
    with pytest.raises(QuantizeError, match="--calib .*missing.jsonl: no such file"):
        quantize_checkpoint(tiny_ckpt, tmp_path / "x", fmt="mxfp8", calib=tmp_path / "missing.jsonl")


@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_loader_would_convert_exactly_the_fp8_modules(quantized, fmt):
    """On a GPU transformers swaps Linears for FP8 ones unless ``modules_to_not_convert`` matches: with
    our list (after its own renaming) it converts exactly the modules whose weights are FP8 on disk."""
    from transformers import MiniMaxM3SparseForConditionalGeneration, MiniMaxM3VLConfig
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING
    from transformers.quantizers.quantizers_utils import should_convert_module

    _, out = quantized[fmt]
    cfg = MiniMaxM3VLConfig.from_pretrained(out)
    qc = dict(cfg.quantization_config)
    quantizer = AUTO_QUANTIZER_MAPPING[qc["quant_method"]](AUTO_QUANTIZATION_CONFIG_MAPPING[qc["quant_method"]](**qc))
    cfg.quantization_config = None
    with torch.device("meta"):
        model = MiniMaxM3SparseForConditionalGeneration(cfg)
    quantizer._normalize_modules_to_not_convert(model)
    skip = quantizer.quantization_config.modules_to_not_convert
    converted = {n for n, m in model.named_modules()
                 if (type(m) is torch.nn.Linear or n.endswith(".mlp.experts")) and should_convert_module(n, skip)}
    fp8 = {k for k in SafetensorsCheckpoint(out).keys() if k.endswith(SCALE_SUFFIX)}
    # our FP8 keys in transformers' module names: fused experts and gate||up pairs collapse to one module
    expect = set()
    for k in fp8:
        n = k.replace("language_model.model.", "model.language_model.").removesuffix(".weight" + SCALE_SUFFIX)
        n = n.replace("block_sparse_moe.", "mlp.").replace("self_attn.index_", "self_attn.indexer.")
        n = n.rsplit(".experts.", 1)[0] + ".experts" if ".experts." in n else n
        expect.add(re.sub(r"\.(gate|up)_proj$", ".gate_up_proj", n))
    assert converted == expect, (sorted(converted ^ expect)[:6])
    # negative control: bare original prefixes leave the vision tower's Linears to be converted
    assert not should_convert_module("model.vision_tower.layers.0.mlp.fc1", skip)
    assert should_convert_module("model.vision_tower.layers.0.mlp.fc1", ["vision_tower"])


def test_calib_adds_layer_output_errors_and_changes_no_byte(quantized, tiny_ckpt, tmp_path):
    """``m3-trt quantize --calib FILE``: the checkpoint is byte-identical to the one without (so the
    transformers parity above holds for it), and the report's per-layer output errors — streamed,
    one layer in memory — equal the whole-model computation (:func:`layer_errors`: our dequantized
    load of OUT vs the source, fp32) on the same prompts. Negative control: the shared expert's
    scales of layer 1 three exponents off raise that layer's isolated error over five-fold, and not layer 0's."""
    from m3_trt.cli.main import main
    from m3_trt.quant.fp8 import calibration_inputs, layer_errors
    from m3_trt.quant.quantize import output_errors

    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("Name three rivers.", "Count to five.")))
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_ckpt), str(out), "--format", "mxfp8", "--calib", str(calib)]) == 0
    _, plain = quantized["mxfp8"]
    for f in sorted(plain.glob("*.safetensors")):
        assert f.read_bytes() == (out / f.name).read_bytes(), f.name
    rep = json.loads((out / "quantize_report.json").read_text())["output_errors"]
    assert rep["prompts"] == 2 and rep["calib"] == str(calib)
    inputs = calibration_inputs(tiny_ckpt, calib)
    with torch.no_grad():
        want = layer_errors(M3ForConditionalGeneration.from_pretrained(tiny_ckpt),
                            M3ForConditionalGeneration.from_pretrained(out), inputs)
    assert [r["layer"] for r in rep["layers"]] == [0, 1, 2, 3]
    for got, ref in zip(rep["layers"], want):
        assert got["isolated"] == pytest.approx(ref["isolated"], rel=1e-4), (got, ref)
        assert got["cumulative"] == pytest.approx(ref["cumulative"], rel=1e-4), (got, ref)
        assert 1e-3 < got["isolated"] < 0.2
    # negative control: a wrong scale in layer 1
    bad = shutil.copytree(out, tmp_path / "bad")
    key = "language_model.model.layers.1.block_sparse_moe.shared_experts.down_proj.weight" + SCALE_SUFFIX
    shard = bad / json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"][key]
    state = load_file(shard)
    state[key] = state[key] + 3  # E8M0: x8 (the shared expert sees every token)
    save_file(state, shard, metadata={"format": "pt"})
    worse = output_errors(tiny_ckpt, bad, calib)["layers"]
    assert worse[1]["isolated"] > 5 * rep["layers"][1]["isolated"]
    assert worse[0]["isolated"] == pytest.approx(rep["layers"][0]["isolated"], rel=1e-9)
