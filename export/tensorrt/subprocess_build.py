"""Run an ONNX → engine build in a child process, so an abort inside TensorRT cannot take
the caller down, and hand back a ``BuildReport`` whatever happened.

The child is ``python -m m3_trt.export.tensorrt.subprocess_build SPEC.json REPORT.json``.
If it dies from a signal (TensorRT calls ``std::terminate`` on some failures) or runs past
``timeout_s``, the report says so (stage 'crashed' / 'timeout') with the tail of its stderr.

The soname shim: TensorRT-RTX 1.7.1's ONNX parser ``dlopen``s ``libtensorrt_rtx.so`` (no
version suffix) the first time it imports a plugin node, while the PyPI wheel ships only
``libtensorrt_rtx.so.1``. The failed load throws inside a ``noexcept`` path and the process
aborts ("terminate called without an active exception"). The parser's RPATH is ``$ORIGIN``
and glibc reads ``LD_LIBRARY_PATH`` only at process start, so the fix has to be in place
before the child starts: ``rtx_soname_shim_dir`` makes a directory holding the symlink
``libtensorrt_rtx.so -> .../tensorrt_rtx_libs/libtensorrt_rtx.so.1`` and the child gets it on
``LD_LIBRARY_PATH``. With it, plugin nodes parse and build (docs/tensorrt_rtx.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from m3_trt.export.tensorrt._trt import import_trt
from m3_trt.export.tensorrt.builder import BuildReport, build_engine_from_onnx
from m3_trt.export.tensorrt.plugins import SPECS, m3_creators

RTX_LIB = "libtensorrt_rtx.so"


def rtx_soname_shim_dir() -> str | None:
    """Directory with a ``libtensorrt_rtx.so`` symlink for TensorRT-RTX, or None when not needed.

    None when the ``tensorrt_rtx_libs`` package is absent or already has the unversioned name.
    """
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = Path(list(spec.submodule_search_locations)[0])
    if (libs / RTX_LIB).exists():
        return None
    target = libs / (RTX_LIB + ".1")
    if not target.exists():
        return None
    shim = Path(tempfile.gettempdir()) / f"m3_trt_rtx_shim_{os.getuid()}"
    shim.mkdir(exist_ok=True)
    link = shim / RTX_LIB
    if not (link.is_symlink() and os.readlink(link) == str(target)):
        tmp = shim / f".{RTX_LIB}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)  # atomic against a parallel test creating the same link
    return str(shim)


def _child_env(soname_shim: bool) -> dict[str, str]:
    env = dict(os.environ)
    if soname_shim:
        shim = rtx_soname_shim_dir()
        if shim:
            env["LD_LIBRARY_PATH"] = shim + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return env


def _resolve_plugins(names: Sequence[str], trt) -> list:
    """'m3' → every m3 creator; 'm3:indexer_topk' → one; 'pkg.mod:func' → func(trt)."""
    creators = []
    for name in names:
        if name == "m3":
            creators += m3_creators(trt)
        elif name.startswith("m3:"):
            if name[3:] not in SPECS:
                raise ValueError(f"plugin set {name!r}: no m3 operator {name[3:]!r} (have {sorted(SPECS)})")
            creators += m3_creators(trt, [name[3:]])
        else:
            mod, _, func = name.partition(":")
            creators += list(getattr(importlib.import_module(mod), func)(trt))
    return creators


def build_in_subprocess(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    profiles: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    dtype: str = "fp32",
    plugins: Sequence[str] = (),
    timeout_s: float = 600.0,
    soname_shim: bool = True,
    builder_optimization_level: int | None = None,
) -> BuildReport:
    """``build_engine_from_onnx`` in a child process; always returns a report.

    ``plugins`` names creator sets to register in the child ('m3', 'm3:<op>', or
    'module:function' where ``function(trt)`` returns creators). ``soname_shim`` puts the
    ``libtensorrt_rtx.so`` symlink on the child's library path (see module docstring);
    turning it off reproduces the TensorRT-RTX 1.7.1 abort on plugin nodes.
    """
    spec = {
        "onnx_path": str(onnx_path),
        "engine_path": str(engine_path),
        "profiles": profiles,
        "dtype": dtype,
        "plugins": list(plugins),
        "timeout_s": timeout_s,
        "builder_optimization_level": builder_optimization_level,
    }
    with tempfile.TemporaryDirectory(prefix="m3_trt_build_") as tmp:
        spec_file, report_file = Path(tmp) / "spec.json", Path(tmp) / "report.json"
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", __name__, str(spec_file), str(report_file)]
        try:
            proc = subprocess.run(
                cmd, env=_child_env(soname_shim), capture_output=True, text=True, timeout=timeout_s + 30
            )
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stderr or b"")[-2000:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return BuildReport(ok=False, stage="timeout", seconds=timeout_s + 30,
                               error=f"build process killed after {timeout_s + 30:.0f} s\n{tail}")
        if report_file.exists():
            return BuildReport.from_dict(json.loads(report_file.read_text()))
        stderr_tail = (proc.stderr or "")[-3000:]
        if proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name
            return BuildReport(ok=False, stage="crashed",
                               error=f"build process died with {sig}; stderr tail:\n{stderr_tail}")
        return BuildReport(ok=False, stage="crashed",
                           error=f"build process exited {proc.returncode} without a report; stderr tail:\n{stderr_tail}")


def _child_main(spec_file: str, report_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    trt = import_trt()
    profiles = spec["profiles"]
    try:
        creators = _resolve_plugins(spec["plugins"], trt)
        report = build_engine_from_onnx(
            spec["onnx_path"],
            spec["engine_path"],
            profiles=profiles,
            dtype=spec["dtype"],
            plugin_creators=creators,
            timeout_s=spec["timeout_s"],
            builder_optimization_level=spec["builder_optimization_level"],
        )
    except (ValueError, FileNotFoundError) as exc:
        report = BuildReport(ok=False, stage="configure", error=f"{type(exc).__name__}: {exc}")
    Path(report_file).write_text(json.dumps(report.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1], sys.argv[2]))
