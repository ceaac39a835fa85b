"""The streamed layer walk of ``m3-trt compare``: reference layer i and backend layer i on the same inputs.

Used by ``compare --layers`` (all decoder layers, :mod:`m3_trt.compare.streamed`) and by
``compare --first-layers N`` (the first N, :mod:`m3_trt.compare.few_layers`).

Work goes step-major, then layer-major: for each step (the prefill, then each decode step) and each
layer i, reference layer i and backend layer i are materialized (two :mod:`m3_trt.compare.sides`),
run on every prompt, and dropped before layer i+1. Memory holds one decoder layer of each side
plus the prompts' hidden states and KV caches; each layer is read once per step.

Three chains run per prompt:

* ``ref``: the reference, its own output carried from layer to layer;
* ``isolated``: backend layer i on the *reference's* input to layer i (its own cache, filled the same
  way) — the error that layer adds alone, so a wrong layer is named by itself;
* ``cumulative``: the backend's own chain from its own embedding (and its own vision tower and
  projector) — what the backend's user sees; the number the whole-model comparison measures.

Decode tokens are the reference's greedy choices, fed to all chains; a prompt stops after the
reference emits an ``eos`` id. The backend's own greedy choice at each step (the cumulative chain's
argmax) is recorded beside the reference's: up to the first difference this is exactly the backend's
free-running greedy continuation (same tokens in, same tokens out).

Each row: ``component`` (``vision_encoder``, ``projector``, ``embedding``, ``indexer.<i>``,
``layer.<i>``, ``final_norm``, ``logits``), ``step`` (``prefill`` or ``decode.<k>``), ``prompt``,
``mode`` (``isolated`` | ``cumulative``) and the metrics: ``rel``, ``max_abs``, ``cos``,
``norm_ratio_err`` (``|‖out‖/‖ref‖ - 1|``) for tensors, ``block_agreement`` for block choices.

Legend: S prompt tokens, D hidden, V vocabulary; tensors are exchanged as float32 ``[1, S, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from m3_trt.compare import metrics as M
from m3_trt.compare.inputs import Sample


def tensor_row(out: torch.Tensor, ref: torch.Tensor) -> dict:
    M.check_shapes(out, ref)
    ratio = float(out.double().norm() / ref.double().norm().clamp_min(1e-30))
    return {**M.tensor_metrics(out, ref), "norm_ratio_err": abs(ratio - 1.0)}


@dataclass
class Walk:
    """What a walk measured: one row per (component, step, prompt, mode); greedy ids; prefill logits metrics."""

    rows: list[dict] = field(default_factory=list)
    greedy: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    logits: dict[str, dict] = field(default_factory=dict)  # prompt -> logits_metrics(ref, cumulative) at prefill


def walk(ref, out, samples: list[Sample], *, n_layers: int, steps: int, eos: tuple[int, ...] = (),
         isolated: bool = True, progress=None) -> Walk:
    """Run ``steps`` forward steps (prefill + ``steps - 1`` decode steps) through embedding, the first
    ``n_layers`` decoder layers and the head of both sides; see the module docstring."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    res = Walk()
    names = [s.name for s in samples]
    if len(set(names)) != len(names):
        raise ValueError(f"prompt names must be unique, got {names}")
    # each prompt's cache holds its own positions only: padding a cache changes the attention kernels'
    # reduction lengths, hence the rounding, and the whole-model comparison uses no padding at all
    max_len = {s.name: s.input_ids.shape[1] + steps for s in samples}
    chains = ("ref", "iso", "cum") if isolated else ("ref", "cum")
    caches = {n: {c: [None] * n_layers for c in chains} for n in names}
    inputs = {s.name: s.input_ids for s in samples}
    start = {n: 0 for n in names}
    res.greedy = {n: {"reference": [], "backend": []} for n in names}
    modes = (("isolated", "iso"), ("cumulative", "cum")) if isolated else (("cumulative", "cum"),)

    def record(component, step, prompt, mode, o, r):
        m = ({"block_agreement": M.block_agreement(o, r)} if component.startswith("indexer.")
             else tensor_row(o, r))
        res.rows.append({"component": component, "step": step, "prompt": prompt, "mode": mode, **m})

    for step in range(steps):
        label = "prefill" if step == 0 else f"decode.{step}"
        live = [n for n in names if inputs[n] is not None]
        if not live:
            break
        pos = {n: torch.arange(start[n], start[n] + inputs[n].shape[1])[None] for n in live}
        img_ref = img_iso = img_cum = {n: None for n in live}
        if step == 0:
            pics = [s for s in samples if s.pixel_values is not None]
            if pics:
                px = [(s.pixel_values, s.image_grid_thw) for s in pics]
                f_ref, f_out = ref.vision(px), out.vision(px)
                t_ref, t_cum = ref.project(f_ref), out.project(f_out)
                t_iso = out.project(f_ref) if isolated else t_cum
                img_ref, img_iso, img_cum = (dict(img_ref), dict(img_iso), dict(img_cum))
                for k, s in enumerate(pics):
                    for mode, _ in modes:  # the tower has no input from an earlier piece: one number, shown twice
                        record("vision_encoder", label, s.name, mode, f_out[k], f_ref[k])
                    if isolated:
                        record("projector", label, s.name, "isolated", t_iso[k], t_ref[k])
                    record("projector", label, s.name, "cumulative", t_cum[k], t_ref[k])
                    img_ref[s.name], img_iso[s.name], img_cum[s.name] = t_ref[k], t_iso[k], t_cum[k]
        ids = [inputs[n] for n in live]
        h = {"ref": dict(zip(live, ref.embed(ids, [img_ref[n] for n in live])))}
        h["cum"] = dict(zip(live, out.embed(ids, [img_cum[n] for n in live])))
        if isolated:
            spliced = step == 0 and any(img_iso[n] is not None for n in live)
            e_iso = out.embed(ids, [img_iso[n] for n in live]) if spliced else [h["cum"][n] for n in live]
            for n, e in zip(live, e_iso):
                record("embedding", label, n, "isolated", e, h["ref"][n])
        for n in live:
            record("embedding", label, n, "cumulative", h["cum"][n], h["ref"][n])
        for i in range(n_layers):
            with ref.layer(i) as rl, out.layer(i) as ol:
                for n in live:
                    c = caches[n]
                    if step == 0:
                        c["ref"][i] = ref.new_cache(i, max_len[n])
                        for ch in chains[1:]:
                            c[ch][i] = out.new_cache(i, max_len[n])
                    r, r_idx = rl.run(h["ref"][n], pos[n], c["ref"][i])
                    for mode, ch in modes:
                        o, o_idx = ol.run(h["ref" if ch == "iso" else "cum"][n], pos[n], c[ch][i])
                        if r_idx is not None and o_idx is not None:
                            record(f"indexer.{i}", label, n, mode, o_idx, r_idx)
                        record(f"layer.{i}", label, n, mode, o, r)
                        if ch == "cum":
                            h["cum"][n] = o
                    h["ref"][n] = r
        ref_heads = ref.head([h["ref"][n] for n in live])
        srcs = [("isolated", h["ref"])] * isolated + [("cumulative", h["cum"])]
        out_heads = out.head([src[n] for _, src in srcs for n in live])
        for k, n in enumerate(live):
            rn, rlog = ref_heads[k]
            for j, (mode, _) in enumerate(srcs):
                on, olog = out_heads[j * len(live) + k]
                record("final_norm", label, n, mode, on, rn)
                record("logits", label, n, mode, olog, rlog)
            clog = out_heads[(len(srcs) - 1) * len(live) + k][1]
            if step == 0:
                res.logits[n] = M.logits_metrics(rlog[0], clog[0])
            tok = int(rlog[0, -1].argmax())
            res.greedy[n]["reference"].append(tok)
            res.greedy[n]["backend"].append(int(clog[0, -1].argmax()))
            start[n] += inputs[n].shape[1]
            inputs[n] = None if tok in eos else torch.tensor([[tok]])
        if progress:
            now = [r for r in res.rows if r["step"] == label and r["mode"] == modes[0][0] and "cos" in r
                   and r["component"].startswith("layer.")]
            progress(f"  {label}: {modes[0][0]} layer cos-min " + ", ".join(
                f"{i}:{min(r['cos'] for r in now if r['component'] == f'layer.{i}'):.5f}" for i in range(n_layers)))
    return res
