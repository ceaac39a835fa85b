"""``m3-trt compare``: metrics by hand, the CLI on the tiny checkpoint, negative controls, FP8 emulation."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from m3_trt.compare import metrics as M


# -- metrics against hand-computed values ---------------------------------------------------------

def test_kl_matches_hand_computed():
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64))
    out = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]], dtype=torch.float64))
    # KL([.5,.5] || [.25,.75]) = .5 ln 2 + .5 ln(2/3) = .5 ln(4/3); the second row is identical (0)
    assert M.kl_mean(ref, out) == pytest.approx(0.5 * math.log(4 / 3) / 2, rel=1e-12)
    assert M.kl_mean(ref, ref) == pytest.approx(0.0, abs=1e-15)


def test_topk_agreement_matches_hand_computed():
    ref = torch.tensor([[9., 8, 7, 6, 5, 4, 3], [1, 2, 3, 4, 5, 6, 7]])
    out = torch.tensor([[8., 9, 7, 6, 0, 4, 5],   # top1 differs; top5 {0,1,2,3,6} vs {0,1,2,3,4}: 4 of 5
                        [1, 2, 3, 4, 5, 6, 7]])   # identical
    assert M.topk_agreement(ref, out, 1) == pytest.approx(0.5)
    assert M.topk_agreement(ref, out, 5) == pytest.approx((4 / 5 + 1) / 2)


def test_greedy_first_divergence_and_continuations():
    g = M.greedy_match([5, 6, 7, 8], [5, 6, 9, 8, 1])
    assert (g["exact_match"], g["first_divergence"]) == (2, 2)
    assert g["ref_continuation"] == [7, 8] and g["out_continuation"] == [9, 8, 1]
    same = M.greedy_match([1, 2], [1, 2])
    assert (same["exact_match"], same["first_divergence"]) == (2, None)
    prefix = M.greedy_match([1, 2, 3], [1, 2])  # the backend stopped early (EOS): diverges at 2
    assert prefix["first_divergence"] == 2
    text = M.greedy_match("hello world", "hello there")
    assert text["first_divergence"] == 6 and text["out_continuation"] == "there"


def test_block_agreement_compares_sets_not_order():
    ref = torch.tensor([[[[0, 2, -1], [1, 3, 4]]]], dtype=torch.int32)     # [B=1, G=1, S=2, K=3]
    same_sets = torch.tensor([[[[2, 0, -1], [4, 1, 3]]]], dtype=torch.int32)
    one_off = torch.tensor([[[[0, 2, -1], [1, 3, 5]]]], dtype=torch.int32)
    assert M.block_agreement(same_sets, ref) == 1.0
    assert M.block_agreement(one_off, ref) == 0.5


def test_tensor_metrics_hand_computed():
    ref, out = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 5.0])
    m = M.tensor_metrics(out, ref)
    assert m["rel"] == pytest.approx(1 / 5) and m["max_abs"] == pytest.approx(1.0)
    assert m["cos"] == pytest.approx((9 + 20) / (5 * math.sqrt(34)))


def test_fp8_fake_quant_error_within_e4m3_step():
    """The emulation compare uses (m3_trt.quant.fp8) rounds within half an E4M3 mantissa step."""
    from m3_trt.quant.fp8 import qdq_act, qdq_weight

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q = qdq_weight(w)
    torch.testing.assert_close(q.abs().amax(-1), w.abs().amax(-1), rtol=1e-6, atol=0)  # amax maps to 448
    big = w.abs() > w.abs().amax(-1, keepdim=True) / 64      # normal range of E4M3 after scaling
    assert float(((q - w).abs() / w.abs())[big].max()) <= 2 ** -4 + 1e-6  # half a 3-bit mantissa step
    x = torch.tensor([1.0, 0.5, -0.25, 448.0])
    assert torch.equal(qdq_act(x, 1.0), x)                    # exactly representable values survive


# -- the command on the tiny checkpoint ------------------------------------------------------------

def _compare(tmp_path, ckpt, name, **kw) -> tuple[int, dict, str]:
    from m3_trt.compare.cli import CompareOptions, cmd_compare

    out = tmp_path / name
    rc = cmd_compare(CompareOptions(ckpt=ckpt, out=out, **kw))
    return rc, json.loads((out / "report.json").read_text()), (out / "report.txt").read_text()


@pytest.fixture(scope="module")
def transformers_run(tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    rc, rep, table = _compare(tmp, tiny_ckpt, "hf", backend="transformers", layers=True, tokens=6)
    return rc, rep, table, tmp / "hf"


def test_transformers_backend_passes_fp32_tolerances(transformers_run):
    rc, rep, table, _ = transformers_run
    assert rc == 0, table
    assert rep["verdict"] == "pass" and rep["tolerance_key"] == ["transformers", "fp32"]
    assert rep["end_to_end"]["top1"] == 1.0
    assert all(g["first_divergence"] is None and g["ref_len"] > 0 for g in rep["greedy"])
    assert "tolerances applied: (transformers, fp32)" in table


def test_report_json_lists_every_layer_and_png_has_expected_size(transformers_run, tiny_ckpt):
    from PIL import Image

    from m3_trt.compare.report import PLOT_SIZE_PX
    from m3_trt.model.config import M3Config

    _, rep, _, out = transformers_run
    cfg = M3Config.from_pretrained(tiny_ckpt)
    names = [c["name"] for c in rep["components"]]
    sparse = [i for i, t in enumerate(cfg.text.layer_types) if t == "minimax_m3_sparse"]
    assert names == (["vision_encoder", "projector", "embedding"]
                     + [n for i in range(cfg.text.num_hidden_layers)
                        for n in ([f"indexer.{i}"] if i in sparse else []) + [f"layer.{i}"]]
                     + ["final_norm", "logits"])
    assert set(rep["versions"]) >= {"torch", "transformers", "python"}
    with Image.open(out / "per_layer_error.png") as im:
        assert im.size == PLOT_SIZE_PX


def _edited_copy(src, dst, edit):
    """Copy a checkpoint and apply ``edit(tensors_by_key)`` across all its shards."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    shards = sorted(dst.glob("*.safetensors"))
    tensors = {}
    for f in shards:
        tensors.update({k: (f, v) for k, v in load_file(f).items()})
    flat = {k: v for k, (_, v) in tensors.items()}
    edit(flat)
    for f in shards:
        save_file({k: flat[k].contiguous() for k, (g, _) in tensors.items() if g == f}, f, metadata={"format": "pt"})
    return dst


