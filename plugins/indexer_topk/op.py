"""``torch.library`` custom op ``m3::indexer_topk``: one node under ``torch.export``.

``IMPLS`` is the table of implementations the op runs (``impl=`` picks one); the op's schema and
fake come from ``contract.py``. Importing this module registers the op.
"""

from __future__ import annotations

import torch

from .._contract import define_op
from .contract import CONTRACT
from .reference import indexer_topk_reference
from .torch_impl import indexer_topk_torch


def indexer_topk_triton_lazy(*args, **kwargs) -> torch.Tensor:
    # Lazy: triton is a heavy optional dependency, and TRITON_INTERPRET is read when the kernel
    # module is first imported. An ImportError here is real and propagates.
    from .triton_kernel import indexer_topk_triton

    return indexer_topk_triton(*args, **kwargs)


IMPLS = {"reference": indexer_topk_reference, "torch": indexer_topk_torch, "triton": indexer_topk_triton_lazy}

indexer_topk_op = define_op(CONTRACT, IMPLS)
