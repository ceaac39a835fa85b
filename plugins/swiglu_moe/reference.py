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

Expert range (one rank of expert parallelism): ``w13_EFD`` / ``w2_EDF`` may hold only ``El``
experts, the global ids ``[expert_offset, expert_offset + El)``. Routing still runs over all ``E``
router rows; the sum over ``k`` keeps only the chosen experts inside the range. Summed over ranks
that partition ``[0, E)`` (the shared expert given on one of them) this is the full op.
``expert_count = -1`` means no range: ``El`` must be ``E``.
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


def local_range(n_router: int, n_weights: int, expert_offset: int, expert_count: int) -> range:
    """The global expert ids held in ``w13_EFD`` (``n_weights`` of them); raises ``ValueError``
    naming the attribute when the range does not fit the router's ``n_router`` experts."""
    if expert_count == -1:
        if expert_offset != 0 or n_weights != n_router:
            raise ValueError(
                f"w13_EFD holds {n_weights} experts and router_w_ED routes over {n_router} with "
                f"expert_offset={expert_offset}, expert_count=-1 (all): pass the rank's range as "
                "expert_offset / expert_count")
        return range(n_router)
    if expert_count != n_weights:
        raise ValueError(f"expert_count={expert_count} but w13_EFD holds {n_weights} experts")
    if expert_offset < 0 or expert_offset + expert_count > n_router:
        raise ValueError(f"expert range [{expert_offset}, {expert_offset + expert_count}) is outside "
                         f"the router's {n_router} experts")
    return range(expert_offset, expert_offset + expert_count)


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
    expert_offset: int = 0,
    expert_count: int = -1,
) -> torch.Tensor:
    """Expert loop spec (each expert's tokens gathered, computed, scattered back)."""
    experts_held = local_range(router_w_ED.shape[0], w13_EFD.shape[0], expert_offset, expert_count)
    weights, experts = route(x_TD, router_w_ED, e_bias_E, top_k)
    out = torch.zeros_like(x_TD)
    for el, e in enumerate(experts_held):
        tok, slot = torch.where(experts == e)
        if tok.numel() == 0:
            continue
        h = swiglu_oai(F.linear(x_TD[tok], w13_EFD[el]), alpha=alpha, limit=limit)
        y = F.linear(h, w2_EDF[el]) * weights[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    out = out * routed_scaling
    if w13s_FD is not None:
        out = out + F.linear(swiglu_oai(F.linear(x_TD, w13s_FD), alpha=alpha, limit=limit), w2s_DF)
    return out
