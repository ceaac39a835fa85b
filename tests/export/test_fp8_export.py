"""FP8 export: E4M3 weights and calibrated activation scales as Q/DQ pairs; ONNX Runtime runs the
graphs exactly like the torch FP8 model, TensorRT-RTX builds them with Q/DQ layers."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import onnx
import pytest
import torch
from tolerances import FP8_VS_FP32_TOP1_RANDOM_IDS, TOLERANCES


@pytest.fixture(scope="module")
def fp8_export(tiny_ckpt, tmp_path_factory):
    """``export --quant fp8`` of the bf16 tiny checkpoint: streamed (loading the whole model fails)."""
    from m3_trt.export.onnx import export_model
    from m3_trt.model.modeling import M3ForConditionalGeneration

    def no_whole(*a, **k):
        raise AssertionError("the whole model was loaded")

    out = tmp_path_factory.mktemp("fp8") / "tiny-fp8"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M3ForConditionalGeneration, "from_pretrained", classmethod(no_whole))
        return export_model(tiny_ckpt, out, plugins="none", quant="fp8", max_seq_len=64, verify=True, progress=None)


def test_graphs_carry_e4m3_qdq_and_match_torch_fp8_model(fp8_export):
    manifest = json.loads((fp8_export / "manifest.json").read_text())
    assert manifest["quant"] == "fp8" and manifest["quantization"]["scheme"] == "fp8-e4m3"
    assert manifest["opset"] == 20 and "per output channel" in manifest["quantization"]["weights"]
    assert "layer by layer" in manifest["quantization"]["calibration"]
    v = manifest["verify"]
    assert v["ok"] and v["tolerance"] == TOLERANCES[("onnx_component", "fp32")]
    g = onnx.load(str(fp8_export / "decoder_full_dense.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    # q, k, v, o, gate_up, down: six activation Q/DQ pairs and six weight DQs
    assert ops.count("QuantizeLinear") == 6 and ops.count("DequantizeLinear") == 12
    fp8_inits = [i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN and i.dims]
    assert len(fp8_inits) == 6 and all(n.endswith("weight_e4m3") for n in fp8_inits)
    moe = onnx.load(str(fp8_export / "decoder_sparse_moe.onnx"), load_external_data=False).graph
    assert {"layer.mlp.experts.gate_up_proj_e4m3", "layer.mlp.experts.down_proj_e4m3"} <= {
        i.name for i in moe.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    # the router stays high precision
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in moe.initializer if i.name == "layer.mlp.gate.weight")


def test_fp8_logits_are_quantized_not_fp32(fp8_export, tiny_ckpt):
    """The FP8 chain differs from the fp32 reference by an FP8-sized error, and agrees on top-1 mostly."""
    from m3_trt.export.onnx.runtime import OnnxModel
    from m3_trt.model.modeling import M3ForConditionalGeneration

    ref = M3ForConditionalGeneration.from_pretrained(tiny_ckpt)
    ids = torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids)[0].numpy()
    m = OnnxModel(fp8_export)
    got = m.forward(ids.numpy(), m.new_cache(1), 0)
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert 1e-3 < rel < 0.5, rel  # really quantized, and not broken
    assert float((got.argmax(-1) == want.argmax(-1)).mean()) >= FP8_VS_FP32_TOP1_RANDOM_IDS


@pytest.mark.trt
def test_tensorrt_builds_fp8_qdq(fp8_export):
    from m3_trt.export.tensorrt import trt_available, trt_unavailable_reason
    from m3_trt.export.tensorrt_build import build_engines

    if not trt_available():
        pytest.skip(trt_unavailable_reason())
    reports = build_engines(fp8_export, only=["layer_0", "layer_1"], progress=None)
    for name in ("layer_0", "layer_1"):
        r = reports[name]
        assert r["ok"], r["error"]
        assert r["layer_types"].get("QUANTIZE", 0) >= 4 and r["layer_types"].get("DEQUANTIZE", 0) >= 8


# -- one-rank FP8 builds: the ONNX weights are the rank files' codes and scales, streamed ------------

def _onnx_fp8_weights(export_dir, layer: int) -> dict[str, tuple[bytes, np.ndarray]]:
    """``{full weight name: (E4M3 code bytes, fp32 graph scale)}`` of one decoder layer's ONNX weights."""
    from onnx import numpy_helper

    from m3_trt.export.onnx.runtime import layer_model

    manifest = json.loads((export_dir / "manifest.json").read_text())
    comp = next(c for c in manifest["components"] if str(layer) in c.get("layers", {}))
    inits = {i.name: i for i in layer_model(export_dir, comp["file"], comp["layers"][str(layer)]).graph.initializer}
    out = {}
    for name, init in inits.items():
        if init.data_type != onnx.TensorProto.FLOAT8E4M3FN or not init.dims:
            continue
        base = name.removesuffix("_e4m3")
        scale = numpy_helper.to_array(inits[base + "_scale"])
        full = f"model.language_model.layers.{layer}." + base.removeprefix("layer.")
        out[full] = (init.raw_data, scale)
    return out


