"""The contract of ``m3::swiglu_moe`` (ONNX ``M3SwigluMoE``), expert range included.

Expert range (expert parallelism): ``w13_EFD`` / ``w2_EDF`` hold ``El`` experts, the global ids
``[expert_offset, expert_offset + El)``; routing always runs over all ``E`` experts of
``router_w_ED``. The output is then the partial sum of the rank's experts (plus the shared expert
when it is given), so the sum over ranks equals the full op. ``expert_count = -1`` (the default)
means "all experts": ``El`` must equal ``E``, so a rank-local weight slice passed without its
range is an error, not a silent wrong answer. The Triton kernel has no range of its own: the
dispatcher feeds it only the rank's (token, expert) pairs.
"""

from __future__ import annotations

import torch

from .._contract import AttrSpec, OpContract, TensorSpec


def output_shapes(dims, attrs, ops):
    return [list(dims[0])]  # y_TD: x's shape


def examples(g: torch.Generator) -> dict:
    T, D, E, F, Fs = 6, 16, 4, 8, 12

    def w(*shape, s=0.3):
        return torch.randn(*shape, generator=g) * s

    x, router, bias = w(T, D, s=1.0), w(E, D), w(E, s=0.1)
    w13, w2 = w(E, 2 * F, D), w(E, D, F)
    attrs = {"top_k": 2, "routed_scaling": 2.0, "alpha": 1.702, "limit": 7.0}
    return {
        "T6-D16-E4-F8-Fs12-top2": ([x, router, bias, w13, w2, w(2 * Fs, D), w(D, Fs)], attrs),
        # rank 1 of 2: experts [2, 4), no shared expert (zero-width shared weights)
        "T6-D16-E4of2-F8-Fs0-top2-rank1": ([x, router, bias, w13[2:], w2[2:], w(0, D), w(D, 0)],
                                            dict(attrs, expert_offset=2, expert_count=2)),
    }


CONTRACT = OpContract(
    name="swiglu_moe",
    onnx_op_type="M3SwigluMoE",
    doc="Sigmoid-routed SwiGLU-OAI MoE with a shared expert (see plugins/swiglu_moe/reference.py).",
    inputs=(TensorSpec("x_TD", "float", "T D"),
            TensorSpec("router_w_ED", "float", "E D"),
            TensorSpec("e_bias_E", "float", "E"),
            TensorSpec("w13_EFD", "float", "El 2F D"),
            TensorSpec("w2_EDF", "float", "El D F"),
            TensorSpec("w13s_FD", "float", "2Fs D", optional=True),
            TensorSpec("w2s_DF", "float", "D Fs", optional=True)),
    outputs=(TensorSpec("y_TD", "float", "T D"),),
    attrs=(AttrSpec("top_k", "int", 4, "experts per token"),
           AttrSpec("routed_scaling", "float", 2.0, "routed scaling factor"),
           AttrSpec("alpha", "float", 1.702, "SwiGLU-OAI sigmoid gain"),
           AttrSpec("limit", "float", 7.0, "SwiGLU-OAI clamp"),
           AttrSpec("expert_offset", "int", 0, "global id of w13_EFD's first expert"),
           AttrSpec("expert_count", "int", -1, "experts in w13_EFD (-1: all E, no range)")),
    output_shapes=output_shapes,
    examples=examples,
)
