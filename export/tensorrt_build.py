"""Serialized TensorRT engines for every component of an ONNX export (parser route).

Profiles come from the manifest's named dynamic axes: ``batch`` 1..max_batch, ``seq``
1..max_seq_len (opt: a short prefill), ``patches`` 4..max_patches. Each decoder layer gets its own
engine (its weights are baked in): its variant graph is re-pointed at the layer's weight file in
a temporary ONNX next to the data, built, and removed. Builds run in a subprocess (TensorRT-RTX
aborts the process on some plugin paths; see docs/tensorrt_rtx.md) and write ``engines/*.plan``
plus ``engines/report.json``.

``network_route_engines`` is ``build-engine``'s other route (``trt_route = "network"``): the text
components written layer by layer with the network API (``export/tensorrt/network_model.py``),
each checked on the torch shadow network first, and the components that route does not write
(the vision encoder and projector) built here by the parser, into the same ``engines/`` folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from m3_trt.export.tensorrt.network_build import NetworkBuilder, piece_of
from m3_trt.export.tensorrt.network_check import check_component, failures
from m3_trt.export.tensorrt.network_model import component_plan, io_differences, network_limits
from m3_trt.model.modeling import DTYPES

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
    export_dir = Path(export_dir)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    engines = export_dir / "engines"
    engines.mkdir(exist_ok=True)
    reports: dict[str, dict] = {}
    for comp in manifest["components"]:
        names = [f"layer_{i}" for i in comp["layers"]] if "layers" in comp else [comp["name"]]
        for name in names:
            if only and name not in only and comp["name"] not in only:
                continue
            reports[name] = build_component_engine(export_dir, manifest, name, dtype=dtype, timeout_s=timeout_s,
                                                   progress=progress)
    (engines / "report.json").write_text(json.dumps(reports, indent=2) + "\n")
    return reports


def build_component_engine(export_dir: Path, manifest: dict, name: str, *, dtype: str | None = None,
                           timeout_s: float = 600.0, progress=print) -> dict:
    """One engine, ``export_dir/engines/<name>.plan``, for component ``name`` of an export
    (``layer_<i>`` for a decoder layer); returns its BuildReport dict (engine path relative)."""
    from m3_trt.export.tensorrt import build_in_subprocess

    comp, data = None, None
    for c in manifest["components"]:
        if "layers" in c and name.startswith("layer_") and name.removeprefix("layer_") in c["layers"]:
            comp, data = c, c["layers"][name.removeprefix("layer_")]
            own = c["layers"][min(c["layers"], key=int)]  # the layer whose weights the graph file itself points at
            data = None if data == own else data
        elif c["name"] == name and "layers" not in c:
            comp = c
    if comp is None:
        raise ValueError(f"{export_dir}: the export has no component {name!r}")
    plugins = ("m3",) if manifest["plugins"] == "m3" else ()
    with graph_for(export_dir, comp["file"], data, name) as onnx_path:
        rep = build_in_subprocess(onnx_path, export_dir / "engines" / f"{name}.plan",
                                  profiles=profile_for(comp, manifest), dtype=dtype or manifest["dtype"],
                                  plugins=plugins, timeout_s=timeout_s)
    if progress:
        status = f"ok, {rep.engine_bytes} bytes" if rep.ok else f"FAILED: {rep.error}"
        progress(f"[tensorrt] {name}: {status} ({rep.seconds:.1f}s)")
    return relative_report(rep.to_dict(), export_dir)


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


def execution_note(reports: dict[str, dict]) -> str:
    """What a build report says about running its engines (it never runs them), from the backend
    that built them (each report's ``backend``) and, where tried, whether they loaded here."""
    backends = sorted({r.get("backend") or "" for r in reports.values()} - {""})
    text = f"engines built by {', '.join(backends) or 'TensorRT'}, not executed by the build."
    if any(b.startswith("tensorrt_rtx") for b in backends):
        text += (" TensorRT-RTX compiles kernels when an engine is loaded on an RTX-class GPU (SM75-SM121): it "
                 "has no Hopper (SM90) or data-centre Blackwell (SM100) target, so these are not the engines an "
                 "H100/B200 target deploys (those need the standard tensorrt package on a GPU host).")
    loads = [r["deserialize"] for r in reports.values() if "deserialize" in r]
    if loads:
        ok = sum(1 for d in loads if d["ok"])
        text += f" Loaded on this host: {ok} of {len(loads)}"
        errors = sorted({d["error"].splitlines()[0] for d in loads if not d["ok"] and d["error"]})
        text += f" ({errors[0][:300]})." if errors else "."
    return text


def network_route_engines(pm, export_dir: Path, *, dtype: str, max_batch: int, max_seq_len: int, piece, log,
                          group: str = "rank0/engines", only: list[str] | None = None,
                          timeout_s: float = 600.0) -> dict[str, dict]:
    """Engines for one rank's ``export_dir`` by the network route, streaming ``pm`` (a
    :class:`m3_trt.model.pieces.PieceModel`): one journal piece per engine (``<group>/<name>``)
    and ``<group>`` for ``engines/report.json``; ``piece(name, make)`` is the build's journal.

    Per text component (embedding, each decoder layer, head), with only its piece of the
    checkpoint in memory: the shadow check (:func:`network_check.check_component`; a failure
    raises ``RuntimeError`` naming the component and outputs, before anything is built), the build
    in the worker (:class:`network_build.NetworkBuilder`, which reads that piece itself), and the
    network's IO against the ONNX component's (``io_diff``; a difference raises). The vision
    components are built from their ONNX graphs (route 'onnx'; verified by the export). A failed
    *build* is reported (``ok`` false), like the ONNX route's. Returns name -> report dict, each
    with ``route``.
    """
    limits = network_limits(pm.cfg.text, max_seq_len, dtype)
    if limits:
        raise ValueError("trt_route = 'network': " + "; ".join(limits))
    export_dir = Path(export_dir)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    entries = {c["name"]: c for c in manifest["components"]}
    eng = export_dir / "engines"
    eng.mkdir(exist_ok=True)
    network = [(n, o) for n, o, _ in component_plan(pm.model, max_seq_len) if not only or n in only]
    parsed = [c["name"] for c in manifest["components"] if "layers" not in c and c["name"] not in ("embedding", "head")
              and (not only or c["name"] in only)]

    def finish(name: str, rep: dict) -> list[Path]:
        (eng / f"{name}.json").write_text(json.dumps(rep, indent=2) + "\n")
        return [eng / f"{name}.json"] + ([eng / f"{name}.plan"] if rep["ok"] else [])

    with NetworkBuilder({"checkpoint": str(pm.reader.path), "dtype": dtype}, timeout_s=timeout_s) as nb:
        for name, onnx_name in network:
            def make(name=name, onnx_name=onnx_name) -> list[Path]:
                (eng / f"{name}.plan").unlink(missing_ok=True)
                with pm.loaded(piece_of(name), DTYPES[dtype]):
                    check = check_component(pm.model, name, dtype=dtype, max_seq_len=max_seq_len, max_batch=max_batch)
                if not check["ok"]:
                    raise RuntimeError(f"{group}/{name}: the network written for {name} differs from the torch "
                                       f"component on the shadow network: {'; '.join(failures(check))}")
                rep = relative_report(nb.build(name, eng / f"{name}.plan", dtype=dtype, max_batch=max_batch,
                                               max_seq_len=max_seq_len), export_dir)
                rep["route"], rep["shadow"] = "network", check
                if rep["ok"]:
                    rep["io_diff"] = io_differences(rep, entries[onnx_name])
                    if rep["io_diff"]:
                        raise RuntimeError(f"{group}/{name}: the network's IO differs from the ONNX component "
                                           f"{onnx_name}: {rep['io_diff']}")
                log(f"[tensorrt network] {name}: " + (f"ok, {rep['engine_bytes']} bytes, {rep['num_layers']} layers, "
                                                      f"shadow max rel err {check['max_rel_err']:.1e}" if rep["ok"]
                                                      else f"FAILED ({rep['stage']}): {rep['error']}"))
                return finish(name, rep)
            piece(f"{group}/{name}", make)
    for name in parsed:
        def make_parsed(name=name) -> list[Path]:
            rep = build_component_engine(export_dir, manifest, name, dtype=dtype, timeout_s=timeout_s, progress=log)
            rep["route"] = "onnx"
            rep["verified_by"] = ("the ONNX export's verification (ONNX Runtime vs torch); the network route "
                                  "has no writer for it")
            return finish(name, rep)
        piece(f"{group}/{name}", make_parsed)
    names = [n for n, _ in network] + parsed
    reports = {n: json.loads((eng / f"{n}.json").read_text()) for n in names}

    def make_report() -> list[Path]:
        (eng / "report.json").write_text(json.dumps(reports, indent=2) + "\n")
        return [eng / "report.json"]
    piece(group, make_report)
    return reports


def network_verification(reports: dict[str, dict]) -> dict:
    """The build report's summary of how a network-route rank was checked (from its engine reports)."""
    shadow = {n: r["shadow"] for n, r in reports.items() if "shadow" in r}
    return {"shadow": "each network-route component's writer run on the torch shadow network against the torch "
                      "component (prefill, one decode step, a chunk ending the cache; fixed seed); a failure "
                      "fails the build",
            "stage": "trt_network_shadow", "tolerance": sorted({c["tolerance"] for c in shadow.values()}),
            "max_rel_err": {n: c["max_rel_err"] for n, c in shadow.items()},
            "io": "each network's IO equals its ONNX component's (one documented change: the indexer cache's unit "
                  "head axis); a difference fails the build",
            "onnx_route_components": sorted(n for n, r in reports.items() if r.get("route") == "onnx")}
