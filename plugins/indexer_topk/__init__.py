"""Lightning-indexer top-k block selection (``m3::indexer_topk``).

``indexer_topk`` checks its arguments and runs the custom op with the chosen implementation:
``reference`` (dense, readable spec), ``torch`` (query-chunked, no full score matrix) or
``triton`` (fused kernel; GPU, or CPU under ``TRITON_INTERPRET=1``). Importing the package
registers the op (``op.py``).
"""

from __future__ import annotations

import torch

from .._common import check_dims, check_impl, check_tensor, check_triton_device
from .._contract import Operator
from .contract import CONTRACT
from .op import IMPLS, indexer_topk_op
from .reference import indexer_topk_reference

INDEX_DTYPES = (torch.int32, torch.int64)


def indexer_topk(
    q_BHSD: torch.Tensor,
    k_BTD: torch.Tensor,
    q_pos_BS: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    local_blocks: int,
    impl: str = "reference",
) -> torch.Tensor:
    """Per (batch, indexer head, query) the selected key blocks: ``block_idx_BHSK`` int32,
    ``K = min(topk, ceil(T / block_size))``, valid ids ascending and left-packed, ``-1`` after.
    See ``reference.py`` for the formula."""
    check_impl(impl, IMPLS)
    check_tensor("q_BHSD", q_BHSD, 4)
    check_tensor("k_BTD", k_BTD, 3)
    check_tensor("q_pos_BS", q_pos_BS, 2, INDEX_DTYPES)
    B, H, S, D = q_BHSD.shape
    check_dims("k_BTD", k_BTD, {0: ("q_BHSD batch", B), 2: ("q_BHSD head dim", D)})
    check_dims("q_pos_BS", q_pos_BS, {0: ("q_BHSD batch", B), 1: ("q_BHSD queries", S)})
    if block_size <= 0 or topk <= 0 or local_blocks < 0:
        raise ValueError(f"need block_size > 0, topk > 0, local_blocks >= 0; got {block_size}, {topk}, {local_blocks}")
    if impl == "triton":
        check_triton_device("q_BHSD", q_BHSD)
    return indexer_topk_op(q_BHSD, k_BTD, q_pos_BS, block_size=int(block_size), topk=int(topk),
                           local_blocks=int(local_blocks), impl=impl)


# the reference has static shapes for a given T: it is what --plugins none exports
OPERATOR = Operator(CONTRACT, indexer_topk, IMPLS, portable=indexer_topk_reference)
