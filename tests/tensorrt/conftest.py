"""Fixtures for the TensorRT tests: skip cleanly without TensorRT, read an ONNX graph's IO."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def trt():
    from m3_trt.export.tensorrt import import_trt, trt_available, trt_unavailable_reason

    if not trt_available():
        pytest.skip(trt_unavailable_reason())
    return import_trt()
