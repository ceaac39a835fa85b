"""FP8 export: E4M3 weights and calibrated activation scales as Q/DQ pairs; ONNX Runtime runs the
graphs exactly like the torch FP8 model, TensorRT-RTX builds them with Q/DQ layers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from tolerances import FP8_VS_FP32_TOP1_RANDOM_IDS, TOLERANCES


@pytest.fixture(scope="module")
def fp8_export(tiny_ckpt, tmp_path_factory):
    from m3_trt.export.onnx import export_model

    out = tmp_path_factory.mktemp("fp8") / "tiny-fp8"
    return export_model(tiny_ckpt, out, plugins="none", quant="fp8", max_seq_len=64, verify=True, progress=None)


def test_graphs_carry_e4m3_qdq_and_match_torch_fp8_model(fp8_export):
    manifest = json.loads((fp8_export / "manifest.json").read_text())
    assert manifest["quant"] == "fp8" and manifest["quantization"]["scheme"] == "fp8-e4m3"
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
