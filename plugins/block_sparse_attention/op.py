"""``torch.library`` custom op ``m3::block_sparse_attention``: one node under ``torch.export``.

``IMPLS`` is the table of implementations the op runs (``impl=`` picks one); the op's schema and
fake come from ``contract.py``. Importing this module registers the op.
"""

from __future__ import annotations

import torch

from .._contract import define_op
from .contract import CONTRACT
from .reference import block_sparse_attention_reference
from .torch_impl import block_sparse_attention_torch


def block_sparse_attention_triton_lazy(*args, **kwargs) -> torch.Tensor:
    # Lazy: triton is a heavy optional dependency, and TRITON_INTERPRET is read when the kernel
    # module is first imported. An ImportError here is real and propagates.
    from .triton_kernel import block_sparse_attention_triton

    return block_sparse_attention_triton(*args, **kwargs)


IMPLS = {
    "reference": block_sparse_attention_reference,
    "torch": block_sparse_attention_torch,
    "triton": block_sparse_attention_triton_lazy,
}

block_sparse_attention_op = define_op(CONTRACT, IMPLS)
