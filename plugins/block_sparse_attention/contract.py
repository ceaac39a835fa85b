"""The contract of ``m3::block_sparse_attention`` (ONNX ``M3BlockSparseAttention``).

``scale`` has no default: the softmax scale depends on the head dim (``D ** -0.5`` in M3), and a
default of 1.0 would silently compute a different attention.
"""

from __future__ import annotations

import torch

from .._contract import AttrSpec, OpContract, TensorSpec


def output_shapes(dims, attrs, ops):
    return [list(dims[0])]  # out_BHSD: q's shape


def examples(g: torch.Generator) -> dict:
    B, Hq, G, S, T, D, bs = 1, 4, 2, 3, 48, 16, 16
    pos = torch.arange(T - S, T)[None]
    idx = torch.tensor([[0, 2, -1], [1, 2, -1], [0, 1, 2]], dtype=torch.int32)[None, None].expand(B, G, S, 3)
    inputs = [torch.randn(B, Hq, S, D, generator=g), torch.randn(B, G, T, D, generator=g),
              torch.randn(B, G, T, D, generator=g), idx.contiguous(), pos]
    return {"B1-Hq4-G2-S3-T48-blk16-K3": (inputs, {"scale": D ** -0.5, "block_size": bs})}


CONTRACT = OpContract(
    name="block_sparse_attention",
    onnx_op_type="M3BlockSparseAttention",
    doc="GQA attention over the selected key blocks (see plugins/block_sparse_attention/reference.py).",
    inputs=(TensorSpec("q_BHSD", "float", "B Hq S D"),
            TensorSpec("k_BGTD", "float", "B G T D"),
            TensorSpec("v_BGTD", "float", "B G T D"),
            TensorSpec("block_idx_BGSK", "int32", "B G S K"),
            TensorSpec("q_pos_BS", "int64", "B S")),
    outputs=(TensorSpec("out_BHSD", "float", "B Hq S D"),),
    # required attributes first (they come before defaulted ones in the torch schema)
    attrs=(AttrSpec("scale", "float", None, "softmax scale (D ** -0.5 in M3)"),
           AttrSpec("block_size", "int", 128, "key slots per block")),
    output_shapes=output_shapes,
    examples=examples,
)
