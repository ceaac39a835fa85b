"""``--verify``: each exported component in ONNX Runtime against the torch component it came from.

Random inputs per component, prefill (several tokens into an empty cache) and decode (one token
at a later position with a filled cache) for decoder layers; relative L2 error per output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .exporter import component_specs, example_inputs
from .runtime import layer_model, session_options

# The error each dtype is allowed, the same numbers as tests/tolerances.py ('onnx_component').
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-2, "bf16": 2e-2}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def verify_export(model, out: Path, manifest: dict, opts, progress=None, seed: int = 0) -> dict:
    import onnxruntime as ort

    if opts.dtype == "bf16":
        return {"skipped": "ONNX Runtime's CPU provider has no bf16 kernels; bf16 graphs are checked by TensorRT"}
    so = session_options(opts.plugins == "m3")
    files = {c["name"]: c for c in manifest["components"]}
    results, gen = {}, torch.Generator().manual_seed(seed)
    for spec in component_specs(model, opts):
        comp = files.get(spec.name)
        if comp is None:
            continue
        cases = {"prefill": dict(seq=7, start=0), "decode": dict(seq=1, start=9)} if spec.layers else {"run": {}}
        for layer in spec.layers or [None]:
            if layer is None:
                sess = ort.InferenceSession(str(out / comp["file"]), so)
                module = spec.module
            else:
                sess = ort.InferenceSession(layer_model(out, comp["file"], comp["layers"][str(layer)])
                                            .SerializeToString(), so)
                from .components import DecoderLayerComponent

                module = DecoderLayerComponent(model, layer)
            for case, kw in cases.items():
                args = example_inputs(spec, model.config, gen, **kw)
                with torch.no_grad():
                    ref = module(*args)
                ref = ref if isinstance(ref, tuple) else (ref,)
                feeds = {n: a.numpy() for (n, _, _), a in zip(spec.inputs, args)}
                outs = sess.run(None, feeds)
                errs = {name: _rel(o, r.float().numpy()) for name, o, r in zip(spec.outputs, outs, ref)}
                key = spec.name if layer is None else f"layer_{layer}"
                key += "" if case == "run" else f"/{case}"
                worst = max(errs.values())
                results[key] = {"rel_err": errs, "ok": worst <= TOLERANCE[opts.dtype]}
                if progress:
                    progress(f"[verify] {key}: max rel err {worst:.2e} "
                             f"({'ok' if results[key]['ok'] else 'OVER ' + str(TOLERANCE[opts.dtype])})")
    return {"tolerance": TOLERANCE[opts.dtype], "components": results,
            "ok": all(r["ok"] for r in results.values())}
