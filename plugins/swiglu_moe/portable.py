"""SwiGLU-OAI MoE with static shapes only: the standard-ONNX-ops fallback (``--plugins none``).

Same result as :func:`reference.swiglu_moe_reference`, but with no data-dependent shapes: the
routing becomes a dense combine matrix ``c_TE`` (renormalised weight where expert e was chosen
for token t, else 0) and every expert runs on every token. That costs ``E / top_k`` times the
routed FLOPs — acceptable for a portable graph, which is exactly why the plugin node exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import route, swiglu_oai


def swiglu_moe_portable(x_TD, router_w_ED, e_bias_E, w13_EFD, w2_EDF, w13s_FD, w2s_DF, *, top_k: int,
                        routed_scaling: float, alpha: float, limit: float,
                        expert_ids_E: torch.Tensor | None = None) -> torch.Tensor:
    """``expert_ids_E``: the global ids of the experts in ``w13_EFD`` / ``w2_EDF`` when they are a
    subset (one rank of expert parallelism: its partial sum); routing still sees every expert."""
    weights_TK, experts_TK = route(x_TD, router_w_ED, e_bias_E, top_k)
    combine_TE = torch.zeros(x_TD.shape[0], router_w_ED.shape[0], dtype=weights_TK.dtype, device=x_TD.device)
    combine_TE = combine_TE.scatter(1, experts_TK, weights_TK)
    if expert_ids_E is not None:
        combine_TE = combine_TE.index_select(1, expert_ids_E)
    h_ETF = swiglu_oai(torch.einsum("td,efd->etf", x_TD, w13_EFD), alpha=alpha, limit=limit)
    y_ETD = torch.einsum("etf,edf->etd", h_ETF, w2_EDF)
    out = torch.einsum("etd,te->td", y_ETD, combine_TE.to(y_ETD.dtype)) * routed_scaling
    if w13s_FD is not None:
        out = out + F.linear(swiglu_oai(F.linear(x_TD, w13s_FD), alpha=alpha, limit=limit), w2s_DF)
    return out.to(x_TD.dtype)
