"""build-engine with ONNX: the cpu target's export (export_model, verified) and a TP2+EP2 build's
per-rank split graphs, both run in ONNX Runtime against the torch reference. The sharded build uses
``plugins = "none"`` (the rank's experts in standard ops); the MoE plugin with expert ranges is
covered by the sharded FP8 build (``test_sharded_fp8.py``).

Negative controls: swapping two decoder layers' sessions changes the cpu export's tokens; skipping
the attention all-reduce between the per-rank graphs breaks the sharded logits.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from tolerances import TOLERANCES

from m3_trt.build.builder import build
from m3_trt.model.generate import greedy
from m3_trt.model.modeling import M3ForConditionalGeneration
from m3_trt.build.targets import load_target

DECODE_STEPS = 8


def _ids():
    return torch.randint(0, 900, (1, 40), generator=torch.Generator().manual_seed(0))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_cpu_target_onnx_generates_reference_greedy_tokens(tiny_ckpt, tmp_path):
    from m3_trt.export.onnx.runtime import OnnxModel
    from m3_trt.runtime.run import generate_sharded

    out = tmp_path / "cpu"
    m = build(tiny_ckpt, load_target("cpu"), out, progress=False)
    v = m["onnx"]["ranks"]["0"]["verify"]
    assert v["ok"] and len(v["components"]) >= 12, v
    assert json.loads((out / "rank0/onnx/manifest.json").read_text())["plugins"] == "m3"
    ids = _ids()
    ref = greedy(M3ForConditionalGeneration.from_pretrained(tiny_ckpt), ids, DECODE_STEPS)
    onnx_model = OnnxModel(out / "rank0" / "onnx")
    assert onnx_model.generate(ids.numpy(), DECODE_STEPS) == ref
    assert generate_sharded(out, ids, DECODE_STEPS) == ref  # the torch runtime on the same build
    # negative control: layers 1 and 2 (both sparse) swapped
    s = onnx_model.layer_sessions
    s[1], s[2] = s[2], s[1]
    assert onnx_model.generate(ids.numpy(), DECODE_STEPS) != ref


def test_tp2_ep2_per_rank_onnx_with_numpy_collectives_equals_unsharded(tiny_ckpt, tmp_path):
    from m3_trt.runtime.run import generate_sharded
    from m3_trt.runtime.onnx_ranks import ShardedOnnxModel

    out = tmp_path / "w2"
    sets = {"tp": 2, "ep": 2, "plugins": "none", "max_seq_len": 64, "max_input_len": 48, "max_num_tokens": 64}
    m = build(tiny_ckpt, load_target("cpu", sets), out, progress=False)
    assert all(m["onnx"]["ranks"][r]["verify"]["ok"] for r in ("0", "1"))
    rank_manifest = json.loads((out / "rank1/onnx/manifest.json").read_text())
    assert rank_manifest["graphs"]["mlp_moe"]["custom_ops"] == [] and rank_manifest["expert_range"] is None
    cols = [e["collectives"] for e in rank_manifest["layers"]]
    assert all(c["attn_out"] == "all_reduce" and c["mlp_out"] == "all_reduce" for c in cols), cols
    ref = M3ForConditionalGeneration.from_pretrained(tiny_ckpt)
    ids = _ids()
    sm = ShardedOnnxModel(out)

    def run(model) -> tuple[list[float], list[int]]:
        cache, caches = ref.new_cache(1, ids.shape[1] + DECODE_STEPS + 1), model.new_cache(1)
        with torch.no_grad():
            rl, cache = ref(ids, cache=cache)
        ol = model.forward(ids.numpy(), caches, 0)
        errs, toks = [_rel(ol, rl)], []
        for step in range(DECODE_STEPS):
            toks.append(int(rl[0, -1].argmax()))
            with torch.no_grad():
                rl, cache = ref(torch.tensor([[toks[-1]]]), cache=cache)
            ol = model.forward(np.array([[toks[-1]]], np.int64), caches, ids.shape[1] + step)
            errs.append(_rel(ol, rl))
        return errs, toks

    errs, toks = run(sm)
    print(f"TP2+EP2 per-rank ONNX vs unsharded: prefill {errs[0]:.2e}, decode max {max(errs[1:]):.2e}")
    assert max(errs) <= TOLERANCES[("sharded", "fp32")], errs
    assert generate_sharded(out, ids, DECODE_STEPS) == toks  # the torch runtime on the same build
    # negative control: each rank keeps its own attention partial (no all-reduce)
    for e in sm.ranks[0].layers:
        e["collectives"]["attn_out"] = "none"
    bad, _ = run(sm)
    assert min(bad) > 100 * TOLERANCES[("sharded", "fp32")], bad
