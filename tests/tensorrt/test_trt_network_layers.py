"""Route (b): networks written with TensorRT's own layers, built on CPU by TensorRT-RTX.

Each case builds a small dynamic-shape network through ``LayerWriter`` and checks the engine
is written and the IO is what was declared. The limits found on TensorRT-RTX 1.7.1 are
pinned with TensorRT's exact message, so a release that lifts one is noticed:
``add_moe`` never builds ("Cannot decompose operation … moe_fc1"), fp32 attention needs
``decomposable``, KV-cache write indices must be int32, FP8 dynamic quantization with fp32
scales does not take blocks of 32.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.trt

Dm = 64
X_PROF = ((1, 1, Dm), (2, 16, Dm), (4, 64, Dm))


def _dt(trt, name):
    return {"fp32": trt.float32, "fp16": trt.float16, "bf16": trt.bfloat16}[name]


def _writer():
    from m3_trt.export.tensorrt.network_layers import LayerWriter

    return LayerWriter.create()


def _x(w, trt, dt):
    return w.input("x", _dt(trt, dt), (-1, -1, Dm)), {"x": X_PROF}


def case_rmsnorm(w, trt, dt):
    x, prof = _x(w, trt, dt)
    w.output(w.rmsnorm(x, np.random.default_rng(0).standard_normal(Dm) * 0.1, 1e-6), "y")
    return prof


def case_swiglu_mlp(w, trt, dt):
    x, prof = _x(w, trt, dt)
    rng = np.random.default_rng(0)
    w.output(w.swiglu_mlp(x, rng.standard_normal((192, Dm)) * 0.05, rng.standard_normal((Dm, 96)) * 0.05), "y")
    return prof


def case_layernorm(w, trt, dt):
    x, prof = _x(w, trt, dt)
    w.output(w.layernorm(x, np.ones(Dm), np.zeros(Dm), 1e-5), "y")
    return prof


def _qkv(w, trt, dt, hq=4, g=2, d=64):
    t = _dt(trt, dt)
    q = w.input("q", t, (-1, hq, -1, d))
    k = w.input("k", t, (-1, g, -1, d))
    v = w.input("v", t, (-1, g, -1, d))
    prof = {n: ((1, h, 1, d), (1, h, 16, d), (2, h, 64, d)) for n, h in (("q", hq), ("k", g), ("v", g))}
    return q, k, v, prof


def case_attention_causal_gqa(w, trt, dt):
    q, k, v, prof = _qkv(w, trt, dt)
    w.output(w.attention(q, k, v, causal="LOWER_RIGHT"), "o")
    return prof


def case_attention_bool_mask(w, trt, dt):
    q, k, v, prof = _qkv(w, trt, dt, hq=4, g=4, d=128)
    m = w.input("mask", trt.bool, (-1, 1, -1, -1))
    w.output(w.attention(q, k, v, mask=m), "o")
    return {**prof, "mask": ((1, 1, 1, 1), (1, 1, 16, 16), (2, 1, 64, 64))}


def case_kv_cache_update(w, trt, dt):
    t = _dt(trt, dt)
    cache = w.input("cache", t, (-1, 2, 128, 64))
    upd = w.input("update", t, (-1, 2, -1, 64))
    idx = w.input("write_idx", trt.int32, (-1,))
    w.output(w.kv_cache_update(cache, upd, idx), "cache_out")
    return {"cache": ((1, 2, 128, 64), (1, 2, 128, 64), (2, 2, 128, 64)),
            "update": ((1, 2, 1, 64), (1, 2, 8, 64), (2, 2, 64, 64)), "write_idx": ((1,), (1,), (2,))}


def case_partial_rope(w, trt, dt):
    t = _dt(trt, dt)
    x = w.input("x", t, (-1, 4, -1, 128))
    cos = w.input("cos", t, (-1, -1, 32))
    sin = w.input("sin", t, (-1, -1, 32))
    w.output(w.rope(x, cos, sin, rotary_dim=64), "y")
    cs = ((1, 1, 32), (1, 16, 32), (2, 64, 32))
    return {"x": ((1, 4, 1, 128), (1, 4, 16, 128), (2, 4, 64, 128)), "cos": cs, "sin": cs}


def case_topk(w, trt, dt):
    x = w.input("scores", _dt(trt, dt), (-1, 4, -1, 64))
    vals, idx = w.topk(x, 16)
    w.output(vals, "values")
    w.output(idx, "indices")
    return {"scores": ((1, 4, 1, 64), (1, 4, 16, 64), (2, 4, 64, 64))}


def case_mxfp8_dynamic_quantize(w, trt, dt):
    x, prof = _x(w, trt, dt)
    w.output(w.dynamic_quantize(x, block=32, scale_dtype=trt.e8m0)[0], "y")
    return prof


def case_fp8_dynamic_quantize_block16(w, trt, dt):
    x, prof = _x(w, trt, dt)
    w.output(w.dynamic_quantize(x, block=16, scale_dtype=trt.float32)[0], "y")
    return prof


def case_all_reduce(w, trt, dt):
    x = w.input("x", _dt(trt, dt), (-1, Dm))
    w.output(w.all_reduce(x), "y")
    return {"x": ((1, Dm), (8, Dm), (64, Dm))}


BUILDS = [
    (case_rmsnorm, "fp32"), (case_rmsnorm, "bf16"),
    (case_swiglu_mlp, "fp32"), (case_swiglu_mlp, "fp16"),
    (case_layernorm, "bf16"),
    (case_attention_causal_gqa, "fp16"), (case_attention_causal_gqa, "bf16"), (case_attention_causal_gqa, "fp32"),
    (case_attention_bool_mask, "bf16"),
    (case_kv_cache_update, "bf16"),
    (case_partial_rope, "bf16"),
    (case_topk, "fp32"),
    (case_mxfp8_dynamic_quantize, "bf16"),
    (case_fp8_dynamic_quantize_block16, "fp16"),
    (case_all_reduce, "bf16"),
]


@pytest.mark.parametrize("case,dt", BUILDS, ids=[f"{c.__name__[5:]}-{d}" for c, d in BUILDS])
def test_native_layer_network_builds(trt, tmp_path, case, dt):
    w = _writer()
    profiles = case(w, trt, dt)
    declared_in = [(w.net.get_input(i).name, tuple(w.net.get_input(i).shape)) for i in range(w.net.num_inputs)]
    report = w.build(tmp_path / "n.engine", profiles=profiles, timeout_s=60)
    assert report.ok, report.error
    assert (tmp_path / "n.engine").stat().st_size == report.engine_bytes > 0
    assert [(t.name, t.shape) for t in report.inputs] == declared_in
    float_out = [t.dtype for t in report.outputs if t.dtype not in ("INT32", "INT64")]
    assert set(float_out) == {_dt(trt, dt).name}, report.outputs  # strongly typed: no silent precision change


# -- pinned limits ---------------------------------------------------------------------------

def _moe(w, trt, dt):
    t = _dt(trt, dt)
    x = w.input("x", t, (-1, -1, Dm))
    e = w.input("experts", trt.int32, (-1, -1, 2))
    s = w.input("scores", t, (-1, -1, 2))
    rng = np.random.default_rng(0)
    w.output(w.moe(x, e, s, rng.standard_normal((4, Dm, 128)) * 0.02, rng.standard_normal((4, Dm, 128)) * 0.02,
                   rng.standard_normal((4, 128, Dm)) * 0.02), "y")
    return {"x": X_PROF, "experts": ((1, 1, 2), (2, 16, 2), (4, 64, 2)), "scores": ((1, 1, 2), (2, 16, 2), (4, 64, 2))}


@pytest.mark.parametrize("dt", ["fp32", "fp16", "bf16"], ids=lambda d: f"moe-E4-K2-D64-F128-{d}")
def test_native_moe_does_not_build_on_rtx(trt, tmp_path, dt):
    if not trt.__name__.startswith("tensorrt_rtx"):
        pytest.skip("limit found on TensorRT-RTX; standard TensorRT documents IMoELayer for SM100+")
    w = _writer()
    report = w.build(tmp_path / "m.engine", profiles=_moe(w, trt, dt))
    assert not report.ok and report.stage == "build"
    assert "Cannot decompose operation" in report.error and "moe_fc1" in report.error
    assert not (tmp_path / "m.engine").exists()


def test_fp32_attention_needs_decomposable(trt, tmp_path):
    """Control for the fp32 attention case above: without decomposable the build fails."""
    w = _writer()
    q, k, v, prof = _qkv(w, trt, "fp32")
    w.output(w.attention(q, k, v, decomposable=False), "o")
    report = w.build(tmp_path / "a.engine", profiles=prof)
    assert not report.ok
    assert "Attention operation was not supported by a dedicated kernel" in report.error


def test_kv_cache_update_rejects_int64_indices(trt, tmp_path):
    """Why ``kv_cache_update`` casts: the raw layer only takes int32 write indices."""
    w = _writer()
    cache = w.input("cache", trt.bfloat16, (1, 2, 128, 64))
    upd = w.input("update", trt.bfloat16, (1, 2, 8, 64))
    idx = w.input("write_idx", trt.int64, (1,))
    w.output(w.net.add_kv_cache_update(cache, upd, idx, trt.KVCacheMode.LINEAR).get_output(0), "c")
    report = w.build(tmp_path / "k.engine")
    assert not report.ok and "Write indices must be of type int32, but got i64" in report.error


def test_fp8_dynamic_quantize_fp32_scales_block32_unsupported(trt, tmp_path):
    w = _writer()
    x, prof = _x(w, trt, "bf16")
    w.output(w.dynamic_quantize(x, block=32, scale_dtype=trt.float32)[0], "y")
    report = w.build(tmp_path / "q.engine", profiles=prof)
    assert not report.ok and "Dynamic Quantization Op block_size 32 is not supported" in report.error