def _mixed_checkpoint(tiny_ckpt, quantize_checkpoint, root):
    """The tiny checkpoint with decoder layers 0-1 stored MXFP8 (``m3-trt quantize``) and 2-3 bf16."""
    from safetensors.torch import load_file, save_file

    from m3_trt.model.checkpoint import SafetensorsCheckpoint

    quantize_checkpoint(tiny_ckpt, root / "mx", fmt="mxfp8")
    src = SafetensorsCheckpoint(tiny_ckpt)
    index_file = root / "mx" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        state = load_file(str(root / "mx" / shard))
        for k in list(state):
            if k.startswith(("language_model.model.layers.2.", "language_model.model.layers.3.")):
                if k.endswith("_scale_inv"):
                    del state[k], index["weight_map"][k]
                else:
                    state[k] = src.get(k)
        save_file(state, str(root / "mx" / shard), metadata={"format": "pt"})
    index_file.write_text(json.dumps(index, indent=2))
    return root / "mx"


@pytest.fixture(scope="module")
def mxfp8_build(tiny_ckpt, tmp_path_factory, request):
    """A one-rank FP8 build (fp32 activations, ONNX verified in ONNX Runtime) of the tiny checkpoint
    with layers 0-1 native MXFP8 and 2-3 bf16 (per-channel FP8 in the build); no whole model may be loaded, and at most one decoder layer of any streamed
    model may be in memory at a time."""
    from m3_trt.build.builder import build
    from m3_trt.build.targets import load_target
    from m3_trt.model.modeling import M3ForConditionalGeneration
    from m3_trt.model.pieces import PieceModel
    from m3_trt.quant.quantize import quantize_checkpoint

    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    root = tmp_path_factory.mktemp("fp8-build")
    ckpt = _mixed_checkpoint(tiny_ckpt, quantize_checkpoint, root)

    def no_whole(*a, **k):
        raise AssertionError("the whole model was loaded")

    mp.setattr(M3ForConditionalGeneration, "from_pretrained", classmethod(no_whole))
    most = []
    real_loaded = PieceModel.loaded

    @contextlib.contextmanager
    def counting(self, piece, dtype=torch.float32):
        with real_loaded(self, piece, dtype) as state:
            most.append(sum(next(layer.parameters()).device.type != "meta"
                            for layer in self.model.model.language_model.layers))
            yield state

    mp.setattr(PieceModel, "loaded", counting)
    tgt = load_target("cpu", {"weight_dtype": "fp8", "max_seq_len": 64, "max_input_len": 32})
    calib = root / "calib.jsonl"  # one short prompt: the scales' values do not matter here, only where they go
    calib.write_text(json.dumps({"text": "Name three rivers."}) + "\n")
    build(ckpt, tgt, root / "build", progress=False, calib=calib)
    mp.undo()
    assert most and max(most) == 1, most
    return root / "build"


def _assert_same_codes_and_scales(export_dir, codes: dict, scales: dict, layers=range(4)) -> int:
    """ONNX layer weights == (codes, stored scales) bit for bit: code bytes equal, scales equal after the
    graph's exact re-layout (per channel ``[rows, 1]`` → ``[rows]``; E8M0 byte ``b`` → ``2^(b-127)``)."""
    seen = 0
    for layer in layers:
        for full, (raw, s) in _onnx_fp8_weights(export_dir, layer).items():
            c, sc = codes[full], scales[full]
            assert raw == c.contiguous().view(torch.uint8).numpy().tobytes(), full
            want = (sc.float() - 127).exp2() if sc.dtype == torch.uint8 else sc.float()
            assert np.array_equal(s.reshape(-1), want.reshape(-1).numpy()), full
            seen += 1
    return seen


