"""``compare --layers`` streamed layer by layer (issue 12, item 9).

* Numbers: on the tiny checkpoint the streamed walk's per-component errors (cumulative: the
  backend's own chain) equal the whole-model path's, which loads both models and records every
  component on one forward. Tolerance: |streamed - whole| <= 1e-6 x the value (+1e-12): fp32
  round-off (6e-8) a few times over, for a cache one position longer than the prompt; measured:
  bit-equal (0.0). Block choices and greedy ids exactly equal.
* Negative control: layer 2's ``o_proj`` scaled by 1.01 in the backend's copy. ``isolated`` (the
  layer on the reference's input) flags layer 2 only; ``cumulative`` passes before layer 2 and fails
  from layer 2 on; the first failure names layer 2.
* Memory: ``m3-trt compare --layers`` (torch bf16 against the fp32 reference) at 12 layers peaks
  within 1.25x of 4 layers at the same width, each run in a subprocess; negative control: the
  whole-model path at the same depths grows past 1.25x, so the bound can fail.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from safetensors.torch import load_file, save_file

from m3_trt.compare.runner import run_compare
from m3_trt.processing.samples import demo_image_png
from memory_util import MEMORY_RATIO, make_wide, peak_mib

ROUNDING = 1e-6  # |streamed - whole| / value, see the module docstring
BAD_KEY = "language_model.model.layers.2.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def two_prompts(tmp_path_factory):
    """A text prompt and an image prompt (so the vision tower and projector are compared too)."""
    d = tmp_path_factory.mktemp("prompts")
    (d / "demo.png").write_bytes(demo_image_png())
    f = d / "p.jsonl"
    f.write_text(json.dumps({"name": "text", "prompt": "Name three animals that live in the sea and say why."}) + "\n"
                 + json.dumps({"name": "image", "prompt": "Describe the picture.", "images": ["demo.png"]}) + "\n")
    return f


@pytest.fixture(scope="module")
def scaled_layer2(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with layer 2's o_proj scaled by 1.01 (a 1% error in one weight)."""
    work = shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("bad") / "ckpt")
    shard = work / json.loads((work / "model.safetensors.index.json").read_text())["weight_map"][BAD_KEY]
    state = load_file(shard)
    state[BAD_KEY] = state[BAD_KEY] * 1.01
    save_file(state, shard, metadata={"format": "pt"})
    return work


def _by_name(rep):
    return {c["name"]: c for c in rep["components"]}


def test_streamed_errors_equal_whole_model_and_name_the_scaled_layer(tiny_ckpt, scaled_layer2, two_prompts):
    kw = dict(backend="torch", backend_path=scaled_layer2, layers=True, tokens=2, prompts=two_prompts,
              progress=lambda m: None)
    whole = run_compare(tiny_ckpt, stream=False, **kw)
    streamed = run_compare(tiny_ckpt, **kw)
    assert (whole["mode"], streamed["mode"]) == ("whole-model", "streamed")
    w, s = _by_name(whole), _by_name(streamed)
    assert list(w) == list(s) and {"vision_encoder", "projector", "indexer.1", "layer.3", "logits"} <= set(s)
    for name, c in w.items():
        for prompt, v in c["per_prompt"].items():
            got = s[name]["per_prompt"][prompt]
            if "block_agreement" in v:
                assert got["block_agreement"] == v["block_agreement"], (name, prompt)
            else:
                assert abs(got["rel"] - v["rel"]) <= ROUNDING * v["rel"] + 1e-12, (name, prompt, got, v)
    for a, b in zip(whole["greedy"], streamed["greedy"]):
        assert (a["prompt"], a["first_divergence"], a["exact_match"]) == (b["prompt"], b["first_divergence"],
                                                                          b["exact_match"])
    assert streamed["end_to_end"]["kl"] == pytest.approx(whole["end_to_end"]["kl"], rel=1e-4, abs=1e-12)

    # negative control: layer 2 is wrong; isolated flags it alone, cumulative from it on
    layers = [f"layer.{i}" for i in range(4)]
    assert [s[n]["isolated"]["ok"] for n in layers] == [True, True, False, True]
    after = layers + ["final_norm", "logits"]
    assert [s[n]["cumulative_ok"] for n in after] == [True, True, False, False, False, False]
    assert all(s[n]["ok"] for n in ("vision_encoder", "projector", "embedding", "indexer.1", "indexer.2"))
    assert s["layer.2"]["isolated"]["worst"] > 100 * s["layer.2"]["tolerance"]  # far past fp32 noise, not marginal
    assert s["layer.3"]["isolated"]["worst"] < s["layer.3"]["tolerance"] < s["layer.3"]["worst"]
    f = streamed["first_failure"]
    assert (f["what"], f["mode"]) == ("layer.2", "isolated"), f
    # the whole-model path sees the same layer first, but only as a cumulative error
    assert whole["first_failure"]["what"] == "layer.2"


