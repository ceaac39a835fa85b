"""Build serialized TensorRT engines from ONNX files (route a: TensorRT's ONNX parser).

``build_engine_from_onnx`` parses an ONNX file (external weights found next to it, because
the parser is given the file's path), applies explicit optimization profiles, builds a
serialized engine and writes it atomically (temp file + rename). It returns a ``BuildReport``
instead of raising for TensorRT-side failures, so a caller can write the outcome into a
manifest. Programming errors (a profile for an input the graph lacks, a dtype that does not
match the graph) raise ``ValueError`` before any build starts.

Precision: networks are built *strongly typed* — each tensor keeps the dtype the ONNX graph
gives it. TensorRT-RTX has no FP16/BF16 builder flags at all, and strong typing is the only
mode it offers, so ``dtype`` states which precision the ONNX was exported in and is checked
against the graph's floating-point inputs; it does not convert anything.

TensorRT-RTX on a machine without a GPU builds engines but cannot deserialize them
("CUDA driver version is insufficient for CUDA runtime version"), so the IO of a build is
reported from the parsed network, which is what the engine is built from.

For graphs with plugin nodes, or anything that may abort the process, use
``subprocess_build.build_in_subprocess``.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from m3_trt.export.tensorrt._trt import backend_name, import_trt

Shape = Sequence[int]
ProfileSpec = Mapping[str, tuple[Shape, Shape, Shape]]

DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class TensorInfo:
    """One network input or output: ``shape`` uses -1 for dynamic dims; ``dtype`` is TensorRT's name."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class BuildReport:
    """Outcome of one engine build (also the JSON a build subprocess hands back).

    ``stage`` is where it ended: 'parse', 'configure', 'build', 'write', 'done', or
    'crashed' / 'timeout' when a build subprocess died.
    """

    ok: bool
    stage: str
    seconds: float = 0.0
    engine_path: str | None = None
    engine_bytes: int = 0
    num_layers: int = 0
    layer_types: dict[str, int] = field(default_factory=dict)
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    failing_node: str | None = None
    backend: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BuildReport":
        d = dict(d)
        d["inputs"] = [TensorInfo(i["name"], tuple(i["shape"]), i["dtype"]) for i in d.get("inputs", [])]
        d["outputs"] = [TensorInfo(i["name"], tuple(i["shape"]), i["dtype"]) for i in d.get("outputs", [])]
        return cls(**d)


def _make_logger(trt, min_severity: str):
    """An ILogger that keeps warnings and errors (and echoes them at ``min_severity`` or above)."""
    sev = trt.ILogger.Severity
    order = [sev.INTERNAL_ERROR, sev.ERROR, sev.WARNING, sev.INFO, sev.VERBOSE]
    echo_upto = {"error": 1, "warning": 2, "info": 3, "verbose": 4, "none": -1}[min_severity]

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.warnings: list[str] = []
            self.errors: list[str] = []

        def log(self, severity, msg):
            rank = order.index(severity)
            if rank <= 1:
                self.errors.append(msg)
            elif rank == 2:
                self.warnings.append(msg)
            if rank <= echo_upto:
                print(f"[TRT {severity.name}] {msg}", flush=True)

    return _Logger()


