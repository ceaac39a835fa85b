"""Lazy import of TensorRT: the standard ``tensorrt`` package first, then TensorRT-RTX.

``tensorrt`` is what GPU hosts with NVIDIA's index have; ``tensorrt_rtx_bindings``
(PyPI ``tensorrt-rtx-cu13-bindings`` + ``-libs``) is what installs on the CPU machines and
builds engines without a GPU. Both expose the same Python API for everything used here
(``Builder``, ``OnnxParser``, ``INetworkDefinition.add_*``, ``IPluginV3``), except that
TensorRT-RTX networks are always strongly typed (no FP16/BF16 builder flags).

Nothing is imported at module import time.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from types import ModuleType

CANDIDATES = ("tensorrt", "tensorrt_rtx_bindings")


class TensorRTUnavailable(ImportError):
    """Neither ``tensorrt`` nor ``tensorrt_rtx_bindings`` could be imported."""


@lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str]:
    reasons = []
    for name in CANDIDATES:
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # a stub wheel raises at import, not ImportError only
            reasons.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if not hasattr(mod, "Builder"):
            # the TensorRT lean-runtime wheel imports but has no builder
            reasons.append(f"{name}: imported but has no Builder (runtime-only wheel?)")
            continue
        return mod, name
    msg = (
        "TensorRT is not available. Tried " + "; ".join(reasons) + ". Install the standard "
        "'tensorrt' package from NVIDIA's index on a GPU host, or on any machine "
        "'pip install tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116' "
        "(the m3-trt[export] extra)."
    )
    return None, msg


def trt_available() -> bool:
    """True when a TensorRT with a builder can be imported."""
    return _load()[0] is not None


def trt_unavailable_reason() -> str:
    """Why TensorRT is missing ('' when it is available)."""
    mod, info = _load()
    return "" if mod is not None else info


def import_trt() -> ModuleType:
    """The TensorRT module (``tensorrt`` preferred); raises TensorRTUnavailable saying what is missing."""
    mod, info = _load()
    if mod is None:
        raise TensorRTUnavailable(info)
    return mod


def backend_name() -> str:
    """'tensorrt 10.x' or 'tensorrt_rtx_bindings 1.7.1.116'."""
    mod, info = _load()
    if mod is None:
        return "none"
    return f"{info} {getattr(mod, '__version__', '?')}"


def is_rtx(trt: ModuleType) -> bool:
    """TensorRT-RTX: always strongly typed, JIT-compiles kernels on the target GPU."""
    return trt.__name__.startswith("tensorrt_rtx")
