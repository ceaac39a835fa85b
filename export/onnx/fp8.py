"""FP8 (E4M3) export: Q/DQ pairs in the ONNX graphs, so TensorRT can run FP8 GEMMs.

The quantization is the one ``m3-trt build-engine`` uses (``m3_trt.quant.fp8``): decoder-layer
weights (attention, indexer projections, dense MLPs, shared and routed experts; never the
router) become E4M3 codes with one fp32 scale per output channel (or the checkpoint's own block
scales — not yet threaded through here, see the README); the inputs of every quantized linear
get a static per-tensor scale ``amax / 448`` from a calibration pass.

In the graph a quantized linear is ``DequantizeLinear(W_e4m3, s_w, axis=0)`` on the weight and
``QuantizeLinear → DequantizeLinear`` (E4M3, ``s_x``) on its input — the pattern TensorRT fuses into
an FP8 GEMM. Routed experts are stored as E4M3 codes ``[E·rows, cols]``, dequantized per
(expert, row) and reshaped to ``[E, rows, cols]``; their grouped GEMMs keep the activation dtype (the MoE
plugin on a GPU would take FP8 inputs; the CPU reference path does not).

Torch side: :func:`fp8_model` swaps those modules for :class:`Fp8Linear` / :class:`Fp8Experts`,
whose forward runs the *same* arithmetic through two small custom ops (``m3q::qdq_e4m3``,
``m3q::dequant_e4m3``) that export to exactly those ONNX nodes — so ONNX Runtime is checked
against torch with fp32 tolerances, and the model's own error is the FP8 one.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


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
        """``codes`` E4M3 ``[rows, cols]`` times ``scale [rows]``, in the scale's dtype."""
        return (codes.float() * scale.float()[:, None]).to(scale.dtype)

    @dequant_e4m3.register_fake
    def _(codes, scale):
        return codes.new_empty(codes.shape, dtype=scale.dtype)


def qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _register_ops()
    return torch.ops.m3q.qdq_e4m3(x, scale)


def dequant(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _register_ops()
    return torch.ops.m3q.dequant_e4m3(codes, scale)


class Fp8Linear(nn.Module):
    """``F.linear(qdq(x, act_scale), dequant(weight_e4m3, weight_scale))``; no bias (M3 has none)."""

    def __init__(self, weight: torch.Tensor, act_amax: float, dtype: torch.dtype):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=-1) / E4M3_MAX).clamp_min(1e-12)
        self.register_buffer("weight_e4m3", (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3))
        self.register_buffer("weight_scale", scale.to(dtype))
        self.register_buffer("act_scale", torch.tensor(max(act_amax, 1e-12) / E4M3_MAX, dtype=dtype))

    @property
    def weight(self) -> torch.Tensor:
        return dequant(self.weight_e4m3, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(qdq(x, self.act_scale), self.weight)


class Fp8Experts(nn.Module):
    """Routed experts as E4M3 codes ``[E·rows, cols]`` + per-(expert, row) scales; weight-only FP8.

    Stored flattened so the graph dequantizes with a per-axis DequantizeLinear (1-D scale) and
    reshapes the *dequantized* tensor: ONNX Runtime has no FP8 Reshape, and TensorRT refuses a
    Cast from FP8.
    """

    def __init__(self, experts: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.shapes = {}
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(experts, name).detach().float()
            self.shapes[name] = tuple(w.shape)
            w = w.reshape(-1, w.shape[-1])
            scale = (w.abs().amax(dim=-1) / E4M3_MAX).clamp_min(1e-12)
            self.register_buffer(f"{name}_e4m3", (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3))
            self.register_buffer(f"{name}_scale", scale.to(dtype))

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return dequant(self.gate_up_proj_e4m3, self.gate_up_proj_scale).reshape(self.shapes["gate_up_proj"])

    @property
    def down_proj(self) -> torch.Tensor:
        return dequant(self.down_proj_e4m3, self.down_proj_scale).reshape(self.shapes["down_proj"])


def fp8_model(model, calib_inputs: list[dict]) -> tuple[nn.Module, dict[str, float]]:
    """A copy of ``model`` with its FP8 weights as E4M3 codes and calibrated activation scales.

    Returns ``(model, act_amax)``; ``act_amax`` maps each quantized weight to the largest input
    magnitude seen on ``calib_inputs`` (the scale is ``amax / 448``).
    """
    from m3_trt.model.modeling import MoE
    from m3_trt.quant.fp8 import is_fp8_weight
    from m3_trt.quant.fp8 import calibrate

    observed = copy.deepcopy(model).float()
    emu = calibrate(observed, calib_inputs)
    del observed
    out = copy.deepcopy(model)
    dtype = out.lm_head.weight.dtype
    for name, module in list(out.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and is_fp8_weight(full + ".weight", child.weight) \
                    and full.startswith("model.language_model.layers."):
                setattr(module, child_name, Fp8Linear(child.weight, emu.amax[full + ".weight"], dtype))
        if isinstance(module, MoE) and is_fp8_weight(f"{name}.experts.gate_up_proj", module.experts.gate_up_proj):
            module.experts = Fp8Experts(module.experts, dtype)
    return out, dict(emu.amax)


# -- ONNX translations -----------------------------------------------------------------------------

def translation_table() -> dict:
    import onnx
    from onnxscript import opset20 as op

    _register_ops()
    zero = onnx.helper.make_tensor("zero_e4m3", onnx.TensorProto.FLOAT8E4M3FN, [], [0.0])

    def qdq_e4m3(x, scale):
        zp = op.Constant(value=zero)
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), scale, zp)

    def dequant_e4m3(codes, scale):
        # per-output-channel DequantizeLinear, no zero point (E4M3 codes are symmetric)
        return op.DequantizeLinear(codes, scale, axis=0)

    return {torch.ops.m3q.qdq_e4m3.default: qdq_e4m3, torch.ops.m3q.dequant_e4m3.default: dequant_e4m3}
