"""Shared bits of the plugin tests: the fixed seed and the Triton gate (metric: ``tolerances.py``)."""

from __future__ import annotations

import os

import pytest
import torch

from seeds import seed_everything


def fresh_seed() -> int:
    """Re-seed with the suite's fixed seed (``seeds.TEST_SEED``; ``M3_TEST_SEED=<n>`` picks another)
    and return it; tests put it in their messages."""
    return seed_everything()


HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(
    not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 exported before pytest starts",
)
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
