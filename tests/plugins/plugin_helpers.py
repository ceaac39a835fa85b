"""Shared bits of the plugin tests: fresh seeds and the Triton gate (metric: ``tolerances.py``)."""

from __future__ import annotations

import os
import time

import pytest
import torch


def fresh_seed() -> int:
    """A new seed each run (``M3_TEST_SEED=<n>`` reproduces one); tests put it in their messages."""
    env = os.environ.get("M3_TEST_SEED")
    seed = int(env) if env else time.time_ns() % (2**31)
    torch.manual_seed(seed)
    return seed


HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(
    not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 exported before pytest starts",
)
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
