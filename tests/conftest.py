"""Shared fixtures: the fixed seed of every test, the tiny checkpoint (made once per session), its exports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tolerances.py and helpers import by name

from seeds import seed_everything  # noqa: E402  (after the path line above)


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the fixed ``seeds.TEST_SEED`` (printed; shown with a failure's output),
    whatever ran before it; a test takes ``seed`` as an argument to put it in its messages."""
    return seed_everything()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from m3_trt.checkpoints.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_export(tiny_ckpt, tmp_path_factory):
    """``tiny_export(mode)`` -> folder of the tiny checkpoint's fp32 ONNX export (made once per mode)."""
    from m3_trt.export.onnx import export_model

    made: dict[str, Path] = {}

    def get(mode: str) -> Path:
        if mode not in made:
            out = tmp_path_factory.mktemp("export") / f"tiny-{mode}"
            made[mode] = export_model(tiny_ckpt, out, plugins=mode, max_seq_len=128, verify=True, progress=None)
        return made[mode]

    return get
