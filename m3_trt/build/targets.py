"""Build targets: one small TOML file per target in ``engines/`` (or any path a user gives).

A target names the deployment a build is for: activation / weight / KV-cache dtypes, the parallel
layout (``tp`` ranks of tensor parallelism for attention, dense MLP and shared expert; ``ep``-way
expert parallelism for the routed experts), the maximum shapes the engines must accept, and the
GPU memory the plan checks against, and for ``backend = "tensorrt"`` the route its engines take
(``trt_route``: ``onnx``, TensorRT's ONNX parser on the exported graphs; ``network``, the text
components written layer by layer with TensorRT's network API,
:mod:`m3_trt.export.tensorrt.network_build`). Every field can be overridden (``--set tp=4``); overrides are
parsed as TOML values (``4`` → int, ``fp8`` → string, ``true`` → bool) and type-checked against
the field's declared type.

Parallel layout (what :mod:`m3_trt.runtime` and :mod:`m3_trt.build.plan` implement): ``world = max(tp,
ep)`` ranks; ``tp`` is 1 (attention replicated) or ``world``; ``ep`` divides ``world`` and the
routed experts are further split on their intermediate dimension ``moe_tp = world / ep`` ways
(TensorRT-LLM's ``moe_tensor_parallel_size × moe_expert_parallel_size = tp_size`` rule).
"""

from __future__ import annotations

import math
import tomllib
from importlib import resources
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

# engines/*.toml ship as package data (m3_trt.engines), so a wheel install has them too.
TARGETS_DIR = Path(str(resources.files("m3_trt.engines")))
DTYPES = ("fp32", "bf16", "fp16")
WEIGHT_DTYPES = ("fp32", "bf16", "fp16", "fp8")
KV_DTYPES = ("fp32", "bf16", "fp16", "fp8")
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
# The range every numeric field must lie in (inclusive). Upper bounds are far above any real
# deployment; they keep the plan's byte counts in range (no overflow, no absurd allocations).
INT_RANGES = (("tp", 1, 1024), ("ep", 1, 1024), ("gpus", 1, 1024), ("max_batch", 1, 1 << 16),
              ("max_input_len", 1, 1 << 24), ("max_seq_len", 1, 1 << 24), ("max_num_tokens", 1, 1 << 24),
              ("max_images", 0, 1 << 12))
FLOAT_RANGES = (("gpu_memory_gib", 0.0, 1 << 20), ("runtime_reserve_gib", 0.0, 1 << 20))
TRT_ROUTES = ("onnx", "network")