def test_one_rank_fp8_build_onnx_weights_are_the_rank_files(mxfp8_build):
    """Every FP8 tensor of rank0's weight files — the MXFP8 checkpoint's own codes and E8M0 scales
    (layers 0-1, blocked DequantizeLinear, opset 21), per-channel codes and fp32 scales of the bf16
    layers 2-3 — reaches the ONNX layer weights bit for bit, each layer
    verified in ONNX Runtime against the emulated FP8 torch layer; the ONNX activation scales are
    the build's calibration.json. Negative controls: per-channel codes of the same weights differ
    (so the equality proves the checkpoint's codes and block scales were kept), and one scale one
    ulp off is caught."""
    from safetensors import safe_open

    from m3_trt.quant.fp8 import dequantize_fp8, quantize_weight

    out = mxfp8_build
    m = json.loads((out / "build.json").read_text())
    v = m["onnx"]["ranks"]["0"]["verify"]
    assert v["ok"] and {f"layer_{i}/{c}" for i in range(4) for c in ("prefill", "decode")} <= set(v["components"])
    with safe_open(str(out / "rank0/weights.safetensors"), "pt") as fw, \
            safe_open(str(out / "rank0/fp8_scales.safetensors"), "pt") as fs:
        scales = {k.removesuffix("_scale_inv"): fs.get_tensor(k) for k in fs.keys()}
        codes = {k: fw.get_tensor(k) for k in scales}
    for k, sc in scales.items():
        native = k.startswith(("model.language_model.layers.0.", "model.language_model.layers.1."))
        assert sc.dtype == torch.uint8 if native else (sc.dtype == torch.float32 and sc.shape[-1] == 1), k
    assert _assert_same_codes_and_scales(out / "rank0/onnx", codes, scales) == len(codes) > 20
    manifest = json.loads((out / "rank0/onnx/manifest.json").read_text())
    assert manifest["opset"] == 21 and "block scales" in manifest["quantization"]["weights"]
    assert manifest["quantization"]["activation_scales"] == \
        json.loads((out / "calibration.json").read_text())["activation_scales"]
    k = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    per_channel, _ = quantize_weight(dequantize_fp8(codes[k], scales[k]))
    assert not torch.equal(per_channel.view(torch.uint8), codes[k].view(torch.uint8))
    # and the comparison itself catches one per-channel scale one ulp off
    k = "model.language_model.layers.2.self_attn.q_proj.weight"
    scales[k] = scales[k].clone()
    scales[k][3] = torch.nextafter(scales[k][3], torch.tensor(1.0))
    with pytest.raises(AssertionError, match="q_proj"):
        _assert_same_codes_and_scales(out / "rank0/onnx", codes, scales, layers=[2])


def test_blocked_128x128_dequantize_runs_in_onnxruntime(tmp_path):
    """A 128×128-block weight (fp32 grid [2, 3] of a 256×384 weight) as a blocked DequantizeLinear in
    ONNX Runtime equals the torch Fp8Linear and the checkpoint's dequantized weight. Negative control:
    the grid transposed onto the wrong blocks moves the output."""
    import onnxruntime as ort

    from m3_trt.export.onnx.fp8 import BLOCKED_OPSET, Fp8Linear, translation_table
    from m3_trt.quant.fp8 import dequantize_fp8
    from m3_trt.quant.quantize import quantize_fp8_block

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 384, generator=g) * torch.logspace(-2, 1, 384)
    codes, grid = quantize_fp8_block(w)
    lin = Fp8Linear(codes, grid, act_scale=0.02, dtype=torch.float32).eval()
    assert lin.block == 128 and torch.equal(lin.weight, dequantize_fp8(codes, grid))
    x = torch.randn(3, 384, generator=g)
    prog = torch.onnx.export(lin, (x,), None, dynamo=True, opset_version=BLOCKED_OPSET, optimize=False,
                             custom_translation_table=translation_table(), verbose=False)
    path = tmp_path / "lin.onnx"
    prog.save(str(path))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = lin(x).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    bad = Fp8Linear(codes, grid.flip(0), act_scale=0.02, dtype=torch.float32)
    with torch.no_grad():
        assert np.abs(got - bad(x).numpy()).max() > 1e-2 * np.abs(want).max()


def test_fp8_export_of_an_in_memory_model_is_refused(tiny_ckpt, tmp_path):
    from m3_trt.export.onnx import export_model
    from m3_trt.model.modeling import M3ForConditionalGeneration

    with pytest.raises(ValueError, match="streams from a checkpoint"):
        export_model(M3ForConditionalGeneration.from_pretrained(tiny_ckpt), tmp_path / "o", quant="fp8",
                     calib_ckpt=tiny_ckpt, progress=None)
    assert not (tmp_path / "o").exists()
