"""Look inside the torch reference without editing it: wrap its plugin dispatch.

``m3_trt.model.modeling`` reaches every plugin (indexer top-k, block-sparse attention, MoE) through the
module-level function ``_op(name, impl)``. ``intercept_ops({name: wrap})`` replaces that function
for the duration of a ``with`` block so ``_op(name, ...)`` returns ``wrap(original_fn)``; it is
restored on exit, also on errors. Not thread-safe (it patches a module global); compare runs one
model at a time.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch


@contextmanager
def intercept_ops(wrappers: dict[str, Callable[[Callable], Callable]]) -> Iterator[None]:
    import m3_trt.model.modeling as model_mod

    original = model_mod._op

    def patched(name: str, impl: str):
        fn = original(name, impl)
        return wrappers[name](fn) if name in wrappers else fn

    model_mod._op = patched
    try:
        yield
    finally:
        model_mod._op = original


@contextmanager
def record_block_choices() -> Iterator[list[torch.Tensor]]:
    """Collect each ``indexer_topk`` output (``block_idx_BGSK`` int32) in call order.

    One full forward calls it once per sparse layer, in layer order; the caller maps the list
    onto the sparse layer indices.
    """
    seen: list[torch.Tensor] = []

    def wrap(fn):
        def recording(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen.append(out.detach().clone())
            return out
        return recording

    with intercept_ops({"indexer_topk": wrap}):
        yield seen
