"""The contract of ``m3::indexer_topk`` (ONNX ``M3IndexerTopK``): inputs, attributes, output width.

Output width rule (one rule, every runtime): ``K = min(topk, ceil(T / block_size))``, valid
block ids ascending and left-packed, ``-1`` after. A cache shorter than ``topk`` blocks gives a
narrower output instead of columns that could never hold a block; with a static cache (every
exported engine) ``T`` is fixed, so ``K`` is a constant.
"""

from __future__ import annotations

import torch

from .._contract import AttrSpec, OpContract, TensorSpec


def output_shapes(dims, attrs, ops):
    q_BHSD, k_BTD, _q_pos_BS = dims
    n_blocks = ops.ceil_div(k_BTD[1], ops.const(attrs["block_size"]))
    return [[q_BHSD[0], q_BHSD[1], q_BHSD[2], ops.min(ops.const(attrs["topk"]), n_blocks)]]


def examples(g: torch.Generator) -> dict:
    def case(B, H, S, T, D, **attrs):
        pos = torch.arange(T - S, T)[None].expand(B, S).contiguous()
        return [torch.randn(B, H, S, D, generator=g), torch.randn(B, T, D, generator=g), pos], attrs

    return {"B1-H2-S5-T40-blk16-top8-narrow": case(1, 2, 5, 40, 16, block_size=16, topk=8, local_blocks=1),
            "B2-H2-S3-T100-blk16-top4": case(2, 2, 3, 100, 16, block_size=16, topk=4, local_blocks=2)}


CONTRACT = OpContract(
    name="indexer_topk",
    onnx_op_type="M3IndexerTopK",
    doc="Lightning-indexer top-k key-block selection (see plugins/indexer_topk/reference.py).",
    inputs=(TensorSpec("q_BHSD", "float", "B H S D"),
            TensorSpec("k_BTD", "float", "B T D"),
            TensorSpec("q_pos_BS", "int64", "B S")),
    outputs=(TensorSpec("block_idx_BHSK", "int32", "B H S K"),),
    attrs=(AttrSpec("block_size", "int", 128, "key slots per block"),
           AttrSpec("topk", "int", 16, "blocks kept per (query, head)"),
           AttrSpec("local_blocks", "int", 1, "blocks ending at the query's own, always kept")),
    output_shapes=output_shapes,
    examples=examples,
)