def _make_timeout_monitor(trt, deadline: float):
    """A progress monitor that cancels the build once ``deadline`` (time.monotonic) passes."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.cancelled = False

        def phase_start(self, phase_name, parent_phase, num_steps):
            pass

        def step_complete(self, phase_name, step):
            if time.monotonic() > deadline:
                self.cancelled = True
                return False
            return True

        def phase_finish(self, phase_name):
            pass

    return _Monitor()


def tensor_infos(network, which: str) -> list[TensorInfo]:
    """Inputs or outputs (``which`` = 'inputs' | 'outputs') of a parsed network."""
    n = network.num_inputs if which == "inputs" else network.num_outputs
    get = network.get_input if which == "inputs" else network.get_output
    out = []
    for i in range(n):
        t = get(i)
        out.append(TensorInfo(t.name, tuple(int(d) for d in t.shape), t.dtype.name))
    return out


def layer_type_counts(network) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(network.num_layers):
        name = network.get_layer(i).type.name
        counts[name] = counts.get(name, 0) + 1
    return counts


def parser_error_text(parser) -> tuple[str, str | None]:
    """('ONNX parse failed at node #3 'name' (OpType): desc; ...', first failing node)."""
    msgs, first = [], None
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = f"#{e.node()} '{e.node_name()}' ({e.node_operator()})"
        if first is None and e.node() >= 0:
            first = f"{e.node_name() or '#' + str(e.node())} ({e.node_operator()})"
        msgs.append(f"node {node}: {e.desc()}")
    return "ONNX parse failed at " + "; ".join(msgs), first


def _check_dtype(dtype: str, inputs: Iterable[TensorInfo]) -> None:
    want = {"fp32": "FLOAT", "fp16": "HALF", "bf16": "BF16"}[dtype]
    floats = {t.dtype for t in inputs if t.dtype in ("FLOAT", "HALF", "BF16")}
    if floats and want not in floats:
        raise ValueError(
            f"dtype={dtype!r} but the graph's floating-point inputs are {sorted(floats)}: networks "
            "are built strongly typed (TensorRT-RTX has no FP16/BF16 flags), so export the ONNX "
            "in the precision you want"
        )


def _normalise_profiles(profiles) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    if profiles is None:
        return []
    if isinstance(profiles, Mapping):
        profiles = [profiles]
    out = []
    for p in profiles:
        out.append({name: tuple(tuple(int(d) for d in s) for s in mmo) for name, mmo in p.items()})
    return out


def apply_profiles(trt, builder, network, config, profiles) -> None:
    """Add one optimization profile per mapping; every dynamic input must be covered.

    Raises ValueError naming the input when a profile is missing, unknown, or has the
    wrong rank / contradicts a static dim.
    """
    inputs = {t.name: t for t in tensor_infos(network, "inputs")}
    dynamic = {n for n, t in inputs.items() if -1 in t.shape}
    plist = _normalise_profiles(profiles)
    if dynamic and not plist:
        raise ValueError(f"inputs {sorted(dynamic)} have dynamic dims; give profiles (min, opt, max) for them")
    for k, p in enumerate(plist):
        unknown = set(p) - set(inputs)
        if unknown:
            raise ValueError(f"profile {k} names inputs the graph lacks: {sorted(unknown)} (graph inputs: {sorted(inputs)})")
        missing = dynamic - set(p)
        if missing:
            raise ValueError(f"profile {k} misses dynamic inputs {sorted(missing)}")
        prof = builder.create_optimization_profile()
        for name, (mn, opt, mx) in p.items():
            shape = inputs[name].shape
            for s in (mn, opt, mx):
                if len(s) != len(shape) or any(d != -1 and d != v for d, v in zip(shape, s)):
                    raise ValueError(f"profile {k} shape {s} for {name!r} does not fit the graph's {shape}")
            prof.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(prof)


def create_network(trt, builder):
    """A strongly typed network (the only kind TensorRT-RTX has; explicit flag for standard TensorRT)."""
    flags = 0
    if not trt.__name__.startswith("tensorrt_rtx"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return builder.create_network(flags)


def build_serialized(trt, builder, network, config, engine_path, report: BuildReport, logger, deadline, t0):
    """Shared tail of both routes: build, write atomically, fill the report."""
    if deadline is not None:
        config.progress_monitor = monitor = _make_timeout_monitor(trt, deadline)
    else:
        monitor = None
    report.stage = "build"
    serialized = builder.build_serialized_network(network, config)
    report.warnings = list(logger.warnings)
    if serialized is None:
        if monitor is not None and monitor.cancelled:
            report.error = f"build cancelled: timeout after {time.monotonic() - t0:.1f} s"
        else:
            report.error = "\n".join(logger.errors) or "build_serialized_network returned None"
        report.seconds = time.monotonic() - t0
        return report
    report.stage = "write"
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=engine_path.name + ".", suffix=".tmp", dir=engine_path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(serialized))
        os.replace(tmp, engine_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    report.engine_path = str(engine_path)
    report.engine_bytes = int(serialized.nbytes)
    report.ok = True
    report.stage = "done"
    report.seconds = time.monotonic() - t0
    return report


def build_engine_from_onnx(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    profiles: ProfileSpec | Sequence[ProfileSpec] | None = None,
    dtype: str = "fp32",
    plugin_creators: Sequence[Any] = (),
    timeout_s: float | None = None,
    log: str = "none",
    builder_optimization_level: int | None = None,
) -> BuildReport:
    """Parse ``onnx_path`` and build a serialized engine at ``engine_path``.

    ``profiles``: ``{input_name: (min_shape, opt_shape, max_shape)}`` (or a list of such,
    one optimization profile each); every input with a dynamic dim must appear.
    ``plugin_creators``: IPluginCreatorV3One objects to register first (kept alive here).
    ``timeout_s`` cancels the build through a progress monitor. ``log``: echo TensorRT
    messages at 'error' | 'warning' | 'info' | 'verbose' | 'none' (they are kept either way).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    trt = import_trt()
    t0 = time.monotonic()
    deadline = None if timeout_s is None else t0 + timeout_s
    report = BuildReport(ok=False, stage="parse", backend=backend_name())
    logger = _make_logger(trt, log)

    if plugin_creators:
        from m3_trt.export.tensorrt.plugins import register_creators

        register_creators(trt, plugin_creators)

    builder = trt.Builder(logger)
    network = create_network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    # the path lets the parser resolve external-data files relative to the model
    parsed = parser.parse(onnx_path.read_bytes(), str(onnx_path))
    report.num_layers = network.num_layers
    report.layer_types = layer_type_counts(network)
    if not parsed:
        report.error, report.failing_node = parser_error_text(parser)
        report.warnings = list(logger.warnings)
        report.seconds = time.monotonic() - t0
        return report
    report.inputs = tensor_infos(network, "inputs")
    report.outputs = tensor_infos(network, "outputs")

    report.stage = "configure"
    _check_dtype(dtype, report.inputs)
    config = builder.create_builder_config()
    if builder_optimization_level is not None:
        config.builder_optimization_level = builder_optimization_level
    apply_profiles(trt, builder, network, config, profiles)
    return build_serialized(trt, builder, network, config, engine_path, report, logger, deadline, t0)


def try_deserialize(engine_path: str | os.PathLike) -> tuple[bool, str]:
    """(True, '') when the engine deserializes here; else (False, TensorRT's error text).

    On a CPU-only machine TensorRT-RTX answers "CUDA driver version is insufficient for
    CUDA runtime version"; on a GPU host this is the check that the plan loads.
    """
    trt = import_trt()
    logger = _make_logger(trt, "none")
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        return False, "\n".join(logger.errors) or "deserialize_cuda_engine returned None"
    return True, ""
