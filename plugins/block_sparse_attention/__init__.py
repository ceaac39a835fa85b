"""Block-sparse GQA attention over indexer-selected key blocks (``m3::block_sparse_attention``).

``block_sparse_attention`` checks its arguments and runs the custom op with the chosen
implementation: ``reference`` (dense ``[B, Hq, S, T]`` mask, the spec), ``torch`` (gathers the
selected blocks, memory linear in S) or ``triton`` (one program per query x KV group, split-K for
decode). Importing the package
registers the op (``op.py``).
"""

from __future__ import annotations

import torch

from .._common import check_dims, check_impl, check_tensor, check_triton_device
from .._contract import Operator
from .contract import CONTRACT
from .op import IMPLS, block_sparse_attention_op
from .reference import block_sparse_attention_reference

INDEX_DTYPES = (torch.int32, torch.int64)


def block_sparse_attention(
    q_BHSD: torch.Tensor,
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    block_idx_BGSK: torch.Tensor,
    q_pos_BS: torch.Tensor,
    *,
    block_size: int,
    scale: float,
    impl: str = "reference",
) -> torch.Tensor:
    """``out_BHSD``: attention of each query over the slots of its selected blocks with
    ``slot <= q_pos`` (key slot == absolute position). See ``reference.py`` for the formula."""
    check_impl(impl, IMPLS)
    check_tensor("q_BHSD", q_BHSD, 4)
    check_tensor("k_BGTD", k_BGTD, 4, (q_BHSD.dtype,))
    check_tensor("v_BGTD", v_BGTD, 4, (q_BHSD.dtype,))
    check_tensor("block_idx_BGSK", block_idx_BGSK, 4, INDEX_DTYPES)
    check_tensor("q_pos_BS", q_pos_BS, 2, INDEX_DTYPES)
    B, Hq, S, D = q_BHSD.shape
    G, T = k_BGTD.shape[1], k_BGTD.shape[2]
    check_dims("k_BGTD", k_BGTD, {0: ("q_BHSD batch", B), 3: ("q_BHSD head dim", D)})
    check_dims("v_BGTD", v_BGTD, {0: ("q_BHSD batch", B), 1: ("k_BGTD groups", G), 2: ("k_BGTD slots", T),
                                  3: ("q_BHSD head dim", D)})
    if G == 0 or Hq % G != 0:
        raise ValueError(f"query heads {Hq} (q_BHSD {tuple(q_BHSD.shape)}) must be a multiple of KV heads {G} "
                         f"(k_BGTD {tuple(k_BGTD.shape)})")
    check_dims("block_idx_BGSK", block_idx_BGSK, {0: ("q_BHSD batch", B), 1: ("k_BGTD groups", G),
                                                  2: ("q_BHSD queries", S)})
    check_dims("q_pos_BS", q_pos_BS, {0: ("q_BHSD batch", B), 1: ("q_BHSD queries", S)})
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    if impl == "triton":
        check_triton_device("q_BHSD", q_BHSD)
    return block_sparse_attention_op(q_BHSD, k_BGTD, v_BGTD, block_idx_BGSK, q_pos_BS, scale=float(scale),
                                     block_size=int(block_size), impl=impl)


# the dense-mask reference has static shapes: it is what --plugins none exports
OPERATOR = Operator(CONTRACT, block_sparse_attention, IMPLS, portable=block_sparse_attention_reference)
