"""``m3-trt compare`` for backends that run layer by layer (torch, ONNX Runtime, a sharded build): the streamed walk.

One decoder layer of the fp32 reference (:class:`m3_trt.compare.sides.TorchPieces`) and one of the
backend are in memory at a time (:func:`m3_trt.compare.walk.walk`). Per component, the report has
two numbers judged by the same (backend, dtype) tolerance:

* ``cumulative`` (the row's ``worst``, as before streaming): the backend's own chain against the
  reference — the number the whole-model comparison measured (the same modules on the same
  inputs: equal to its figures within fp32 rounding, ``tests/test_compare_streamed.py``);
* ``isolated`` (``row["isolated"]``): the backend's component on the reference's input to it, so
  the first failing row names the component that is wrong, not every one after it.

A component passes when both are within the tolerance. Components are the prefill's (the prompt
forward); decode steps feed greedy generation, judged as before, and their per-layer isolated
errors are reported (``decode``), not gated. Without ``--layers`` only the cumulative chain runs and
only the logits are judged.
"""

from __future__ import annotations

from pathlib import Path

from m3_trt.compare.sides import TorchPieces, make_pieces
from m3_trt.compare.tolerances import Tolerance, tolerance_for
from m3_trt.compare.walk import walk


def own_prefix(ref_ids: list[int], out_ids: list[int]) -> list[int]:
    """The backend's ids up to and including its first difference from the reference's: the walk feeds
    the reference's tokens to both sides, so later backend ids would answer the reference's text."""
    for k, (a, b) in enumerate(zip(ref_ids, out_ids)):
        if a != b:
            return out_ids[:k + 1]
    return out_ids


def measure_streamed(ckpt: Path, samples: list, *, backend: str, dtype: str, fp8: bool, kernels: str,
                     backend_path: Path | None, layers: bool, tokens: int, eos: tuple[int, ...], judge,
                     progress) -> dict:
    """Walk every layer of both sides; ``judge(per_prompt, tol) -> rows`` is the runner's component judge.

    Returns ``dtype``, ``tol``, ``components`` (judged rows with ``isolated`` beside each),
    ``logit_stats`` (per prompt), ``greedy`` (``(prompt, reference ids, backend ids)``), ``decode``.
    """
    progress(f"streamed: one decoder layer of each side in memory at a time; reference fp32 from {ckpt}")
    ref = TorchPieces(ckpt, "fp32", "reference")
    out = make_pieces(backend, ckpt=ckpt, path=backend_path, dtype=dtype, kernels=kernels, fp8=fp8,
                      progress=progress)
    L = ref.cfg.text.num_hidden_layers
    if out.cfg.text.num_hidden_layers != L:
        raise ValueError(f"the backend has {out.cfg.text.num_hidden_layers} decoder layers, the checkpoint {L}")
    tol: Tolerance = tolerance_for(backend, out.dtype)
    w = walk(ref, out, samples, n_layers=L, steps=max(tokens, 1), eos=eos, isolated=layers, progress=progress)

    per_mode: dict[str, dict[str, dict]] = {"isolated": {}, "cumulative": {}}
    for r in w.rows:
        if r["step"] != "prefill" or (not layers and r["component"] != "logits"):
            continue
        metrics = ({"block_agreement": r["block_agreement"]} if "block_agreement" in r
                   else {k: r[k] for k in ("rel", "max_abs", "cos")})
        per_mode[r["mode"]].setdefault(r["prompt"], {})[r["component"]] = metrics
    rows = judge(per_mode["cumulative"], tol)
    iso = {c["name"]: c for c in judge(per_mode["isolated"], tol)} if layers else {}
    for c in rows:
        c["mode"] = "cumulative"
        if c["name"] in iso:
            i = iso[c["name"]]
            c["isolated"] = {k: i[k] for k in ("worst", "worst_prompt", "ok", "max_abs", "cos_min", "per_prompt")
                             if k in i}
            c["cumulative_ok"] = c["ok"]
            c["ok"] = c["ok"] and i["ok"]

    decode = []
    if layers:
        for i in range(L):
            sel = [r for r in w.rows if r["step"] != "prefill" and r["mode"] == "isolated"
                   and r["component"] == f"layer.{i}"]
            if sel:
                decode.append({"name": f"layer.{i}", "isolated_rel_max": max(r["rel"] for r in sel),
                               "isolated_cos_min": min(r["cos"] for r in sel), "steps": len(sel)})
    logit_stats = [{"prompt": n, "rel": per_mode["cumulative"][n]["logits"]["rel"], **m} for n, m in w.logits.items()]
    greedy = [(n, g["reference"][:tokens], own_prefix(g["reference"][:tokens], g["backend"][:tokens]))
              for n, g in w.greedy.items()] if tokens else []
    return {"dtype": out.dtype, "tol": tol, "components": rows, "logit_stats": logit_stats, "greedy": greedy,
            "decode": decode}