@dataclass(frozen=True)
class Target:
    name: str
    description: str = ""
    dtype: str = "bf16"
    weight_dtype: str = "bf16"
    kv_cache_dtype: str = "bf16"
    tp: int = 1
    ep: int = 1
    max_batch: int = 1
    max_input_len: int = 2048
    max_seq_len: int = 4096
    max_num_tokens: int = 2048
    max_images: int = 1
    gpus: int = 1
    gpu_memory_gib: float = 80.0
    runtime_reserve_gib: float = 2.0
    plugins: str = "m3"
    backend: str = "tensorrt"
    onnx: bool = True
    trt_route: str = "onnx"  # how backend = tensorrt builds engines: TRT_ROUTES
    source: str = ""  # the file it came from

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"target {self.name!r}: {key} = {getattr(self, key)!r}: {why}")

        need(self.dtype in DTYPES, "dtype", f"choose one of {DTYPES}")
        need(self.weight_dtype in WEIGHT_DTYPES, "weight_dtype", f"choose one of {WEIGHT_DTYPES}")
        need(self.kv_cache_dtype in KV_DTYPES, "kv_cache_dtype", f"choose one of {KV_DTYPES}")
        for key, lo, hi in INT_RANGES:
            need(lo <= getattr(self, key) <= hi, key, f"must be within {lo}..{hi}")
        need(self.max_input_len <= self.max_seq_len, "max_input_len", f"exceeds max_seq_len={self.max_seq_len}")
        for key, lo, hi in FLOAT_RANGES:  # NaN fails every comparison, inf the upper bound
            need(lo <= getattr(self, key) <= hi and math.isfinite(getattr(self, key)), key,
                 f"must be a finite number within {lo}..{hi} GiB")
        need(self.gpu_memory_gib > 0, "gpu_memory_gib", "must be > 0")
        need(self.runtime_reserve_gib < self.gpu_memory_gib, "runtime_reserve_gib",
             f"must be smaller than gpu_memory_gib={self.gpu_memory_gib}")
        need(self.plugins in ("m3", "none"), "plugins", "choose 'm3' or 'none'")
        need(self.backend in ("onnxruntime", "tensorrt"), "backend", "choose 'onnxruntime' or 'tensorrt'")
        need(self.tp in (1, self.world), "tp", f"must be 1 (replicated attention) or the world size {self.world}")
        need(self.world % self.ep == 0, "ep", f"must divide the world size {self.world}")
        need(self.gpus == self.world or self.backend == "onnxruntime", "gpus",
             f"must equal the number of ranks max(tp, ep) = {self.world}")
        need(self.trt_route in TRT_ROUTES, "trt_route", f"choose one of {TRT_ROUTES}")
        if self.trt_route == "network":  # refuse what the network route cannot build, naming why
            net = "the network route (TensorRT network API)"
            need(self.backend == "tensorrt", "trt_route",
                 f"{net} builds TensorRT engines; backend = {self.backend!r} builds none (set backend = 'tensorrt')")
            need(self.world == 1, "trt_route",
                 f"{net} writes one-rank networks only (no tensor/expert-parallel split layers); "
                 f"this target has {self.world} ranks: use trt_route = 'onnx'")
            need(self.weight_dtype != "fp8" and self.kv_cache_dtype != "fp8", "trt_route",
                 f"{net} writes fp32/fp16/bf16 networks (no FP8 Q/DQ weights or FP8 KV cache); this target has "
                 f"weight_dtype = {self.weight_dtype!r}, kv_cache_dtype = {self.kv_cache_dtype!r}: "
                 "use trt_route = 'onnx'")
            need(self.onnx, "trt_route",
                 f"{net} needs onnx = true: the vision engines come from the ONNX export and every network's "
                 "IO is checked against its ONNX component")

    @property
    def world(self) -> int:
        return max(self.tp, self.ep)

    @property
    def moe_tp(self) -> int:
        return self.world // self.ep

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELD_TYPES = {f.name: f.type for f in fields(Target)}
_PY_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _coerce(key: str, value: Any) -> Any:
    if key not in _FIELD_TYPES or key in ("name", "source"):
        raise ValueError(f"unknown target field {key!r}; fields: {', '.join(k for k in _FIELD_TYPES if k not in ('name', 'source'))}")
    want = _PY_TYPES[_FIELD_TYPES[key]]
    if isinstance(value, str) and want is not str:
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            raise ValueError(f"target field {key}: cannot read {value!r} as {want.__name__}") from None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ValueError(f"target field {key}: {value!r} is not a {want.__name__}")
    return value


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``["tp=4", "kv_cache_dtype=fp8"]`` → ``{"tp": 4, "kv_cache_dtype": "fp8"}`` (typed)."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = _coerce(k.strip(), v.strip())
    return out


def list_targets(directory: Path = TARGETS_DIR) -> list[Path]:
    return sorted(directory.glob("*.toml"))


def load_target(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Target:
    """A target by name (``engines/<name>.toml``) or by path, with typed overrides applied."""
    p = Path(name_or_path)
    if not (p.suffix == ".toml" and p.is_file()):
        p = TARGETS_DIR / f"{name_or_path}.toml"
    if not p.is_file():
        known = ", ".join(q.stem for q in list_targets())
        raise ValueError(f"no target {str(name_or_path)!r} (known: {known}; or give a path to a .toml file)")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: not valid TOML ({e})") from None
    kw = {k: _coerce(k, v) for k, v in raw.items()}
    target = Target(name=p.stem, source=str(p), **kw)
    if overrides:
        target = replace(target, **{k: _coerce(k, v) for k, v in overrides.items()})
    return target


def describe(target: Target) -> str:
    d = target.to_dict()
    return "\n".join(f"  {k:20s} {d[k]}" for k in d)
