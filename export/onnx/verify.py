"""``--verify``: each exported component in ONNX Runtime against the torch component it came from.

Random inputs per component, prefill (several tokens into an empty cache) and decode (one token
at a later position with a filled cache) for decoder layers; relative L2 error per output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from m3_trt.tolerances import TOLERANCES

from m3_trt.export.onnx.specs import component_specs, example_inputs
from m3_trt.export.onnx.runtime import layer_model, session_options

# The error each dtype is allowed: the project's one table, stage 'onnx_component'.
TOLERANCE = {dt: TOLERANCES[("onnx_component", dt)] for dt in ("fp32", "fp16", "bf16")}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class Verifier:
    """Checks components one at a time (while their weights are in memory); the random inputs come
    from one generator in component order, so the streamed export draws what a whole-model check does."""

    def __init__(self, model, out: Path, opts, progress=None, seed: int = 0):
        self.model, self.out, self.opts, self.progress = model, out, opts, progress
        self.gen = torch.Generator().manual_seed(seed)
        self.results: dict[str, dict] = {}
        self.skipped = opts.dtype == "bf16"
        self.so = None if self.skipped else session_options(opts.plugins == "m3")

    def check(self, spec, comp: dict, layers: list[int] | None = None) -> None:
        """Run ``spec`` (``layers`` of a decoder spec) in ONNX Runtime against its torch module."""
        import onnxruntime as ort

        if self.skipped:
            return
        out, opts = self.out, self.opts
        cases = {"prefill": dict(seq=7, start=0), "decode": dict(seq=1, start=9)} if spec.layers else {"run": {}}
        for layer in layers or [None]:
            if layer is None:
                sess = ort.InferenceSession(str(out / comp["file"]), self.so)
                module = spec.module
            else:
                sess = ort.InferenceSession(layer_model(out, comp["file"], comp["layers"][str(layer)])
                                            .SerializeToString(), self.so)
                from m3_trt.export.onnx.components import DecoderLayerComponent

                module = DecoderLayerComponent(self.model, layer)
            for case, kw in cases.items():
                args = example_inputs(spec, self.model.config, self.gen, **kw)
                with torch.no_grad():
                    ref = module(*args)
                ref = ref if isinstance(ref, tuple) else (ref,)
                feeds = {n: a.numpy() for (n, _, _), a in zip(spec.inputs, args)}
                outs = sess.run(None, feeds)
                errs = {name: _rel(o, r.float().numpy()) for name, o, r in zip(spec.outputs, outs, ref)}
                key = spec.name if layer is None else f"layer_{layer}"
                key += "" if case == "run" else f"/{case}"
                worst = max(errs.values())
                self.results[key] = {"rel_err": errs, "ok": worst <= TOLERANCE[opts.dtype]}
                if self.progress:
                    self.progress(f"[verify] {key}: max rel err {worst:.2e} "
                                  f"({'ok' if self.results[key]['ok'] else 'OVER ' + str(TOLERANCE[opts.dtype])})")

    def summary(self) -> dict:
        if self.skipped:
            return {"skipped": "ONNX Runtime's CPU provider has no bf16 kernels; bf16 graphs are checked by TensorRT"}
        return {"tolerance": TOLERANCE[self.opts.dtype], "components": self.results,
                "ok": all(r["ok"] for r in self.results.values())}


def verify_export(model, out: Path, manifest: dict, opts, progress=None, seed: int = 0) -> dict:
    """Every component of an export of the in-memory ``model``, in component order."""
    v = Verifier(model, out, opts, progress, seed)
    files = {c["name"]: c for c in manifest["components"]}
    for spec in component_specs(model, opts):
        if spec.name in files:
            v.check(spec, files[spec.name], spec.layers)
    return v.summary()
