"""``torch.library`` custom op ``m3::swiglu_moe``: routing + experts + shared expert, one node.

``IMPLS`` is the table of implementations the op runs (``impl=`` picks one); the op's schema and
fake come from ``contract.py``. The op hides the data-dependent expert loop from
``torch.export``. Importing this module registers the op.
"""

from __future__ import annotations

import torch

from .._contract import define_op
from .contract import CONTRACT
from .reference import local_range, route, swiglu_moe_reference
from .torch_impl import swiglu_moe_torch


def swiglu_moe_triton_lazy(x_TD, router_w_ED, e_bias_E, w13_EFD, w2_EDF, w13s_FD, w2s_DF, *, top_k: int,
                           routed_scaling: float, alpha: float, limit: float, expert_offset: int = 0,
                           expert_count: int = -1) -> torch.Tensor:
    """The Triton kernels; with an expert range (the kernel has none) only the rank's
    (token, expert) pairs go through its grouped GEMMs, as ``K = 1`` rows of a gathered ``x``."""
    # Lazy: triton is a heavy optional dependency, and TRITON_INTERPRET is read when the kernel
    # module is first imported. An ImportError here is real and propagates.
    from .triton_kernel import grouped_swiglu_mlp, shared_expert, swiglu_moe_triton

    held = local_range(router_w_ED.shape[0], w13_EFD.shape[0], expert_offset, expert_count)
    kw = dict(top_k=top_k, routed_scaling=routed_scaling, alpha=alpha, limit=limit)
    if len(held) == router_w_ED.shape[0]:
        return swiglu_moe_triton(x_TD, router_w_ED, e_bias_E, w13_EFD, w2_EDF, w13s_FD, w2s_DF, **kw)
    weights_TK, experts_TK = route(x_TD, router_w_ED, e_bias_E, top_k)
    local_TK = experts_TK - held.start
    tok_M, slot_M = torch.nonzero((local_TK >= 0) & (local_TK < len(held)), as_tuple=True)
    y_M1D = grouped_swiglu_mlp(x_TD[tok_M], w13_EFD, w2_EDF, weights_TK[tok_M, slot_M][:, None],
                               local_TK[tok_M, slot_M][:, None], alpha=alpha, limit=limit)
    routed = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device).index_add_(0, tok_M, y_M1D[:, 0])
    out = routed.to(x_TD.dtype) * routed_scaling
    if w13s_FD is not None:
        out = out + shared_expert(x_TD, w13s_FD, w2s_DF, alpha=alpha, limit=limit)
    return out


IMPLS = {"reference": swiglu_moe_reference, "torch": swiglu_moe_torch, "triton": swiglu_moe_triton_lazy}

swiglu_moe_op = define_op(CONTRACT, IMPLS)
