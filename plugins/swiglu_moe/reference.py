"""SwiGLU-OAI mixture of experts with sigmoid routing: the readable spec.

Legend: T tokens, D hidden, E experts, F expert intermediate, Fs shared-expert intermediate,
K experts per token.

    logits = x @ router_w.T                                   [T, E]
    p = sigmoid(logits)                     (fp32)
    choice = topk(p + e_bias, K)            (bias only chooses)
    w = p[choice] / sum(p[choice])          (renormalised)
    swiglu(g, u) = min(g, limit) * sigmoid(alpha * min(g, limit)) * (clamp(u, -limit, limit) + 1)
    expert_e(x) = swiglu(split(x @ w13[e].T)) @ w2[e].T        (w13 = [gate; up] halves, not interleaved)
    y = routed_scaling * sum_k w_k * expert_{choice_k}(x) + shared(x)

Weights: ``w13_EFD`` is ``[E, 2F, D]`` (gate rows first), ``w2_EDF`` is ``[E, D, F]``;
the shared expert is the same SwiGLU-OAI MLP with ``w13s_FD`` ``[2Fs, D]`` and ``w2s_DF`` ``[D, Fs]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_oai(gate_up: torch.Tensor, *, alpha: float, limit: float) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1.0) * (gate * torch.sigmoid(gate * alpha))


def route(x_TD: torch.Tensor, router_w_ED: torch.Tensor, e_bias_E: torch.Tensor, top_k: int):
    """Returns ``(weights_TK fp32, experts_TK int64)``; weights renormalised, not yet scaled."""
    logits = F.linear(x_TD.to(router_w_ED.dtype), router_w_ED)
    probs = torch.sigmoid(logits.float())
    _, experts = torch.topk(probs + e_bias_E, top_k, dim=-1, sorted=False)
    weights = probs.gather(1, experts)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def swiglu_moe_reference(
    x_TD: torch.Tensor,
    router_w_ED: torch.Tensor,
    e_bias_E: torch.Tensor,
    w13_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w13s_FD: torch.Tensor | None,
    w2s_DF: torch.Tensor | None,
    *,
    top_k: int,
    routed_scaling: float,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """Expert loop spec (each expert's tokens gathered, computed, scattered back)."""
    weights, experts = route(x_TD, router_w_ED, e_bias_E, top_k)
    out = torch.zeros_like(x_TD)
    for e in range(w13_EFD.shape[0]):
        tok, slot = torch.where(experts == e)
        if tok.numel() == 0:
            continue
        h = swiglu_oai(F.linear(x_TD[tok], w13_EFD[e]), alpha=alpha, limit=limit)
        y = F.linear(h, w2_EDF[e]) * weights[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    out = out * routed_scaling
    if w13s_FD is not None:
        out = out + F.linear(swiglu_oai(F.linear(x_TD, w13s_FD), alpha=alpha, limit=limit), w2s_DF)
    return out
