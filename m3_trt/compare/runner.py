"""Run a backend and the reference on the same prompts; measure; judge against the tolerance table.

``run_compare(...)`` returns the report as a plain dict (what ``report.json`` holds); see
``report.py`` for how it is shown. Every (prompt, component) pair is judged; the components are
listed in model order, so the first failing entry names where the difference starts.

Two ways to measure (``report["mode"]``):

* ``streamed`` — backends that run layer by layer (``torch`` in any dtype / kernels / FP8 emulation,
  ``onnxruntime`` on an export folder, ``sharded`` on a ``build-engine`` output) against the fp32
  reference: :mod:`m3_trt.compare.streamed`,
  one decoder layer of each side in memory at a time, each component judged ``isolated`` (on the
  reference's input) and ``cumulative`` (the backend's own chain);
* ``whole-model`` — backends that cannot run per layer (``transformers``' model, a live ``triton``
  server) or ``--against transformers``: both models loaded whole, every component recorded on one
  forward (cumulative only).
"""

from __future__ import annotations

import platform
import resource
import time
from pathlib import Path
from typing import Callable

from m3_trt.compare import metrics as M
from m3_trt.compare.backends import component_order, make_backend
from m3_trt.compare.inputs import prompt_samples
from m3_trt.compare.sides import STREAMED_BACKENDS
from m3_trt.compare.streamed import measure_streamed
from m3_trt.compare.tolerances import Tolerance, tolerance_for


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("m3-trt", "torch", "transformers", "onnxruntime", "onnx", "tensorrt-rtx-cu13-bindings",
                 "tritonclient", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def judge_components(per_prompt: dict[str, dict[str, dict]], order: list[str], tol: Tolerance) -> list[dict]:
    """Aggregate over prompts (worst case) and mark each component pass/fail."""
    rows = []
    for name in order:
        hits = {p: c[name] for p, c in per_prompt.items() if name in c}
        if not hits:
            continue
        if name.startswith("indexer."):
            worst_p = min(hits, key=lambda p: hits[p]["block_agreement"])
            value, limit = hits[worst_p]["block_agreement"], tol.block_agreement
            row = {"name": name, "metric": "block_agreement", "worst": value, "worst_prompt": worst_p,
                   "tolerance": limit, "ok": limit is None or value >= limit}
        else:
            worst_p = max(hits, key=lambda p: hits[p]["rel"])
            value, limit = hits[worst_p]["rel"], tol.rel_for(name)
            row = {"name": name, "metric": "rel", "worst": value, "worst_prompt": worst_p,
                   "max_abs": max(h["max_abs"] for h in hits.values()), "cos_min": min(h["cos"] for h in hits.values()),
                   "tolerance": limit, "ok": limit is None or value <= limit}
        row["per_prompt"] = hits
        rows.append(row)
    return rows


def run_compare(ckpt: Path, *, backend: str, against: str = "reference", dtype: str = "fp32", fp8: bool = False,
                kernels: str = "reference", backend_path: Path | None = None, url: str | None = None,
                prompts: Path | None = None, images: Path | None = None, layers: bool = False, tokens: int = 8,
                progress: Callable[[str], None] = print, stream: bool | None = None) -> dict:
    """Compare ``backend`` with the reference on the prompt set; the report dict.

    ``stream``: None picks the streamed walk where the backend runs layer by layer (module
    docstring); False forces the whole-model path (the tests compare the two).
    """
    from m3_trt.model.config import M3Config

    t0 = time.perf_counter()
    ckpt = Path(ckpt)
    if tokens < 0:
        raise ValueError(f"--tokens must be >= 0, got {tokens}")
    cfg = M3Config.from_pretrained(ckpt)
    samples, proc = prompt_samples(ckpt, cfg, prompts, images, progress)
    if proc is None:  # no tokenizer: token-id prompts (the model needs nothing else)
        if backend == "triton":
            raise ValueError(f"backend 'triton' sends text and needs the tokenizer; {ckpt} has no tokenizer.json")
        if fp8:
            raise ValueError(f"--fp8-emulate calibrates on text prompts through the tokenizer; {ckpt} has no "
                             f"tokenizer.json")
    eos = tuple(cfg.text.eos_token_id if isinstance(cfg.text.eos_token_id, (list, tuple))
                else [cfg.text.eos_token_id] if cfg.text.eos_token_id is not None else [])

    if against not in ("reference", "transformers"):
        raise ValueError(f"--against {against!r}: choose reference (torch fp32, reference kernels) or transformers")
    streamable = backend in STREAMED_BACKENDS and against == "reference"
    if stream is None:
        stream = streamable
    if stream and not streamable:
        raise ValueError(f"backend {backend!r} against {against!r} cannot run layer by layer (streamed backends: "
                         f"{', '.join(STREAMED_BACKENDS)} against the reference)")
    prompt_rows = [{"name": s.name, "prompt": s.prompt, "images": s.image_names,
                    "input_tokens": int(s.input_ids.shape[1])} for s in samples]
    order = component_order(cfg)
    if stream:
        ms = measure_streamed(ckpt, samples, backend=backend, dtype=dtype, fp8=fp8, kernels=kernels,
                             backend_path=backend_path, layers=layers, tokens=tokens, eos=eos,
                             judge=lambda pp, t: judge_components(pp, order, t), progress=progress)
        out_dtype, tol, components, logit_stats = ms["dtype"], ms["tol"], ms["components"], ms["logit_stats"]
        greedy_ids, decode = ms["greedy"], ms["decode"]
    else:
        out_dtype, tol, per_prompt, logit_stats, greedy_ids = _measure_whole(
            ckpt, samples, backend=backend, against=against, dtype=dtype, fp8=fp8, kernels=kernels,
            backend_path=backend_path, url=url, layers=layers, tokens=tokens, eos=eos, progress=progress)
        components, decode = judge_components(per_prompt, order, tol), []

    greedy_rows = []
    for name, ref_ids, got in greedy_ids:
        if isinstance(got, str):  # text-only backend: compare characters of the decoded text
            g = M.greedy_match(proc.decode(ref_ids), got)
        else:
            g = M.greedy_match(ref_ids, got)
            if proc is not None:
                g["ref_text"], g["out_text"] = proc.decode(ref_ids), proc.decode(got)
                g["ref_continuation_text"] = proc.decode(ref_ids[g["exact_match"]:])
                g["out_continuation_text"] = proc.decode(got[g["exact_match"]:])
        g["prompt"] = name
        g["ok"] = (not tol.greedy_exact) or g["first_divergence"] is None
        greedy_rows.append(g)

    failures = []
    for c in components:
        iso = c.get("isolated")
        if iso is not None and not iso["ok"]:  # the component itself is wrong (on the reference's input)
            failures.append({"what": c["name"], "mode": "isolated", "metric": c["metric"],
                             "prompt": iso["worst_prompt"], "value": iso["worst"], "tolerance": c["tolerance"]})
        if not c.get("cumulative_ok", c["ok"]):
            failures.append({"what": c["name"], "mode": "cumulative", "metric": c["metric"],
                             "prompt": c["worst_prompt"], "value": c["worst"], "tolerance": c["tolerance"]})

    e2e: dict = {}
    if logit_stats:
        n = sum(x["positions"] for x in logit_stats)
        e2e = {"positions": n, "logits_rel_max": max(x["rel"] for x in logit_stats),
               **{m: sum(x[m] * x["positions"] for x in logit_stats) / n for m in ("kl", "top1", "top5")},
               "per_prompt": logit_stats}
        for m, limit, worse in (("kl", tol.kl, lambda v, t: v > t), ("top1", tol.top1, lambda v, t: v < t),
                                ("top5", tol.top5, lambda v, t: v < t)):
            e2e[f"{m}_ok"] = limit is None or not worse(e2e[m], limit)
            if not e2e[f"{m}_ok"]:
                failures.append({"what": f"end_to_end.{m}", "metric": m, "prompt": "all", "value": e2e[m],
                                 "tolerance": limit})
    for g in greedy_rows:
        if not g["ok"]:
            failures.append({"what": "greedy", "metric": "first_divergence", "prompt": g["prompt"],
                             "value": g["first_divergence"], "tolerance": "identical"})

    return {
        "tool": "m3-trt compare", "mode": "streamed" if stream else "whole-model", "checkpoint": str(ckpt),
        "backend": backend, "dtype": out_dtype,
        "against": against, "kernels": kernels, "backend_path": str(backend_path) if backend_path else None,
        "url": url, "layers": layers, "tokens": tokens,
        "prompt_source": ("token ids (the checkpoint has no tokenizer.json)" if proc is None
                          else "text through the checkpoint's tokenizer and chat template"),
        "tolerance_key": [backend, out_dtype], "tolerances": tol.as_dict(),
        "versions": tool_versions(), "prompts": prompt_rows,
        "components": components, "decode_isolated": decode, "end_to_end": e2e, "greedy": greedy_rows,
        "failures": failures, "first_failure": failures[0] if failures else None,
        "verdict": "fail" if failures else "pass", "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _measure_whole(ckpt: Path, samples, *, backend, against, dtype, fp8, kernels, backend_path, url, layers, tokens,
                   eos, progress):
    """Both models loaded whole; every component recorded on one forward per prompt.

    Returns ``(dtype label, tolerance, per_prompt components, logit_stats, [(prompt, ref ids, backend ids|text)])``.
    """
    progress(f"loading backend {backend} ({'fp8-emulated ' if fp8 else ''}{dtype}) from {backend_path or url or ckpt}")
    out_b = make_backend(backend, ckpt=ckpt, path=backend_path, dtype=dtype, fp8=fp8, kernels=kernels, url=url)
    tol = tolerance_for(backend, out_b.dtype)
    progress(f"loading {against} (fp32) from {ckpt}")
    ref_b = make_backend("torch" if against == "reference" else "transformers", ckpt=ckpt)
    per_prompt: dict[str, dict] = {}
    logit_stats, greedy_ids = [], []
    for k, s in enumerate(samples, 1):
        progress(f"[{k}/{len(samples)}] {s.name}: {s.input_ids.shape[1]} tokens, {len(s.images)} image(s)")
        if not out_b.text_only:
            ref_c, out_c = ref_b.components(s, layers), out_b.components(s, layers)
            comp = {}
            for name, r in ref_c.items():
                if name not in out_c:
                    raise RuntimeError(f"backend {backend} returned no {name!r} for prompt {s.name}")
                M.check_shapes(out_c[name], r, f"{s.name}/{name}")
                comp[name] = ({"block_agreement": M.block_agreement(out_c[name], r)} if name.startswith("indexer.")
                              else M.tensor_metrics(out_c[name], r))
            per_prompt[s.name] = comp
            lm = M.logits_metrics(ref_c["logits"][0], out_c["logits"][0])
            logit_stats.append({"prompt": s.name, "rel": comp["logits"]["rel"], **lm})
        if tokens:
            greedy_ids.append((s.name, ref_b.greedy(s, tokens, eos), out_b.greedy(s, tokens, eos)))
    return out_b.dtype, tol, per_prompt, logit_stats, greedy_ids
