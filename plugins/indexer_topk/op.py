"""``torch.library`` custom op ``m3::indexer_topk``: one node under ``torch.export``.

Importing this module registers the op (that is its only purpose); the public function in
``__init__`` imports it on first use. ``impl`` picks ``reference`` | ``torch`` | ``triton``.
"""

from __future__ import annotations

import torch

from .._common import implementation


def _run(impl: str, *args, **kwargs) -> torch.Tensor:
    return implementation(__package__, "indexer_topk", impl)(*args, **kwargs)


@torch.library.custom_op("m3::indexer_topk", mutates_args=())
def indexer_topk_op(
    q_BHSD: torch.Tensor,
    k_BTD: torch.Tensor,
    q_pos_BS: torch.Tensor,
    block_size: int,
    topk: int,
    local_blocks: int,
    impl: str = "torch",
) -> torch.Tensor:
    return _run(impl, q_BHSD, k_BTD, q_pos_BS, block_size=block_size, topk=topk, local_blocks=local_blocks)


@indexer_topk_op.register_fake
def _(q_BHSD, k_BTD, q_pos_BS, block_size, topk, local_blocks, impl="torch"):
    B, H, S, _ = q_BHSD.shape
    n_blocks = (k_BTD.shape[1] + block_size - 1) // block_size
    return q_BHSD.new_empty((B, H, S, torch.sym_min(topk, n_blocks)), dtype=torch.int32)
