"""The tests' view of the one tolerance table (``m3_trt/tolerances.py``), plus ``assert_close``."""

from __future__ import annotations

import torch

from m3_trt.tolerances import (FP8_TOP1_AGREEMENT, FP8_VS_FP32_TOP1_RANDOM_IDS, TOLERANCES,  # noqa: F401
                               max_abs, rel_err)


def assert_close(out: torch.Tensor, ref: torch.Tensor, stage: str, dtype: str = "fp32", what: str = "") -> float:
    tol = TOLERANCES[(stage, dtype)]
    err = rel_err(out, ref)
    assert err <= tol, f"{what or stage}: relative error {err:.3e} > {tol:.1e} (max-abs {max_abs(out, ref):.3e})"
    return err
