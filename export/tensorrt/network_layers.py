"""Route (b): write TensorRT networks layer by layer, with the native LLM layers where they build.

Legend: B batch, S queries, T key slots (cache length), Hq query heads, G KV heads,
D head dim, Dm hidden, F MLP intermediate, E experts, K experts per token.

``LayerWriter`` wraps one strongly typed ``INetworkDefinition`` and keeps every numpy array
it turned into a constant alive until the build (TensorRT holds raw pointers to them).
What builds on TensorRT-RTX 1.7.1 without a GPU (probe log: docs/tensorrt_rtx.md):

* ``attention`` (``add_attention_v2``): fp16/bf16 with causal LOWER_RIGHT/UPPER_LEFT, a
  bool or additive float mask, GQA (G < Hq). fp32 has no dedicated kernel: it builds only
  with ``decomposable=True`` (set automatically here).
* ``kv_cache_update`` (int32 write indices only; int64 fails shape inference),
  ``rope`` (partial ``rotary_embedding_dim``), ``topk``, ``layernorm`` (normalization_v2 is
  LayerNorm: it subtracts the mean, so M3's RMSNorm is written with elementwise ops),
  ``dynamic_quantize`` (FP8 with fp32 scales in blocks of 16, MXFP8 = FP8 with E8M0 scales
  in blocks of 32), ``all_reduce`` / ``all_to_all`` (``add_dist_collective``).
* ``moe`` (``add_moe``): never builds here — "Cannot decompose operation moe_fc1" for every
  dtype, shape, quantization and compute capability tried; NVIDIA documents IMoELayer for
  SM100/SM103/SM110 only, targets TensorRT-RTX cannot select. The SwiGLU-OAI MoE is written
  with standard ops (``swiglu_mlp`` per expert) or the ``m3::swiglu_moe`` plugin instead.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from m3_trt.export.tensorrt._trt import backend_name, import_trt
from m3_trt.export.tensorrt.builder import (
    BuildReport,
    _make_logger,
    apply_profiles,
    build_serialized,
    create_network,
    layer_type_counts,
    tensor_infos,
)


class LayerWriter:
    """Helpers that add M3's building blocks to one network (``w.net``); ``build`` makes the engine."""

    def __init__(self, trt, builder, logger=None):
        self.trt = trt
        self.builder = builder
        self.logger = logger
        self.net = create_network(trt, builder)
        self._keep: list[np.ndarray] = []

    @classmethod
    def create(cls, log: str = "none") -> "LayerWriter":
        """A writer over a fresh builder whose logger keeps warnings/errors for the report."""
        trt = import_trt()
        logger = _make_logger(trt, log)
        return cls(trt, trt.Builder(logger), logger)

    def build(self, engine_path: str | os.PathLike, *, profiles=None, timeout_s: float | None = None) -> BuildReport:
        """Build the network into ``engine_path`` (atomic write) and report, like the ONNX route."""
        if self.logger is None:
            raise ValueError("LayerWriter.build needs the logger: make the writer with LayerWriter.create()")
        t0 = time.monotonic()
        report = BuildReport(ok=False, stage="configure", backend=backend_name(),
                             num_layers=self.net.num_layers, layer_types=layer_type_counts(self.net),
                             inputs=tensor_infos(self.net, "inputs"), outputs=tensor_infos(self.net, "outputs"))
        config = self.builder.create_builder_config()
        apply_profiles(self.trt, self.builder, self.net, config, profiles)
        deadline = None if timeout_s is None else t0 + timeout_s
        return build_serialized(self.trt, self.builder, self.net, config, engine_path, report, self.logger, deadline, t0)

    # -- plumbing ---------------------------------------------------------------------
    def input(self, name: str, dtype, shape) -> Any:
        return self.net.add_input(name, dtype, tuple(shape))

    def output(self, tensor, name: str):
        tensor.name = name
        self.net.mark_output(tensor)
        return tensor

    def const(self, array: np.ndarray, dtype=None):
        """A constant in ``dtype`` (default: the array's); bf16 goes through an fp32 constant + cast."""
        trt = self.trt
        dtype = dtype or {np.float32: trt.float32, np.float16: trt.float16, np.int32: trt.int32,
                          np.int64: trt.int64}[np.asarray(array).dtype.type]
        src = np.ascontiguousarray(array, dtype=np.float16 if dtype == trt.float16 else None)
        if dtype == trt.bfloat16 or (dtype == trt.float32 and src.dtype != np.float32):
            src = np.ascontiguousarray(array, dtype=np.float32)
        self._keep.append(src)
        t = self.net.add_constant(src.shape, trt.Weights(src)).get_output(0)
        return self.cast(t, dtype)

    def cast(self, t, dtype):
        return t if t.dtype == dtype else self.net.add_cast(t, dtype).get_output(0)

    def scalar(self, value: float, like):
        """A rank-matched broadcastable scalar in ``like``'s dtype."""
        shape = (1,) * len(like.shape)
        return self.const(np.full(shape, value, np.float32), like.dtype)

    def ew(self, a, b, op: str):
        return self.net.add_elementwise(a, b, getattr(self.trt.ElementWiseOperation, op)).get_output(0)

    def unary(self, a, op: str):
        return self.net.add_unary(a, getattr(self.trt.UnaryOperation, op)).get_output(0)

    # -- M3 blocks ----------------------------------------------------------------------
    def rmsnorm(self, x, weight: np.ndarray, eps: float, *, offset: float = 1.0):
        """Gemma-style RMSNorm ``x / sqrt(mean(x²) + eps) * (offset + w)`` computed in fp32 over the last axis."""
        trt = self.trt
        xf = self.cast(x, trt.float32)
        sq = self.ew(xf, xf, "PROD")
        axis = 1 << (len(x.shape) - 1)
        ms = self.net.add_reduce(sq, trt.ReduceOperation.AVG, axis, True).get_output(0)
        inv = self.unary(self.unary(self.ew(ms, self.scalar(eps, ms), "SUM"), "SQRT"), "RECIP")
        w = self.const((offset + np.asarray(weight, np.float32)).reshape((1,) * (len(x.shape) - 1) + (-1,)), trt.float32)
        return self.cast(self.ew(self.ew(xf, inv, "PROD"), w, "PROD"), x.dtype)

    def layernorm(self, x, scale: np.ndarray, bias: np.ndarray, eps: float):
        """``add_normalization_v2`` over the last axis (mean-subtracting LayerNorm)."""
        shape = (1,) * (len(x.shape) - 1) + (-1,)
        s = self.const(np.asarray(scale, np.float32).reshape(shape), x.dtype)
        b = self.const(np.asarray(bias, np.float32).reshape(shape), x.dtype)
        layer = self.net.add_normalization_v2(x, s, b, 1 << (len(x.shape) - 1))
        layer.epsilon = eps
        return layer.get_output(0)

    def linear(self, x, w_ND: np.ndarray):
        """``x @ w.T`` with ``w_ND`` [out, in] (torch layout) stored in x's dtype."""
        trt = self.trt
        w = self.const(np.asarray(w_ND)[None] if len(x.shape) == 3 else np.asarray(w_ND), x.dtype)
        return self.net.add_matrix_multiply(x, trt.MatrixOperation.NONE, w, trt.MatrixOperation.TRANSPOSE).get_output(0)

    def swiglu_oai(self, gate, up, *, alpha: float = 1.702, limit: float = 7.0):
        """``min(g, limit) * sigmoid(alpha * min(g, limit)) * (clamp(u, -limit, limit) + 1)``."""
        g = self.ew(gate, self.scalar(limit, gate), "MIN")
        u = self.ew(self.ew(up, self.scalar(limit, up), "MIN"), self.scalar(-limit, up), "MAX")
        sig = self.net.add_activation(self.ew(g, self.scalar(alpha, g), "PROD"), self.trt.ActivationType.SIGMOID).get_output(0)
        return self.ew(self.ew(g, sig, "PROD"), self.ew(u, self.scalar(1.0, u), "SUM"), "PROD")

    def swiglu_mlp(self, x_BSD, w13_FD: np.ndarray, w2_DF: np.ndarray, *, alpha: float = 1.702, limit: float = 7.0):
        """Dense SwiGLU-OAI MLP: ``w13_FD`` is [2F, Dm] (gate rows first), ``w2_DF`` is [Dm, F]."""
        F = np.asarray(w13_FD).shape[0] // 2
        gate = self.linear(x_BSD, np.asarray(w13_FD)[:F])
        up = self.linear(x_BSD, np.asarray(w13_FD)[F:])
        return self.linear(self.swiglu_oai(gate, up, alpha=alpha, limit=limit), w2_DF)

    def attention(self, q_BHSD, k_BGTD, v_BGTD, *, causal: str = "LOWER_RIGHT", mask=None, decomposable: bool | None = None):
        """Native fused attention (``add_attention_v2``), softmax normalisation.

        ``causal``: 'NONE' | 'LOWER_RIGHT' (last query sees the last key: prefill and decode
        over a cache) | 'UPPER_LEFT'. ``mask`` (bool keep-mask or additive float,
        broadcastable to [B, Hq, S, T]) replaces ``causal``. fp32 has no fused kernel, so
        ``decomposable`` defaults to True for fp32 inputs.
        """
        trt = self.trt
        kind = trt.CausalMaskKind.NONE if mask is not None else getattr(trt.CausalMaskKind, causal)
        layer = self.net.add_attention_v2(q_BHSD, k_BGTD, v_BGTD, trt.AttentionNormalizationOp.SOFTMAX, kind)
        if mask is not None:
            layer.mask = mask
        if decomposable is None:
            decomposable = q_BHSD.dtype == trt.float32
        if decomposable:
            layer.decomposable = True
        return layer.get_output(0)

    def kv_cache_update(self, cache_BGTD, update_BGSD, write_idx_B):
        """Write ``update`` into ``cache`` at per-batch start slots (``write_idx_B`` int32)."""
        trt = self.trt
        idx = self.cast(write_idx_B, trt.int32)
        return self.net.add_kv_cache_update(cache_BGTD, update_BGSD, idx, trt.KVCacheMode.LINEAR).get_output(0)

    def rope(self, x_BHSD, cos_BSR, sin_BSR, *, rotary_dim: int, interleaved: bool = False):
        """Partial RoPE on the first ``rotary_dim`` dims; cos/sin are [B, S, rotary_dim/2]."""
        return self.net.add_rotary_embedding(x_BHSD, cos_BSR, sin_BSR, interleaved, rotary_dim).get_output(0)

    def topk(self, x, k: int, axis: int = -1):
        """(values, int32 indices) of the k largest along ``axis``."""
        axis = axis % len(x.shape)
        layer = self.net.add_topk(x, self.trt.TopKOperation.MAX, k, 1 << axis)
        return layer.get_output(0), layer.get_output(1)

    def dynamic_quantize(self, x, *, block: int, scale_dtype, to_dtype=None):
        """Block-quantize the last axis (``add_dynamic_quantize_v2``) and dequantize back.

        Built here: FP8 + fp32 scales with block 16, FP8 + E8M0 scales with block 32 (MXFP8).
        Returns (dequantized, quantized, scales).
        """
        trt = self.trt
        to_dtype = to_dtype or trt.fp8
        block_shape = trt.Dims([1] * (len(x.shape) - 1) + [block])
        q = self.net.add_dynamic_quantize_v2(x, block_shape, to_dtype, scale_dtype)
        dq = self.net.add_dequantize(q.get_output(0), q.get_output(1), x.dtype)
        dq.block_shape = block_shape
        return dq.get_output(0), q.get_output(0), q.get_output(1)

    def all_reduce(self, x):
        """Sum over ranks inside the engine (``add_dist_collective`` ALL_REDUCE)."""
        trt = self.trt
        return self.net.add_dist_collective(x, trt.CollectiveOperation.ALL_REDUCE, trt.ReduceOperation.SUM, -1, None).get_output(0)

    def moe(self, x_BSD, experts_BSK, scores_BSK, w_gate_EDF, w_up_EDF, w_down_EFD, *, alpha=1.702, limit=7.0, beta=1.0):
        """Native ``add_moe`` with SwiGLU-OAI parameters — does NOT build on TensorRT-RTX 1.7.1
        (see module docstring); kept so the limit stays tested and the day it builds is noticed.

        Weights: gate/up [E, Dm, F], down [E, F, Dm]; experts int32, scores in x's dtype.
        """
        trt = self.trt
        layer = self.net.add_moe(x_BSD, experts_BSK, scores_BSK)
        layer.set_gated_weights(self.const(w_gate_EDF, x_BSD.dtype), self.const(w_up_EDF, x_BSD.dtype),
                                self.const(w_down_EFD, x_BSD.dtype), trt.MoEActType.SILU)
        layer.set_swiglu_params(limit, alpha, beta)
        return layer.get_output(0)

    # -- generic primitives (used by network_model.py; each is one TensorRT layer) ----------
    def reshape(self, x, dims):
        """``add_shuffle`` reshape; 0 copies the input's dim at that index, -1 is inferred."""
        layer = self.net.add_shuffle(x)
        layer.reshape_dims = tuple(dims)
        return layer.get_output(0)

    def transpose(self, x, perm):
        layer = self.net.add_shuffle(x)
        layer.first_transpose = tuple(perm)
        return layer.get_output(0)

    def reduce(self, x, op: str, axis: int, keepdims: bool = False):
        """``add_reduce`` over one axis; ``op`` is a ReduceOperation name ('SUM', 'MAX', 'AVG', …)."""
        axis = axis % len(x.shape)
        return self.net.add_reduce(x, getattr(self.trt.ReduceOperation, op), 1 << axis, keepdims).get_output(0)

    def select(self, cond, then_t, else_t):
        return self.net.add_select(cond, then_t, else_t).get_output(0)

    def matmul(self, a, b, *, transpose_b: bool = False):
        """Batched ``a @ b`` (``b`` transposed on its last two axes when ``transpose_b``)."""
        M = self.trt.MatrixOperation
        return self.net.add_matrix_multiply(a, M.NONE, b, M.TRANSPOSE if transpose_b else M.NONE).get_output(0)

    def gather(self, table, indices, axis: int = 0):
        layer = self.net.add_gather(table, indices, axis)
        return layer.get_output(0)

    def sigmoid(self, x):
        return self.net.add_activation(x, self.trt.ActivationType.SIGMOID).get_output(0)

    def topk_min(self, x, k: int, axis: int = -1):
        """(values ascending, int32 indices) of the k smallest along ``axis``."""
        axis = axis % len(x.shape)
        layer = self.net.add_topk(x, self.trt.TopKOperation.MIN, k, 1 << axis)
        return layer.get_output(0), layer.get_output(1)
