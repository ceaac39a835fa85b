"""``torch.library`` custom op ``m3::swiglu_moe``: routing + experts + shared expert, one node.

Importing this module registers the op (that is its only purpose); the public function in
``__init__`` imports it on first use. ``impl`` picks ``reference`` | ``torch`` | ``triton``.
The op hides the data-dependent expert loop from ``torch.export``.
"""

from __future__ import annotations

import torch

from .._common import implementation


def _run(impl: str, *args, **kwargs) -> torch.Tensor:
    return implementation(__package__, "swiglu_moe", impl)(*args, **kwargs)


@torch.library.custom_op("m3::swiglu_moe", mutates_args=())
def swiglu_moe_op(
    x_TD: torch.Tensor,
    router_w_ED: torch.Tensor,
    e_bias_E: torch.Tensor,
    w13_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w13s_FD: torch.Tensor | None,
    w2s_DF: torch.Tensor | None,
    top_k: int,
    routed_scaling: float,
    alpha: float,
    limit: float,
    impl: str = "torch",
) -> torch.Tensor:
    return _run(impl, x_TD, router_w_ED, e_bias_E, w13_EFD, w2_EDF, w13s_FD, w2s_DF,
                top_k=top_k, routed_scaling=routed_scaling, alpha=alpha, limit=limit)


@swiglu_moe_op.register_fake
def _(x_TD, router_w_ED, e_bias_E, w13_EFD, w2_EDF, w13s_FD, w2s_DF, top_k, routed_scaling, alpha, limit, impl="torch"):
    return torch.empty_like(x_TD)
