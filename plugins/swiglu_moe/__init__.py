"""SwiGLU-OAI mixture of experts with sigmoid routing and a shared expert (``m3::swiglu_moe``).

``swiglu_moe`` checks its arguments and runs the custom op with the chosen implementation:
``reference`` (expert loop, the spec), ``torch`` (tokens sorted by expert, one GEMM pair per
non-empty expert) or ``triton`` (grouped GEMMs, SwiGLU fused in the first). Importing the
package registers the op (``op.py``).
"""

from __future__ import annotations

import torch

from .._common import check_dims, check_impl, check_tensor, check_triton_device
from .._contract import Operator
from .contract import CONTRACT
from .op import IMPLS, swiglu_moe_op
from .portable import swiglu_moe_portable
from .reference import local_range

_DEFAULT = CONTRACT.defaults


def swiglu_moe(
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
    expert_offset: int = _DEFAULT["expert_offset"],
    expert_count: int = _DEFAULT["expert_count"],
    impl: str = "reference",
) -> torch.Tensor:
    """``y_TD`` in ``x``'s dtype. ``w13_EFD`` is ``[El, 2F, D]`` (gate rows, then up rows),
    ``w2_EDF`` ``[El, D, F]``; the shared expert (``w13s_FD`` ``[2Fs, D]``, ``w2s_DF`` ``[D, Fs]``)
    is optional (both or neither). ``El`` is all ``E`` router experts, or with an expert range
    the ``expert_count`` experts from global id ``expert_offset`` (the output is then their
    partial sum). See ``reference.py`` for the formula."""
    check_impl(impl, IMPLS)
    check_tensor("x_TD", x_TD, 2)
    check_tensor("router_w_ED", router_w_ED, 2)
    check_tensor("e_bias_E", e_bias_E, 1)
    check_tensor("w13_EFD", w13_EFD, 3, (x_TD.dtype,))
    check_tensor("w2_EDF", w2_EDF, 3, (x_TD.dtype,))
    T, D = x_TD.shape
    E, El, F2 = router_w_ED.shape[0], w13_EFD.shape[0], w13_EFD.shape[1]
    check_dims("router_w_ED", router_w_ED, {1: ("x_TD hidden", D)})
    check_dims("e_bias_E", e_bias_E, {0: ("router_w_ED experts", E)})
    local_range(E, El, expert_offset, expert_count)
    if F2 % 2:
        raise ValueError(f"w13_EFD {tuple(w13_EFD.shape)}: dim 1 must be 2F (gate and up halves)")
    check_dims("w13_EFD", w13_EFD, {2: ("x_TD hidden", D)})
    check_dims("w2_EDF", w2_EDF, {0: ("w13_EFD experts", El), 1: ("x_TD hidden", D), 2: ("w13_EFD F", F2 // 2)})
    if (w13s_FD is None) != (w2s_DF is None):
        raise ValueError("w13s_FD and w2s_DF: give both (shared expert) or neither")
    if w13s_FD is not None:
        check_tensor("w13s_FD", w13s_FD, 2, (x_TD.dtype,))
        check_tensor("w2s_DF", w2s_DF, 2, (x_TD.dtype,))
        Fs2 = w13s_FD.shape[0]
        if Fs2 % 2:
            raise ValueError(f"w13s_FD {tuple(w13s_FD.shape)}: dim 0 must be 2Fs (gate and up halves)")
        check_dims("w13s_FD", w13s_FD, {1: ("x_TD hidden", D)})
        check_dims("w2s_DF", w2s_DF, {0: ("x_TD hidden", D), 1: ("w13s_FD Fs", Fs2 // 2)})
    if not 0 < top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}], got {top_k}")
    if impl == "triton":
        check_triton_device("x_TD", x_TD)
    return swiglu_moe_op(x_TD, router_w_ED, e_bias_E, w13_EFD, w2_EDF, w13s_FD, w2s_DF, top_k=int(top_k),
                         routed_scaling=float(routed_scaling), alpha=float(alpha), limit=float(limit),
                         expert_offset=int(expert_offset), expert_count=int(expert_count), impl=impl)


OPERATOR = Operator(CONTRACT, swiglu_moe, IMPLS, portable=swiglu_moe_portable)
