"""Serialized TensorRT engines for every component of an ONNX export (parser route).

Profiles come from the manifest's named dynamic axes: ``batch`` 1..max_batch, ``seq``
1..max_seq_len (opt: a short prefill), ``patches`` 4..max_patches. Each decoder layer gets its own
engine (its weights are baked in): its variant graph is re-pointed at the layer's weight file in
a temporary ONNX next to the data, built, and removed. Builds run in a subprocess (TensorRT-RTX
aborts the process on some plugin paths; see docs/tensorrt_rtx.md) and write ``engines/*.plan``
plus ``engines/report.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DIM_RANGES = {"batch": ("max_batch", 1), "seq": ("max_seq_len", 1), "patches": ("max_patches", 4)}


def profile_for(component: dict, manifest: dict, max_patches: int = 1024) -> dict:
    limits = {"max_batch": manifest["max_batch"], "max_seq_len": manifest["max_seq_len"], "max_patches": max_patches}
    prof = {}
    for inp in component["inputs"]:
        mins, opts, maxs = [], [], []
        for d in inp["shape"]:
            if isinstance(d, int):
                mins.append(d), opts.append(d), maxs.append(d)
                continue
            key, lo = DIM_RANGES.get(d, (None, 1))
            hi = limits[key] if key else 64
            mins.append(lo)
            opts.append(min(hi, {"batch": 1, "seq": 16, "patches": 64}.get(d, lo)))
            maxs.append(hi)
        prof[inp["name"]] = (tuple(mins), tuple(opts), tuple(maxs))
    return prof


@contextmanager
def graph_for(export_dir: Path, graph_file: str, data_file: str | None, name: str) -> Iterator[Path]:
    """An ONNX file TensorRT's parser can take for one layer: the shared graph re-pointed at the
    layer's weight file, saved next to the data (the parser resolves external data relative to the
    file) and removed afterwards. Without ``data_file`` the graph itself."""
    if data_file is None:
        yield export_dir / graph_file
        return
    import onnx

    from m3_trt.export.onnx.runtime import layer_graph

    tmp = export_dir / f".{name}.{os.getpid()}.onnx"
    onnx.save(layer_graph(export_dir, graph_file, data_file), str(tmp))
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def build_engines(export_dir: str | Path, *, dtype: str | None = None, only: list[str] | None = None,
                  timeout_s: float = 600.0, progress=print) -> dict[str, dict]:
    """Build one engine per component (and per decoder layer); returns name -> BuildReport dict."""
    from m3_trt.export.tensorrt import build_in_subprocess

    export_dir = Path(export_dir)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    dtype = dtype or manifest["dtype"]
    plugins = ("m3",) if manifest["plugins"] == "m3" else ()
    engines = export_dir / "engines"
    engines.mkdir(exist_ok=True)
    reports: dict[str, dict] = {}
    for comp in manifest["components"]:
        targets = [(f"layer_{i}", data) for i, data in comp["layers"].items()] if "layers" in comp \
            else [(comp["name"], None)]
        for name, data in targets:
            if only and name not in only and comp["name"] not in only:
                continue
            own = comp["layers"][min(comp["layers"], key=int)] if data is not None else None  # the graph's own
            with graph_for(export_dir, comp["file"], None if data == own else data, name) as onnx_path:
                rep = build_in_subprocess(onnx_path, engines / f"{name}.plan", profiles=profile_for(comp, manifest),
                                          dtype=dtype, plugins=plugins, timeout_s=timeout_s)
            reports[name] = relative_report(rep.to_dict(), export_dir)
            if progress:
                status = f"ok, {rep.to_dict().get('engine_bytes', 0)} bytes" if rep.ok else f"FAILED: {rep.error}"
                progress(f"[tensorrt] {name}: {status} ({rep.seconds:.1f}s)")
    (engines / "report.json").write_text(json.dumps(reports, indent=2) + "\n")
    return reports


def relative_report(report: dict, root: Path) -> dict:
    """Engine paths relative to the export folder: builds are written in a temporary folder and
    renamed into place, so an absolute path would point at the folder that no longer exists."""
    path = report.get("engine_path")
    if path:
        try:
            report["engine_path"] = str(Path(path).relative_to(root))
        except ValueError:
            pass
    return report
