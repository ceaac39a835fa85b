"""``torch.library`` custom op ``m3::block_sparse_attention``: one node under ``torch.export``.

Importing this module registers the op (that is its only purpose); the public function in
``__init__`` imports it on first use. ``impl`` picks ``reference`` | ``torch`` | ``triton``.
"""

from __future__ import annotations

import torch

from .._common import implementation


def _run(impl: str, *args, **kwargs) -> torch.Tensor:
    return implementation(__package__, "block_sparse_attention", impl)(*args, **kwargs)


@torch.library.custom_op("m3::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
    q_BHSD: torch.Tensor,
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    block_idx_BGSK: torch.Tensor,
    q_pos_BS: torch.Tensor,
    block_size: int,
    scale: float,
    impl: str = "torch",
) -> torch.Tensor:
    return _run(impl, q_BHSD, k_BGTD, v_BGTD, block_idx_BGSK, q_pos_BS, block_size=block_size, scale=scale)


@block_sparse_attention_op.register_fake
def _(q_BHSD, k_BGTD, v_BGTD, block_idx_BGSK, q_pos_BS, block_size, scale, impl="torch"):
    return torch.empty_like(q_BHSD)
