"""Small helpers shared by the operator folders: argument checks.

Implementations are not looked up here: each folder's ``op.py`` holds its ``IMPLS`` table and
``plugins/registry.py`` lists the operators.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_impl(impl: str, impls: Iterable[str]) -> None:
    impls = tuple(impls)
    if impl not in impls:
        raise ValueError(f"impl must be one of {impls}, got {impl!r}")


def check_tensor(
    name: str,
    t: torch.Tensor,
    ndim: int,
    dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
) -> None:
    """Raise ``ValueError`` naming the tensor and its shape when rank or dtype is wrong."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype} (shape {tuple(t.shape)}); expected one of {dtypes}")


def check_dims(name: str, t: torch.Tensor, expected: dict[int, tuple[str, int]]) -> None:
    """``expected`` maps a dim index to (what it must equal, its value)."""
    for dim, (what, value) in expected.items():
        if t.shape[dim] != value:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: dim {dim} must equal {what} = {value}")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (read, never set, here)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_device(name: str, t: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors with the interpreter switched on."""
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"impl='triton' got {name} on {t.device}: use CUDA tensors, or export TRITON_INTERPRET=1 "
            "before Python starts to run the kernels in Triton's CPU interpreter"
        )
