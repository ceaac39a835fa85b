"""Sharded FP8 build (TP2+EP2, ONNX, MoE plugin with expert ranges): each rank's split graphs carry
the E4M3 codes and fp32 scales of its rank files, bit for bit; every rank's graphs match their
torch parts in ONNX Runtime (the build's own check); all ranks' ONNX outputs all-reduced
(``ShardedOnnxModel``) match the one-rank FP8 emulation (``m3_trt.quant.fp8``) on logits and
greedy tokens.

The one-rank reference is :class:`~m3_trt.quant.fp8.Fp8Emulation` on the unsharded fp32 model with
the build's calibrated activation scales, made to quantize what the sharded build quantizes: the
weight scales of a column-split weight are per (row, rank) — the scale grid the rank files hold,
checked equal to them here — and the routed experts are weight-only (the MoE node takes no
activation scales; their inputs stay in the activation dtype, as in the one-rank Q/DQ export).

Negative controls: a weight scale doubled in one rank's layer file fails the build's per-rank
check; an activation scale 64x too small in one rank's graph breaks the match with the emulation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tolerances import TOLERANCES

from m3_trt.build.builder import build
from m3_trt.build.targets import load_target
from m3_trt.model.modeling import M3ForConditionalGeneration
from m3_trt.model.rank import RankModel
from m3_trt.model.shard import Layout, local_experts, rule_for, shard_tensor
from m3_trt.quant.fp8 import E4M3_MAX, Fp8Emulation, is_fp8_weight

SETS = {"tp": 2, "ep": 2, "weight_dtype": "fp8", "max_seq_len": 64, "max_input_len": 48, "max_num_tokens": 64}
PROMPT, DECODE_STEPS = 24, 4
CALIB = ["Describe the sea at night in two sentences.", "List three prime numbers and explain why they are prime."]
# column-split weights: each rank quantizes its own columns, so a row has one scale per part
COLUMN_PARTS = {"q_cols": lambda lay: lay.tp, "tp_cols": lambda lay: lay.tp, "expert_cols": lambda lay: lay.moe_tp}


@pytest.fixture(scope="module")
def fp8_build(tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded-fp8")
    calib = tmp / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in CALIB))
    out = tmp / "w2-fp8"

    def whole_model(*a, **k):
        raise AssertionError("the sharded build materialized the whole model")

    with pytest.MonkeyPatch.context() as mp:  # streaming: no step may load the whole model
        mp.setattr(M3ForConditionalGeneration, "from_pretrained", whole_model)
        mp.setattr(RankModel, "from_full", whole_model)
        manifest = build(tiny_ckpt, load_target("cpu", SETS), out, progress=False, calib=calib)
    return out, manifest


def _scale_grid(name: str, w: torch.Tensor, lay: Layout) -> torch.Tensor:
    """``quantize_weight``'s per-row scale, per column part for a column-split weight: ``[..., rows, parts]``."""
    parts = COLUMN_PARTS.get(rule_for(name), lambda _: 1)(lay)
    w = w.float()
    return (w.reshape(*w.shape[:-1], parts, -1).abs().amax(-1) / E4M3_MAX).clamp_min(1e-12)


def _rank_scale(name: str, grid: torch.Tensor, cfg, lay: Layout, r: int) -> torch.Tensor:
    """Rank ``r``'s ``[..., rows_r, 1]`` slice of ``grid`` (what its fp8_scales file should hold)."""
    rule = rule_for(name)
    if rule not in COLUMN_PARTS:
        return shard_tensor(name, grid, cfg.text, lay, r)  # row-split or replicated: rows follow the weight
    if rule == "expert_cols":
        ex = local_experts(cfg.text, lay, r)
        return grid.narrow(0, ex.start, len(ex)).narrow(-1, lay.moe_tp_rank(r), 1)
    return grid.narrow(-1, lay.tp_rank(r), 1)