def test_onnx_export_streamed_passes_and_isolates_a_scrambled_layer(tiny_ckpt, tiny_export, two_prompts, tmp_path):
    export = tiny_export("none")
    kw = dict(backend="onnxruntime", layers=True, tokens=2, prompts=two_prompts, progress=lambda m: None)
    rep = run_compare(tiny_ckpt, backend_path=export, **kw)
    assert rep["mode"] == "streamed" and rep["verdict"] == "pass", rep["first_failure"]
    assert all(c["isolated"]["worst"] < 1e-5 for c in rep["components"] if c["metric"] == "rel")
    assert rep["decode_isolated"] and all(d["isolated_rel_max"] < 1e-5 for d in rep["decode_isolated"])
    work = shutil.copytree(export, tmp_path / "bad")
    raw = bytearray((work / "layer_2.data").read_bytes())
    raw[:256] = bytes(reversed(raw[:256]))
    (work / "layer_2.data").write_bytes(bytes(raw))
    s = _by_name(run_compare(tiny_ckpt, backend_path=work, **kw))
    assert [s[f"layer.{i}"]["isolated"]["ok"] for i in range(4)] == [True, True, False, True]
    assert [s[f"layer.{i}"]["cumulative_ok"] for i in range(4)] == [True, True, False, False]


def test_compare_layers_peak_rss_flat_in_depth(tmp_path):
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"input_ids": list(range(1, 9))}) + "\n")  # 8 tokens: the weights dominate memory
    peaks, whole = {}, {}
    for n in (4, 12):
        ck = make_wide(tmp_path / f"c{n}", n)
        peaks[n] = peak_mib([sys.executable, "-m", "m3_trt.cli.main", "compare", str(ck), "--backend", "torch",
                             "--dtype", "bf16", "--layers", "--tokens", "0", "--prompts", str(ids),
                             "--out", str(tmp_path / f"o{n}")], ok=(0, 1))  # 1: a bf16 tolerance exceeded
        rep = json.loads((tmp_path / f"o{n}" / "report.json").read_text())
        assert rep["mode"] == "streamed" and len([c for c in rep["components"] if c["name"].startswith("layer.")]) == n
        # negative control: the whole-model path (both models in memory; logits only, to keep it short)
        whole[n] = peak_mib([sys.executable, "-c", "import sys; from pathlib import Path; "
                             "from m3_trt.compare.runner import run_compare; run_compare(Path(sys.argv[1]), "
                             "backend='torch', dtype='bf16', tokens=0, prompts=Path(sys.argv[2]), "
                             "stream=False, progress=lambda m: None)", str(ck), str(ids)])
    print(f"peak RSS MiB: compare --layers streamed {peaks}, whole-model {whole}")
    assert peaks[12] <= MEMORY_RATIO * peaks[4], peaks
    assert whole[12] > MEMORY_RATIO * whole[4], whole


def test_sharded_build_streamed_passes_and_isolates_a_scaled_rank_slice(tiny_ckpt, tmp_path):
    """tp=2, ep=2 build: each rank's slice of a layer runs as a thread, partial sums added on the host."""
    from m3_trt.build.builder import build
    from m3_trt.build.targets import load_target

    out = tmp_path / "build"
    build(tiny_ckpt, load_target("cpu", {"onnx": False, "tp": 2, "ep": 2}), out, progress=False)
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"input_ids": list(range(3, 60))}) + "\n")
    kw = dict(backend="sharded", layers=True, tokens=2, prompts=ids, progress=lambda m: None)
    rep = run_compare(tiny_ckpt, backend_path=out, **kw)
    assert rep["mode"] == "streamed" and rep["verdict"] == "pass", rep["first_failure"]
    assert all(c["isolated"]["worst"] < 1e-5 for c in rep["components"] if c["metric"] == "rel")
    # negative control: rank 1's slice of layer 2's o_proj scaled by 1.01 (one rank's partial sum wrong)
    f = out / "rank1" / "weights.safetensors"
    state = load_file(f)
    key = "model.language_model.layers.2.self_attn.o_proj.weight"
    state[key] = state[key] * 1.01
    save_file(state, f)
    s = _by_name(run_compare(tiny_ckpt, backend_path=out, **kw))
    assert [s[f"layer.{i}"]["isolated"]["ok"] for i in range(4)] == [True, True, False, True]
    assert [s[f"layer.{i}"]["cumulative_ok"] for i in range(4)] == [True, True, False, False]
