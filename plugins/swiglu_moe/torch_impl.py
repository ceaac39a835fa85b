"""SwiGLU-OAI MoE in torch with token permutation: one GEMM pair per non-empty expert.

Legend: T tokens, D hidden, E experts, F expert intermediate, K experts per token,
M = T * K routed (token, slot) pairs.

Routing is the reference's ``route``. The M (token, slot) pairs are sorted by expert (stable),
the tokens gathered once into ``x_MD`` in that order, and each expert with tokens runs
``swiglu(x_slice @ w13[e].T) @ w2[e].T`` on its contiguous slice; empty experts cost nothing
(one host sync reads the per-expert counts). Results are scaled by the routing weights and
summed back per token with ``index_add_``; the shared expert runs densely on all tokens.
Arithmetic and dtype flow follow the reference (GEMMs in the input dtype, routing weights fp32).
With an expert range (``El`` experts held, see ``reference.py``) the pairs routed outside it go
to one extra bin after the last held expert and are never computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import local_range, route, swiglu_oai


def permute_by_expert(experts_TK: torch.Tensor, n_experts: int):
    """Returns ``(order_M, tokens_M, counts_E)``: flat pair ids sorted by expert, their token ids,
    and how many pairs each expert received."""
    K = experts_TK.shape[1]
    flat = experts_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    return order, order // K, counts


def swiglu_moe_torch(
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
    held = local_range(router_w_ED.shape[0], w13_EFD.shape[0], expert_offset, expert_count)
    weights_TK, experts_TK = route(x_TD, router_w_ED, e_bias_E, top_k)
    El = len(held)
    local_TK = experts_TK - held.start
    local_TK = local_TK.masked_fill((local_TK < 0) | (local_TK >= El), El)  # bin El: not on this rank
    order, tokens, counts = permute_by_expert(local_TK, El + 1)
    counts = counts[:El].tolist()
    n_held = sum(counts)
    order, tokens = order[:n_held], tokens[:n_held]  # pairs of other ranks' experts sort last
    w_M = weights_TK.reshape(-1)[order]
    x_MD = x_TD[tokens]
    out = torch.zeros_like(x_TD)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sl = slice(start, start + n)
        start += n
        h = swiglu_oai(F.linear(x_MD[sl], w13_EFD[e]), alpha=alpha, limit=limit)
        y = F.linear(h, w2_EDF[e]) * w_M[sl, None]
        out.index_add_(0, tokens[sl], y.to(out.dtype))
    out = out * routed_scaling
    if w13s_FD is not None:
        out = out + F.linear(swiglu_oai(F.linear(x_TD, w13s_FD), alpha=alpha, limit=limit), w2s_DF)
    return out
