"""Load one rank of a ``build-engine`` output as a runnable :class:`~m3_trt.model.rank.RankModel`.

Reads ``build.json`` (config, layout, target) and ``rank<r>/weights.safetensors``; an FP8 build's
E4M3 codes are dequantized with ``rank<r>/fp8_scales.safetensors`` (the emulated FP8 reference).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from m3_trt.model.config import M3Config
from m3_trt.model.modeling import DTYPES
from m3_trt.model.rank import RankModel
from m3_trt.model.shard import Layout
from m3_trt.quant.fp8 import dequantize_state


def load_rank(build_dir: str | Path, rank: int, kernels: str = "reference") -> RankModel:
    """Rank ``rank`` of a ``build-engine`` output (``rank<r>/weights.safetensors`` + ``build.json``)."""
    build_dir = Path(build_dir)
    manifest = json.loads((build_dir / "build.json").read_text())
    cfg = M3Config.from_dict(manifest["config"])
    lay = Layout(**manifest["layout"])
    state = load_file(str(build_dir / f"rank{rank}" / "weights.safetensors"))
    dtype = DTYPES[manifest["target"]["dtype"]]
    scales = build_dir / f"rank{rank}" / "fp8_scales.safetensors"
    if scales.is_file():  # FP8 build: weights are stored as E4M3 codes + scales
        state = dequantize_state(state, load_file(str(scales)))
    return RankModel.from_state(cfg, lay, rank, {k: v.float() for k, v in state.items()}, dtype=dtype,
                                kernels=kernels)
