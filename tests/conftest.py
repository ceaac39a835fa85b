"""Shared fixtures: the tiny checkpoint (made once per session) and transformers twins."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tolerances.py and helpers import by name


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from m3_trt.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)
