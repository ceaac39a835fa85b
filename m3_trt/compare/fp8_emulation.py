"""FP8 (E4M3) emulation of the torch reference: quantize → dequantize, computed in the model dtype.

What an FP8 deployment rounds, reproduced on CPU so its accuracy can be read before any engine:

* weights: every ``nn.Linear`` (text decoder, indexer, shared experts, vision tower, projector) and
  the routed experts' ``gate_up_proj [E, 2F, D]`` / ``down_proj [E, D, F]``, **per output channel**:
  ``scale = amax over the input dim / 448``, ``w ← e4m3(w / scale) · scale`` (in place, once);
* activations: the input of every such ``nn.Linear``, **per tensor** with a dynamic scale
  (``amax(|x|) / 448`` of that call), and inside the MoE the experts' input and each expert's
  SwiGLU output (one scale per expert GEMM, as grouped FP8 GEMMs keep per-expert input scales).

Kept in high precision, as FP8 recipes do: the LM head, the MoE router (routing reads the
unquantized activations), embeddings, norms, the vision patch embedding (a Conv3d), attention
softmax and the indexer's scores.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``e4m3(x / scale) · scale`` in ``x.dtype`` (``scale`` broadcasts against ``x``)."""
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


def fake_quant_per_channel(w: torch.Tensor) -> torch.Tensor:
    """Per output channel: one scale per row over the last (input) dimension."""
    scale = w.detach().float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    return fake_quant(w, scale)


def fake_quant_per_tensor(x: torch.Tensor) -> torch.Tensor:
    """One dynamic scale for the whole tensor."""
    scale = x.detach().float().abs().amax().clamp_min(1e-12) / E4M3_MAX
    return fake_quant(x, scale)


def _linears(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip]


@torch.no_grad()
def quantize_weights_(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace weights by their FP8 round trip, in place. Returns the quantized parameter names."""
    from m3_trt.model import Experts

    done = []
    for name, lin in _linears(model, skip):
        lin.weight.copy_(fake_quant_per_channel(lin.weight))
        done.append(f"{name}.weight")
    for name, m in model.named_modules():
        if isinstance(m, Experts):
            m.gate_up_proj.copy_(fake_quant_per_channel(m.gate_up_proj))
            m.down_proj.copy_(fake_quant_per_channel(m.down_proj))
            done += [f"{name}.gate_up_proj", f"{name}.down_proj"]
    return done


def fp8_swiglu_moe(x_TD, router_w_ED, e_bias_E, w13_EFD, w2_EDF, w13s_FD, w2s_DF, *, top_k, routed_scaling,
                   alpha, limit):
    """``swiglu_moe_reference`` with FP8 activations into every expert GEMM (router unquantized)."""
    from m3_trt.plugins.swiglu_moe.reference import route, swiglu_oai

    weights, experts = route(x_TD, router_w_ED, e_bias_E, top_k)
    xq = fake_quant_per_tensor(x_TD)
    out = torch.zeros_like(x_TD)
    for e in range(w13_EFD.shape[0]):
        tok, slot = torch.where(experts == e)
        if tok.numel() == 0:
            continue
        h = swiglu_oai(F.linear(xq[tok], w13_EFD[e]), alpha=alpha, limit=limit)
        y = F.linear(fake_quant_per_tensor(h), w2_EDF[e]) * weights[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    out = out * routed_scaling
    if w13s_FD is not None:
        hs = swiglu_oai(F.linear(xq, w13s_FD), alpha=alpha, limit=limit)
        out = out + F.linear(fake_quant_per_tensor(hs), w2s_DF)
    return out


@contextmanager
def fp8_activations(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> Iterator[None]:
    """Quantize Linear inputs (forward pre-hooks) and MoE activations while the block runs."""
    from .intercept import intercept_ops

    handles = [lin.register_forward_pre_hook(lambda _m, args: (fake_quant_per_tensor(args[0]), *args[1:]))
               for _, lin in _linears(model, skip)]
    try:
        with intercept_ops({"swiglu_moe": lambda _fn: fp8_swiglu_moe}):
            yield
    finally:
        for h in handles:
            h.remove()