class _WeightOnlyExperts(Fp8Emulation):
    """The emulation with the routed experts' inputs left unquantized (the shared expert's are not)."""

    def act(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x if self.mode == "quantize" and ".mlp.experts." in name else super().act(name, x)


def _emulation(ckpt, out):
    """The one-rank reference (module docstring) and its weight scale grids."""
    model = M3ForConditionalGeneration.from_pretrained(ckpt)
    lay = Layout(**json.loads((out / "build.json").read_text())["layout"])
    grids = {k: _scale_grid(k, v, lay) for k, v in model.state_dict().items() if is_fp8_weight(k, v)}
    emu = _WeightOnlyExperts(block_scales=grids).attach(model)
    act = json.loads((out / "calibration.json").read_text())["activation_scales"]
    emu.amax, emu.mode = {k: s * E4M3_MAX for k, s in act.items()}, "quantize"
    return model, grids, lay


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _run(sm, ref, ids, steps: int = DECODE_STEPS) -> tuple[list[float], list[int], list[int]]:
    """Prefill + ``steps`` greedy decode steps in lock step (the reference's tokens fed to both);
    returns the per-step logits errors and both models' argmax tokens."""
    cache, caches = ref.new_cache(1, ids.shape[1] + steps + 1), sm.new_cache(1)
    with torch.no_grad():
        rl, cache = ref(ids, cache=cache)
    ol = sm.forward(ids.numpy(), caches, 0)
    errs, ref_toks, onnx_toks = [_rel(ol, rl)], [], []
    for step in range(steps):
        ref_toks.append(int(rl[0, -1].argmax()))
        onnx_toks.append(int(np.argmax(ol[0, -1])))
        with torch.no_grad():
            rl, cache = ref(torch.tensor([[ref_toks[-1]]]), cache=cache)
        ol = sm.forward(np.array([[ref_toks[-1]]], np.int64), caches, ids.shape[1] + step)
        errs.append(_rel(ol, rl))
    return errs, ref_toks, onnx_toks


def test_rank_graphs_carry_the_rank_files_fp8_bytes(fp8_build, tiny_ckpt):
    """Every E4M3 code and weight scale in the rank graphs is the rank file's, bit for bit; the
    MoE node holds the rank's expert range; the scales are the emulation's grid."""
    import onnx

    out, m = fp8_build
    assert m["onnx"]["weights"].startswith("fp8 Q/DQ (each rank's E4M3 codes")
    ref, grids, lay = _emulation(tiny_ckpt, out)
    cfg = ref.config
    checked = 0
    for r in range(lay.world):
        rank_dir = out / f"rank{r}" / "onnx"
        man = json.loads((rank_dir / "manifest.json").read_text())
        ex = local_experts(cfg.text, lay, r)
        assert man["quant"] == "fp8" and man["expert_range"] == [ex.start, len(ex)]
        moe = onnx.load(str(rank_dir / "mlp_moe.onnx"), load_external_data=False).graph
        attrs = [{a.name: a.i for a in n.attribute if a.name.startswith("expert_")}
                 for n in moe.node if n.op_type == "M3SwigluMoE"]
        assert attrs == [{"expert_offset": ex.start, "expert_count": len(ex)}]
        graphs = json.loads((out / "onnx_graphs" / "graphs.json").read_text())
        with safe_open(str(out / f"rank{r}" / "weights.safetensors"), "pt") as fw, \
                safe_open(str(out / f"rank{r}" / "fp8_scales.safetensors"), "pt") as fs:
            for e in man["layers"]:
                prefix = f"model.language_model.layers.{e['index']}."
                for part, sub in (("attn", "self_attn."), ("mlp", "mlp.")):
                    layout = graphs[e[part]["graph"]]["layout"]
                    raw = (rank_dir / e[part]["data"]).read_bytes()
                    for init, (off, n) in layout.items():
                        if not init.endswith("_e4m3"):
                            continue
                        # graph names: attn.<x>.weight_e4m3 / mlp.experts.<x>_e4m3 -> the rank file's key
                        key = prefix + sub + init.split(".", 1)[1].removesuffix("_e4m3")
                        codes, scale = fw.get_tensor(key), fs.get_tensor(key + "_scale_inv")
                        assert raw[off:off + n] == codes.view(torch.uint8).numpy().tobytes(), key
                        s_off, s_n = layout[init.removesuffix("_e4m3") + "_scale"]
                        assert raw[s_off:s_off + s_n] == scale.float().numpy().tobytes(), key
                        assert torch.equal(scale, _rank_scale(key, grids[key], cfg, lay, r)), key
                        checked += 1
    n_fp8 = sum(1 for k, v in ref.state_dict().items() if is_fp8_weight(k, v))
    assert checked == lay.world * n_fp8, (checked, n_fp8)


def test_each_rank_verified_and_a_corrupted_scale_is_caught(fp8_build, tiny_ckpt):
    from m3_trt.export.onnx.ranks import RankWeights, read_act_scales, verify_rank
    from m3_trt.model.config import M3Config

    out, m = fp8_build
    tol = TOLERANCES[("onnx_component", "fp32")]
    for r in ("0", "1"):
        v = m["onnx"]["ranks"][r]["verify"]
        assert v["ok"] and v["tolerance"] == tol and len(v["components"]) == 16, v
        assert "E4M3 codes" in v["reference"]
    # negative control: rank 1's layer-0 down_proj scales doubled in its ONNX weight file
    rank_dir = out / "rank1" / "onnx"
    graphs = json.loads((out / "onnx_graphs" / "graphs.json").read_text())
    off, n = graphs["mlp_dense"]["layout"]["mlp.down_proj.weight_scale"]
    data = rank_dir / "layer_0.mlp.data"
    raw = bytearray(data.read_bytes())
    good = bytes(raw)
    raw[off:off + n] = (np.frombuffer(good[off:off + n], np.float32) * 2).tobytes()
    data.write_bytes(bytes(raw))
    try:
        cfg = M3Config.from_dict(json.loads((out / "build.json").read_text())["config"])
        rm = RankModel.on_meta(cfg, Layout.of(tp=2, ep=2), 1, "custom_op")
        bad = verify_rank(rm, rank_dir, RankWeights(out / "rank1"), read_act_scales(out / "calibration.json"))
    finally:
        data.write_bytes(good)
    failed = sorted(k for k, c in bad["components"].items() if not c["ok"])
    assert not bad["ok"] and failed == ["layer_0.mlp/decode", "layer_0.mlp/prefill"], failed


def test_all_reduced_rank_graphs_match_one_rank_fp8_emulation(fp8_build, tiny_ckpt):
    from m3_trt.runtime.onnx_ranks import ShardedOnnxModel

    out, _ = fp8_build
    ref, _, _ = _emulation(tiny_ckpt, out)
    ids = torch.randint(0, 900, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    sm = ShardedOnnxModel(out)
    errs, ref_toks, onnx_toks = _run(sm, ref, ids)
    tol = TOLERANCES[("sharded_fp8_vs_emulation", "fp32")]
    print(f"TP2+EP2 FP8 rank graphs vs one-rank FP8 emulation: prefill {errs[0]:.2e}, decode max {max(errs[1:]):.2e}")
    assert max(errs) <= tol, errs
    assert onnx_toks == ref_toks
    # negative control: rank 0's layer-0 q_proj input scale 64x too small (its inputs clip at amax/64)
    import onnxruntime as ort
    from onnx import numpy_helper

    from m3_trt.export.onnx.runtime import layer_model, session_options

    rk = sm.ranks[0]
    good = rk.sessions[0]["attn"]
    proto = layer_model(rk.dir, rk.layers[0]["attn"]["file"], rk.layers[0]["attn"]["data"])
    init = next(i for i in proto.graph.initializer if i.name == "attn.q_proj.act_scale")
    init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) / 64).astype(np.float32), init.name))
    rk.sessions[0]["attn"] = ort.InferenceSession(proto.SerializeToString(), session_options(True))
    try:
        bad, _, _ = _run(sm, ref, ids, steps=0)
    finally:
        rk.sessions[0]["attn"] = good
    print(f"with one input scale 64x too small: {bad[0]:.2e}")
    assert bad[0] > 10 * tol, bad