def _flip_layer2_weight(t):
    w = t["language_model.model.layers.2.mlp.down_proj.weight"]
    i = int(w.abs().argmax())
    w.view(-1)[i] = -w.view(-1)[i]  # one weight of layer 2's MLP changes sign


def _swap_layer1_experts(t):
    for w in ("w1", "w2", "w3"):
        a, b = (f"language_model.model.layers.1.block_sparse_moe.experts.{e}.{w}.weight" for e in (0, 1))
        t[a], t[b] = t[b].clone(), t[a].clone()


@pytest.mark.parametrize("backend,edit,first", [
    ("transformers", _flip_layer2_weight, "layer.2"),
    ("torch", _swap_layer1_experts, "layer.1"),
], ids=["transformers-flip-one-weight-layer2", "torch-swap-experts0-1-layer1"])
def test_corrupted_component_is_caught_and_named(tiny_ckpt, tmp_path, backend, edit, first):
    bad = _edited_copy(tiny_ckpt, tmp_path / "bad", edit)
    prompts = tmp_path / "one.jsonl"  # one 40-token text prompt keeps the run short
    prompts.write_text(json.dumps({"prompt": "Name three animals that live in the sea and say why."}) + "\n")
    rc, rep, table = _compare(tmp_path, tiny_ckpt, "report", backend=backend, backend_path=bad, layers=True,
                              tokens=0, prompts=prompts)  # the report beside the bad copy: never inside it
    assert rc == 1 and rep["verdict"] == "fail"
    assert rep["first_failure"]["what"] == first
    assert f"first failing: {first}" in table
    # everything before the corrupted layer still passes: the difference starts there
    names = [c["name"] for c in rep["components"]]
    assert all(c["ok"] for c in rep["components"][:names.index(first)])


def test_fp8_emulation_reports_per_layer_error_growth_and_top1(tiny_ckpt):
    from m3_trt.compare.runner import run_compare

    rep = run_compare(tiny_ckpt, backend="torch", fp8=True, layers=True, tokens=2, progress=lambda m: None)
    assert rep["tolerance_key"] == ["torch", "fp8-emulated"]
    layers = [c for c in rep["components"] if c["name"].startswith("layer.")]
    assert len(layers) == 4
    for c in layers:
        for v in c["per_prompt"].values():
            assert 0 < v["rel"] < math.inf
    assert 0.0 <= rep["end_to_end"]["top1"] <= 1.0 and rep["end_to_end"]["positions"] > 0
    # the emulation really quantizes: the first layer is already off by more than fp32 noise
    assert layers[0]["worst"] > 1e-3


def test_missing_runtime_backend_says_what_it_needs(tmp_path):
    from m3_trt.compare.backends import AdapterBackend, BackendUnavailable, make_backend

    class Missing(AdapterBackend):
        name, module, needs = "demo", "m3_trt._no_such_runtime", "a runner that is not written"

    with pytest.raises(BackendUnavailable, match=r"backend 'demo' needs m3_trt\._no_such_runtime"):
        Missing(tmp_path)
    with pytest.raises(ValueError, match="needs --url"):
        make_backend("triton", ckpt=tmp_path)


def test_intercept_restores_dispatch_after_error():
    import m3_trt.model.modeling as model_mod
    from m3_trt.compare.intercept import record_block_choices

    before = model_mod._op
    with pytest.raises(RuntimeError):
        with record_block_choices():
            assert model_mod._op is not before
            raise RuntimeError("boom")
    assert model_mod._op is before


def test_prompts_file_resolves_images_against_images_dir(tmp_path):
    from m3_trt.compare.inputs import load_prompts
    from m3_trt.processing.samples import demo_image_png

    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(demo_image_png())
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hi"}\n\n{"prompt": "look", "images": ["a.png"]}\n')
    recs = load_prompts(f, tmp_path / "pics")
    assert [r["prompt"] for r in recs] == ["hi", "look"] and recs[1]["images"][0][0] == "a.png"
    f.write_text('{"prompt": "look", "images": ["missing.png"]}\n')
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_prompts(f, tmp_path / "pics")
