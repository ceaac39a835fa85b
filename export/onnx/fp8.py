"""FP8 (E4M3) export: Q/DQ pairs in the ONNX graphs, so TensorRT can run FP8 GEMMs.

The quantization is the one ``m3-trt build-engine`` uses (``m3_trt.quant.fp8``), and the weights
are its bytes: decoder-layer weights (attention, indexer projections, dense MLPs, shared and
routed experts; never the router) become the E4M3 codes and fp32 scales that
:func:`m3_trt.quant.fp8.quantize_weight` gives — one scale per output channel for a bf16/fp32
checkpoint, the checkpoint's own block scales for a native FP8 one (MXFP8 1×32 E8M0 or 128×128
fp32; the codes are then the checkpoint's). The inputs of every quantized linear get a static
per-tensor scale ``amax / 448`` from layer-by-layer calibration
(:func:`m3_trt.quant.fp8.calibrate_layerwise`, or the build's ``calibration.json``).

In the graph a quantized linear is ``DequantizeLinear(W_e4m3, s_w)`` on the weight and
``QuantizeLinear → DequantizeLinear`` (E4M3, ``s_x``) on its input — the pattern TensorRT fuses
into an FP8 GEMM. All scales stay fp32 whatever the activation dtype (the build's scales, not a
bf16 rounding of them; TensorRT wants the two scales of an FP8 GEMM in one type): a bf16/fp16
graph casts its input to fp32 around the Q/DQ pair and casts the dequantized weight. Per-channel scales are
a per-axis DequantizeLinear (``axis=0``, scale ``[rows]``); block scales a *blocked*
DequantizeLinear (opset 21: ``axis=1, block_size=bc``, scale ``[rows, cols/bc]`` — a 128×128
grid has its rows repeated 128 times, E8M0 bytes become the exact fp32 powers of two
``2^(b-127)``; the values are untouched). Routed experts are stored as E4M3 codes
``[E·rows, cols]``, dequantized per (expert, row) or block and reshaped to ``[E, rows, cols]``;
their grouped GEMMs keep the activation dtype (the MoE plugin on a GPU would take FP8 inputs; the
CPU reference path does not).

Torch side: :func:`fp8_layer` swaps one decoder layer's modules for :class:`Fp8Linear` /
:class:`Fp8Experts` while that layer is loaded (the streamed export holds one layer at a time);
their forward runs the *same* arithmetic through small custom ops (``m3q::qdq_e4m3``,
``m3q::dequant_e4m3``, ``m3q::dequant_e4m3_blocked``) that export to exactly those ONNX nodes —
so ONNX Runtime is checked against torch with fp32 tolerances, and the model's own error is the
FP8 one.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from m3_trt.model.modeling import MoE
from m3_trt.quant.fp8 import is_fp8_weight, quantize_weight

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCKED_OPSET = 21  # DequantizeLinear's block_size (blocked quantization) appeared in opset 21


@functools.cache
def _register_ops() -> None:
    @torch.library.custom_op("m3q::qdq_e4m3", mutates_args=())
    def qdq_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        q = (x.float() / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        return (q.float() * scale.float()).to(x.dtype)

    @qdq_e4m3.register_fake
    def _(x, scale):
        return torch.empty_like(x)

    @torch.library.custom_op("m3q::dequant_e4m3", mutates_args=())
    def dequant_e4m3(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``codes`` E4M3 ``[rows, cols]`` times ``scale [rows]`` (fp32), in fp32."""
        return codes.float() * scale.float()[:, None]

    @dequant_e4m3.register_fake
    def _(codes, scale):
        return codes.new_empty(codes.shape, dtype=torch.float32)

    @torch.library.custom_op("m3q::dequant_e4m3_blocked", mutates_args=())
    def dequant_e4m3_blocked(codes: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
        """``codes`` E4M3 ``[rows, cols]`` times ``scale [rows, cols/block]`` (fp32) repeated along columns."""
        return codes.float() * scale.float().repeat_interleave(block, dim=1)

    @dequant_e4m3_blocked.register_fake
    def _(codes, scale, block):
        return codes.new_empty(codes.shape, dtype=torch.float32)


def qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _register_ops()
    return torch.ops.m3q.qdq_e4m3(x, scale)


def dequant(codes: torch.Tensor, scale: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """fp32 weight of E4M3 ``codes [rows, cols]``: per row (``scale [rows]``) or blocked along columns."""
    _register_ops()
    if block is None:
        return torch.ops.m3q.dequant_e4m3(codes, scale)
    return torch.ops.m3q.dequant_e4m3_blocked(codes, scale, block)


def graph_scale(scale: torch.Tensor, shape: tuple[int, ...], name: str = "weight") -> tuple[torch.Tensor, int | None]:
    """A stored weight scale (``quantize_weight``'s: ``[..., rows, 1]`` per channel, or a block grid
    ``[..., rows/br, cols/bc]`` in fp32 or E8M0 uint8) in the graph's form for the codes flattened to
    ``[N·rows, cols]``: ``([N·rows], None)`` per channel, ``([N·rows, cols/bc] fp32, bc)`` blocked
    (grid rows repeated ``br`` times; E8M0 ``b`` → ``2^(b-127)``, exact)."""
    *lead, rows, cols = shape
    sr, sc = scale.shape[-2:]
    if rows % sr or cols % sc:
        raise ValueError(f"{name}: weight {tuple(shape)} is not divisible by its scale grid ({sr}, {sc})")
    s = (scale.float() - 127).exp2() if scale.dtype == torch.uint8 else scale.float()
    if sc == 1 and sr == rows:  # per output channel
        return s.reshape(-1).contiguous(), None
    return s.repeat_interleave(rows // sr, dim=-2).reshape(-1, sc).contiguous(), cols // sc


class Fp8Linear(nn.Module):
    """``F.linear(qdq(x, act_scale), dequant(weight_e4m3, weight_scale))``; no bias (M3 has none).

    ``codes`` E4M3 ``[rows, cols]`` and ``scale`` as :func:`m3_trt.quant.fp8.quantize_weight` gives
    them; ``act_scale`` the input's per-tensor scale (``amax / 448``, kept fp32); ``dtype`` the
    activation dtype.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, act_scale: float, dtype: torch.dtype,
                 name: str = "weight"):
        super().__init__()
        s, self.block = graph_scale(scale, tuple(codes.shape), name)
        self.out_dtype = dtype
        self.register_buffer("weight_e4m3", codes.contiguous())
        self.register_buffer("weight_scale", s)
        self.register_buffer("act_scale", torch.tensor(act_scale, dtype=torch.float32))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, act_scale: float, dtype: torch.dtype,
                    block_scale: torch.Tensor | None = None, name: str = "weight") -> "Fp8Linear":
        codes, scale = quantize_weight(weight.detach(), block_scale)
        return cls(codes, scale, act_scale, dtype, name)

    @property
    def weight(self) -> torch.Tensor:
        return dequant(self.weight_e4m3, self.weight_scale, self.block).to(self.out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Q/DQ in fp32 (a no-op cast for fp32 graphs): TensorRT fuses an FP8 GEMM only when the
        # input's and the weight's scales have one type, and the weight's are fp32
        return F.linear(qdq(x.float(), self.act_scale).to(x.dtype), self.weight)


class Fp8Experts(nn.Module):
    """Routed experts as E4M3 codes ``[E·rows, cols]`` + per-(expert, row) or block scales; weight-only FP8.

    Stored flattened so the graph dequantizes with one DequantizeLinear and reshapes the
    *dequantized* tensor: ONNX Runtime has no FP8 Reshape, and TensorRT refuses a Cast from FP8.
    ``quantized``: ``{"gate_up_proj": (codes [E, rows, cols], stored scale), "down_proj": …}``
    (:func:`m3_trt.quant.fp8.quantize_weight`'s output).
    """

    def __init__(self, quantized: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype,
                 prefix: str = "experts"):
        super().__init__()
        self.shapes, self.blocks, self.out_dtype = {}, {}, dtype
        for name in ("gate_up_proj", "down_proj"):
            codes, scale = quantized[name]
            self.shapes[name] = tuple(codes.shape)
            s, self.blocks[name] = graph_scale(scale, tuple(codes.shape), f"{prefix}.{name}")
            self.register_buffer(f"{name}_e4m3", codes.reshape(-1, codes.shape[-1]).contiguous())
            self.register_buffer(f"{name}_scale", s)

    def _weight(self, name: str) -> torch.Tensor:
        w = dequant(getattr(self, f"{name}_e4m3"), getattr(self, f"{name}_scale"), self.blocks[name])
        return w.to(self.out_dtype).reshape(self.shapes[name])

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return self._weight("gate_up_proj")

    @property
    def down_proj(self) -> torch.Tensor:
        return self._weight("down_proj")


@contextmanager
def fp8_layer(layer: nn.Module, prefix: str, dtype: torch.dtype, act_scales: dict[str, float],
              block_scales: dict[str, torch.Tensor] | None = None) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Swap one decoder layer's quantized Linears / routed experts for :class:`Fp8Linear` /
    :class:`Fp8Experts` for the duration of the ``with`` (the originals come back on exit).

    ``layer`` is ``model.language_model.layers.<i>`` (``prefix``: that full name) with its weights in
    memory, in ``dtype`` or higher. A weight with a checkpoint block scale (``block_scales``, by full
    name) is re-coded from its value as loaded with exactly that scale — the checkpoint's codes back,
    what a one-rank build writes; every other weight is cast to ``dtype`` first and given per-channel
    scales (the build's rule, :func:`m3_trt.build.rank_weights.convert_piece`). ``act_scales``:
    per-tensor input scales by weight name (``calibration.json``'s ``activation_scales``). The rest
    of the layer is cast to ``dtype``. Yields ``{weight name: (codes, stored scale)}``.
    """
    blocks = block_scales or {}

    def scale_of(name: str) -> float:
        if name not in act_scales:
            raise ValueError(f"{name}: no activation scale (was it reached by the calibration prompts?)")
        return float(act_scales[name])

    swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
    stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in layer.named_modules(prefix=prefix):
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}"
            if isinstance(child, nn.Linear) and is_fp8_weight(full + ".weight", child.weight):
                key = full + ".weight"
                w = child.weight if key in blocks else child.weight.to(dtype)
                stored[key] = quantize_weight(w.detach(), blocks.get(key))
                swaps.append((module, child_name, child, Fp8Linear(*stored[key], scale_of(key), dtype, key)))
        if isinstance(module, MoE) and is_fp8_weight(f"{name}.experts.gate_up_proj", module.experts.gate_up_proj):
            ex = f"{name}.experts"
            q = {}
            for n in ("gate_up_proj", "down_proj"):
                w, key = getattr(module.experts, n), f"{ex}.{n}"
                q[n] = stored[key] = quantize_weight((w if key in blocks else w.to(dtype)).detach(), blocks.get(key))
            swaps.append((module, "experts", module.experts, Fp8Experts(q, dtype, ex)))
    layer.to(dtype)  # before the swap: Module.to(dtype) would cast the E4M3 codes too
    for module, child_name, _, new in swaps:
        setattr(module, child_name, new)
    try:
        yield stored
    finally:
        for module, child_name, old, _ in swaps:
            setattr(module, child_name, old)


# -- ONNX translations -----------------------------------------------------------------------------

def translation_table() -> dict:
    import onnx
    from onnxscript import opset20 as op
    from onnxscript import opset21 as op21

    _register_ops()
    zero = onnx.helper.make_tensor("zero_e4m3", onnx.TensorProto.FLOAT8E4M3FN, [], [0.0])

    def qdq_e4m3(x, scale):
        zp = op.Constant(value=zero)
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), scale, zp)

    def dequant_e4m3(codes, scale):
        # per-output-channel DequantizeLinear, no zero point (E4M3 codes are symmetric)
        return op.DequantizeLinear(codes, scale, axis=0)

    def dequant_e4m3_blocked(codes, scale, block: int):
        # blocked DequantizeLinear: scale [rows, cols/block], one value per `block` columns of a row
        return op21.DequantizeLinear(codes, scale, axis=1, block_size=block)

    return {torch.ops.m3q.qdq_e4m3.default: qdq_e4m3, torch.ops.m3q.dequant_e4m3.default: dequant_e4m3,
            torch.ops.m3q.dequant_e4m3_blocked.default: dequant_e4m3_blocked}
