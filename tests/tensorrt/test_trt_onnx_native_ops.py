"""ONNX nodes TensorRT-RTX 1.7.1's parser maps to its native LLM layers, and FP8 Q/DQ GEMMs.

Pinned as found: ``TRT_Attention``, opset-23 ``Attention`` / ``RMSNormalization`` /
``RotaryEmbedding`` and ``TRT_KVCacheUpdate`` parse and build; ``TRT_MoE`` parses into an
IMoELayer that then fails to build like ``add_moe``; ``GroupQueryAttention`` (com.microsoft)
needs a plugin TensorRT-RTX does not ship. FP8 (E4M3) Q/DQ around a MatMul — per-tensor
activation scale, per-channel weight scale — builds in fp32, fp16 and bf16 graphs.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

pytestmark = pytest.mark.trt

B, H, S, D = 1, 4, 8, 64


def _vi(name, t, shape):
    return helper.make_tensor_value_info(name, t, shape)


def _save(tmp_path, nodes, inputs, outputs, inits=(), opset=20, extra_opsets=()):
    import onnx

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    return path


def _build(path, tmp_path, dtype="fp16"):
    from m3_trt.export.tensorrt import build_engine_from_onnx

    return build_engine_from_onnx(path, tmp_path / "g.engine", dtype=dtype)


def _qkv(t=TP.FLOAT16):
    return [_vi(n, t, [B, H, S, D]) for n in "qkv"]


CASES = {
    "TRT_Attention-causal": lambda: ([helper.make_node("TRT_Attention", ["q", "k", "v"], ["o"], is_causal=1)],
                                     _qkv(), [_vi("o", TP.FLOAT16, [B, H, S, D])], [], 20, "ATTENTION_INPUT"),
    "TRT_Attention-boolmask": lambda: ([helper.make_node("TRT_Attention", ["q", "k", "v", "m"], ["o"])],
                                       _qkv() + [_vi("m", TP.BOOL, [B, 1, S, S])], [_vi("o", TP.FLOAT16, [B, H, S, D])],
                                       [], 20, "ATTENTION_INPUT"),
    "Attention23-causal": lambda: ([helper.make_node("Attention", ["q", "k", "v"], ["o"], is_causal=1)],
                                   _qkv(), [_vi("o", TP.FLOAT16, [B, H, S, D])], [], 23, "ATTENTION_INPUT"),
    "RMSNormalization23-fp32": lambda: ([helper.make_node("RMSNormalization", ["x", "w"], ["o"], axis=-1, epsilon=1e-6)],
                                        [_vi("x", TP.FLOAT, [B, S, D])], [_vi("o", TP.FLOAT, [B, S, D])],
                                        [numpy_helper.from_array(np.ones(D, np.float32), "w")], 23, "REDUCE", "fp32"),
    "RotaryEmbedding23-partial32": lambda: (
        [helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["o"], rotary_embedding_dim=32, num_heads=H)],
        [_vi("x", TP.FLOAT16, [B, H, S, D]), _vi("cos", TP.FLOAT16, [B, S, 16]), _vi("sin", TP.FLOAT16, [B, S, 16])],
        [_vi("o", TP.FLOAT16, [B, H, S, D])], [], 23, "ROTARY_EMBEDDING"),
    "TRT_KVCacheUpdate": lambda: (
        [helper.make_node("TRT_KVCacheUpdate", ["cache", "upd", "wi"], ["o"])],
        [_vi("cache", TP.FLOAT16, [B, 2, 64, D]), _vi("upd", TP.FLOAT16, [B, 2, S, D]), _vi("wi", TP.INT32, [B])],
        [_vi("o", TP.FLOAT16, [B, 2, 64, D])], [], 20, "KV_CACHE_UPDATE"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parser_native_llm_op_builds(trt, tmp_path, name):
    nodes, ins, outs, inits, opset, layer, *dtype = CASES[name]()
    report = _build(_save(tmp_path, nodes, ins, outs, inits, opset), tmp_path, *dtype)
    assert report.ok, report.error
    assert layer in report.layer_types, report.layer_types
    assert report.engine_bytes > 0


def test_parser_trt_moe_parses_but_does_not_build(trt, tmp_path):
    rng = np.random.default_rng(0)
    E, K, F = 4, 2, 128
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.02).astype(np.float16), n)
             for n, s in (("wg", (E, D, F)), ("wu", (E, D, F)), ("wd", (E, F, D)))]
    node = helper.make_node("TRT_MoE", ["x", "sel", "sc", "wg", "wu", "wd"], ["o"], activation_type=1)
    ins = [_vi("x", TP.FLOAT16, [B, S, D]), _vi("sel", TP.INT32, [B, S, K]), _vi("sc", TP.FLOAT16, [B, S, K])]
    report = _build(_save(tmp_path, [node], ins, [_vi("o", TP.FLOAT16, [B, S, D])], inits), tmp_path)
    assert report.layer_types.get("MOE") == 1  # parsed into the native layer ...
    assert not report.ok and report.stage == "build"  # ... which cannot be lowered here
    assert "Cannot decompose operation" in report.error and "moe_fc1" in report.error


def test_parser_group_query_attention_needs_a_plugin(trt, tmp_path):
    ins = [_vi("q", TP.FLOAT16, [B, S, H * D]), _vi("k", TP.FLOAT16, [B, S, 2 * D]), _vi("v", TP.FLOAT16, [B, S, 2 * D]),
           _vi("pk", TP.FLOAT16, [B, 2, 64, D]), _vi("pv", TP.FLOAT16, [B, 2, 64, D]),
           _vi("sl", TP.INT32, [B, 1]), _vi("tl", TP.INT32, [])]
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sl", "tl"], ["o", "pko", "pvo"],
                            domain="com.microsoft", num_heads=H, kv_num_heads=2, scale=D**-0.5)
    outs = [_vi("o", TP.FLOAT16, [B, S, H * D]), _vi("pko", TP.FLOAT16, [B, 2, 64, D]), _vi("pvo", TP.FLOAT16, [B, 2, 64, D])]
    path = _save(tmp_path, [node], ins, outs, extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    report = _build(path, tmp_path)
    assert not report.ok and report.stage == "parse"
    assert "failed to load GroupQueryAttention plugin" in report.error


def _fp8_qdq_matmul(tmp_path, dtype: str, weights: str):
    """x →Q/DQ(fp8, per-tensor scale)→ MatMul ← DQ(fp8 W, per-channel scale) [← Q for 'qdq']."""
    t = {"fp32": TP.FLOAT, "fp16": TP.FLOAT16, "bf16": TP.BFLOAT16}[dtype]
    N = 128
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((D, N)) * 0.05).astype(np.float32)
    w_scale = (np.abs(W).max(0) / 448.0).astype(np.float32)
    nodes, inits = [], []

    def const(name, arr):  # scales in the graph dtype (bf16 via a Cast: numpy has no bf16)
        if t == TP.BFLOAT16:
            inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name + "_f32"))
            nodes.append(helper.make_node("Cast", [name + "_f32"], [name], to=TP.BFLOAT16))
        else:
            inits.append(numpy_helper.from_array(np.asarray(arr, np.float16 if t == TP.FLOAT16 else np.float32), name))

    const("a_scale", np.array(0.02))
    const("w_scale", w_scale)
    inits += [helper.make_tensor("zp", TP.FLOAT8E4M3FN, [], [0.0]), helper.make_tensor("zpc", TP.FLOAT8E4M3FN, [N], [0.0] * N)]
    nodes += [helper.make_node("QuantizeLinear", ["x", "a_scale", "zp"], ["xq"]),
              helper.make_node("DequantizeLinear", ["xq", "a_scale", "zp"], ["xdq"])]
    if weights == "qdq":
        const("W", W)
        nodes.append(helper.make_node("QuantizeLinear", ["W", "w_scale", "zpc"], ["Wq"], axis=1))
    else:  # weights stored as FP8 initializers (a checkpoint's own FP8 weights)
        inits.append(helper.make_tensor("Wq", TP.FLOAT8E4M3FN, [D, N], (W / w_scale).flatten().tolist()))
    nodes += [helper.make_node("DequantizeLinear", ["Wq", "w_scale", "zpc"], ["Wdq"], axis=1),
              helper.make_node("MatMul", ["xdq", "Wdq"], ["y"])]
    return _save(tmp_path, nodes, [_vi("x", t, ["B", "S", D])], [_vi("y", t, ["B", "S", N])], inits, opset=21)


FP8 = [(d, w) for d in ("fp32", "fp16", "bf16") for w in ("qdq", "fp8init")]


@pytest.mark.parametrize("dtype,weights", FP8, ids=[f"fp8-e4m3-{w}-{d}" for d, w in FP8])
def test_fp8_qdq_matmul_builds(trt, tmp_path, dtype, weights):
    from m3_trt.export.tensorrt import build_engine_from_onnx

    path = _fp8_qdq_matmul(tmp_path, dtype, weights)
    report = build_engine_from_onnx(path, tmp_path / "f.engine", dtype=dtype,
                                    profiles={"x": ((1, 1, D), (2, 16, D), (4, 64, D))})
    assert report.ok, report.error
    assert report.layer_types.get("QUANTIZE", 0) >= 1 and report.layer_types.get("DEQUANTIZE", 0) >= 2
    assert report.layer_types.get("MATRIX_MULTIPLY") == 1
