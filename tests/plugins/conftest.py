"""Plugin tests run their small ops on one CPU thread: on a shared 2-core machine a busy core
stalls every OpenMP barrier (measured ~100 ms per op), which dwarfs the work itself."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
