"""The suite's one fixed seed: every test starts from it (``tests/conftest.py``'s autouse ``seed``).

``TEST_SEED`` seeds torch (CPU and CUDA), ``random`` and numpy's global generators before each test
and is printed, so a failure's captured output names it; ``M3_TEST_SEED=<n>`` runs the suite from
another seed (to look for a seed-dependent failure, never to pick a passing one). Tests that need
their own stream use ``torch.Generator().manual_seed(<constant>)`` beside the data they draw.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

TEST_SEED = int(os.environ.get("M3_TEST_SEED", "0"))


def seed_everything(seed: int = TEST_SEED) -> int:
    """Seed torch, ``random`` and numpy's global generators with ``seed``; print and return it."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    print(f"seed={seed} (torch, random, numpy; M3_TEST_SEED=<n> runs from another)")
    return seed
