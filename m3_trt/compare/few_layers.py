"""``m3-trt compare CKPT --backend B --first-layers N``: few-layer validation, streamed layer by layer.

NVIDIA's Edge-LLM validates an export on its first N decoder layers against a PyTorch golden, on
prefill and greedy decode, failing below cosine 0.99 or above a 0.25 norm-ratio error. Here the
golden is the torch reference in fp32 (reference kernels) and the model is truncated the same way
on both sides: embedding → decoder layers 0..N-1 → final norm → LM head.

Streaming: the walk of :mod:`m3_trt.compare.walk` (the one ``compare --layers`` runs over every
layer) stopped after layer N-1: one decoder layer of each side in memory at a time; each layer is
read (1 + decode steps) times.

What is judged, for every prompt, step and layer (and for the final norm and the logits):

* ``isolated``: the backend's layer i on the *reference's* input to layer i (with its own cache
  filled the same way) — the error that layer adds, so a failure names the layer that is wrong;
* ``cumulative``: the backend's own chain from its own embedding — what a user of the truncated
  backend model would see. Reported, not gated: one decode step is one token, and a token whose
  top-k expert scores sit within bf16 noise of each other changes experts and carries an O(1)
  error through every later layer (tiny, bf16: cos 0.80 at layer 1 on the 2nd decode step while
  every isolated layer stays above 0.997). Every per-layer defect — weights, scales, layout, cache
  writes — already shows in ``isolated``, which runs the backend's layer and cache on the same
  input.

Gate (``isolated`` rows): cosine ≥ ``FEW_LAYER_COS_MIN`` and relative error ``‖out − ref‖ / ‖ref‖``
≤ ``FEW_LAYER_REL_MAX`` (``m3_trt.compare.tolerances``). The relative error bounds the norm-ratio
error ``|‖out‖/‖ref‖ − 1|`` (triangle inequality), which is reported beside it. Decode tokens are
the reference's greedy choices, fed to both sides; the backend's own greedy choices are reported.

Legend: S prompt tokens, D hidden, V vocabulary; tensors are exchanged as float32 ``[1, S, D]``.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from m3_trt.model.config import M3Config

from m3_trt.compare.inputs import load_prompts, prepare
from m3_trt.compare.sides import STREAMED_BACKENDS, TorchPieces, make_pieces
from m3_trt.compare.tolerances import FEW_LAYER_COS_MIN, FEW_LAYER_REL_MAX
from m3_trt.compare.walk import walk

FIRST_LAYER_BACKENDS = STREAMED_BACKENDS


def _judge(row: dict, gated: bool) -> dict:
    within = row["cos"] >= FEW_LAYER_COS_MIN and row["rel"] <= FEW_LAYER_REL_MAX
    return {**row, "within": within, "gated": gated, "ok": within or not gated}


def run_first_layers(ckpt: Path, *, n_layers: int, backend: str, backend_path: Path | None = None,
                     dtype: str = "fp32", kernels: str = "reference", prompts: Path | None = None,
                     images: Path | None = None, decode_steps: int = 3, progress=print) -> dict:
    """Few-layer validation of ``backend`` against the fp32 reference; the report dict."""
    from m3_trt.processing import M3Processor

    t0 = time.perf_counter()
    ckpt = Path(ckpt)
    cfg = M3Config.from_pretrained(ckpt)
    L = cfg.text.num_hidden_layers
    if not 1 <= n_layers <= L:
        raise ValueError(f"--first-layers {n_layers}: the checkpoint has {L} decoder layers (choose 1..{L})")
    if decode_steps < 0:
        raise ValueError(f"--tokens must be >= 0, got {decode_steps}")
    records = [r for r in load_prompts(prompts, images) if not r["images"]]  # the text decoder only
    samples = prepare(records, M3Processor.from_pretrained(ckpt)) if records else []
    if not samples:
        raise ValueError("--first-layers validates the text decoder: the prompt set has no text-only prompt")
    progress(f"first-layers: {n_layers} of {L} layers, {len(samples)} text prompts, prefill + {decode_steps} decode "
             f"steps; reference fp32 vs {backend} {dtype}")
    ref = TorchPieces(ckpt, "fp32", "reference")
    out = make_pieces(backend, ckpt=ckpt, path=backend_path, dtype=dtype, kernels=kernels)
    if out.cfg.text.num_hidden_layers < n_layers:
        raise ValueError(f"the backend has {out.cfg.text.num_hidden_layers} layers, fewer than --first-layers "
                         f"{n_layers}")
    w = walk(ref, out, samples, n_layers=n_layers, steps=decode_steps + 1, progress=progress)
    # block choices are judged by the per-dtype tables of `compare --layers`; this gate is cosine + rel error
    rows = [_judge(r, gated=r["mode"] == "isolated") for r in w.rows if "cos" in r]
    greedy = w.greedy

    order = ["embedding", *(f"layer.{i}" for i in range(n_layers)), "final_norm", "logits"]
    summary = []
    for comp in order:
        for mode in ("isolated", "cumulative"):
            sel = [r for r in rows if r["component"] == comp and r["mode"] == mode]
            if sel:
                worst = min(sel, key=lambda r: (r["within"], r["cos"]))
                summary.append({"component": comp, "mode": mode, "cos_min": min(r["cos"] for r in sel),
                                "rel_max": max(r["rel"] for r in sel),
                                "norm_ratio_err_max": max(r["norm_ratio_err"] for r in sel),
                                "ok": all(r["ok"] for r in sel), "gated": mode == "isolated",
                                "within": all(r["within"] for r in sel), "worst_step": worst["step"],
                                "worst_prompt": worst["prompt"]})
    failures = [r for r in rows if not r["ok"]]
    return {
        "tool": "m3-trt compare", "mode": "first-layers", "checkpoint": str(ckpt), "backend": backend,
        "dtype": out.dtype, "backend_path": str(backend_path) if backend_path else None,
        "first_layers": n_layers, "decode_steps": decode_steps, "prompts": [s.name for s in samples],
        "thresholds": {"cos_min": FEW_LAYER_COS_MIN, "rel_max": FEW_LAYER_REL_MAX},
        "summary": summary, "rows": rows, "greedy": greedy,
        "failures": failures, "first_failure": failures[0] if failures else None,
        "verdict": "fail" if failures else "pass", "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def format_first_layers(rep: dict) -> str:
    th = rep["thresholds"]
    lines = [f"m3-trt compare --first-layers {rep['first_layers']}: backend {rep['backend']} ({rep['dtype']}) "
             f"against the fp32 reference, prefill + {rep['decode_steps']} decode steps, {len(rep['prompts'])} prompts",
             f"pass: cosine >= {th['cos_min']} and rel error <= {th['rel_max']} for every layer, step and prompt "
             f"(isolated: the backend's layer on the reference's input; cumulative is reported, not gated)", "",
             f"{'component':12s} {'mode':11s} {'cos-min':>10s} {'rel-max':>10s} {'|norm-1|':>10s}  {'':4s} worst at"]
    for s in rep["summary"]:
        mark = ("ok" if s["ok"] else "FAIL") if s["gated"] else ("-" if s["within"] else "(out)")
        lines.append(f"{s['component']:12s} {s['mode']:11s} {s['cos_min']:10.6f} {s['rel_max']:10.2e} "
                     f"{s['norm_ratio_err_max']:10.2e}  {mark:5s} {s['worst_step']}/"
                     f"{s['worst_prompt']}")
    for n, g in rep["greedy"].items():
        lines.append(f"greedy {n}: reference {g['reference']} backend {g['backend']}")
    f = rep["first_failure"]
    lines += ["", f"verdict: {rep['verdict'].upper()}" + (
        f" — first failure {f['component']} ({f['step']}, {f['mode']}, prompt {f['prompt']}): cos {f['cos']:.6f}, "
        f"rel {f['rel']:.3e}" if f else "")]
    return "\n".join(lines)


def cmd_first_layers(*, ckpt: Path, n_layers: int, backend: str, backend_path: Path | None, dtype: str,
                     kernels: str, prompts: Path | None, images: Path | None, tokens: int, out: Path) -> int:
    """The ``--first-layers`` path of ``m3-trt compare``: table on stdout; ``report.json`` (``mode:
    first-layers``, the marker the compare output rule recognises) and ``report.txt`` in ``out``."""
    print(f"compare --first-layers: ckpt={ckpt} layers={n_layers} backend={backend} dtype={dtype} kernels={kernels} "
          f"backend_path={backend_path} prompts={prompts or 'built-in'} decode_steps={tokens} out={out}", flush=True)
    rep = run_first_layers(ckpt, n_layers=n_layers, backend=backend, backend_path=backend_path, dtype=dtype,
                           kernels=kernels, prompts=prompts, images=images, decode_steps=tokens,
                           progress=lambda m: print(m, flush=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    table = format_first_layers(rep)
    (out / "report.txt").write_text(table + "\n")
    print()
    print(table)
    print(f"wrote {out / 'report.json'}, {out / 'report.txt'}")
    return 0 if rep["verdict"] == "pass" else 1
