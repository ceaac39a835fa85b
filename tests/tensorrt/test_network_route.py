"""Route (b): the M3 text components written with TensorRT's network API (native LLM layers).

What runs: ``build_network_engines`` builds the tiny checkpoint's embedding, all four decoder
layers (full-dense, sparse-moe, sparse-dense, full-moe) and head in fp16, in one worker process,
and every network's IO is compared with the fp16 ``--plugins none`` ONNX manifest (with route (b)'s
one documented change: the indexer cache's unit head axis). Engines cannot run here, so the
arithmetic is checked by running the same network-writing code on the torch shadow network
(``network_shadow``) against the torch component (``export/onnx/components.py``), prefill and
decode, block choices exactly. Negative controls: a wrong head count fails the build with a
named cause; the raw (unadjusted) and a tampered manifest entry are reported as IO mismatches;
non-contiguous positions (outside route (b)'s cache contract) are caught by the parity check; a
worker that dies is replaced for the next build.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tolerances import assert_close, rel_err, TOLERANCES

pytestmark = pytest.mark.trt

T, BATCH = 128, 4
# the ONNX IO of a decoder graph depends only on its attention kind (components.py)
ONNX_ENTRY = {"embedding": "embedding", "layer_0": "decoder_full_dense", "layer_1": "decoder_sparse_moe",
              "layer_2": "decoder_sparse_moe", "layer_3": "decoder_full_dense", "head": "head"}


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    from m3_trt.model.modeling import M3ForConditionalGeneration

    return M3ForConditionalGeneration.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def built(trt, model, tiny_ckpt, tmp_path_factory):
    """(route (b) reports, fp16 --plugins none manifest of the components named in ONNX_ENTRY)."""
    import json

    from m3_trt.export.onnx import export_model
    from m3_trt.export.tensorrt.network_build import build_network_engines

    tmp = tmp_path_factory.mktemp("route_b")
    exp = export_model(tiny_ckpt, tmp / "onnx", dtype="fp16", plugins="none", max_seq_len=T, max_batch=BATCH,
                       components=sorted(set(ONNX_ENTRY.values())), progress=None)
    manifest = json.loads((exp / "manifest.json").read_text())
    reports = build_network_engines(model, tmp / "engines", dtype="fp16", max_batch=BATCH, max_seq_len=T,
                                    progress=None)
    return reports, {c["name"]: c for c in manifest["components"]}


@pytest.mark.parametrize("name", list(ONNX_ENTRY))
def test_route_b_builds_fp16_with_onnx_io(built, name):
    from m3_trt.export.tensorrt.network_model import io_differences

    reports, entries = built
    rep = reports[name]
    assert rep["ok"], f"{name}: {rep['stage']}: {rep['error']}"
    assert rep["engine_bytes"] > 0 and rep["num_layers"] > 0
    assert io_differences(rep, entries[ONNX_ENTRY[name]]) == []
    if name.startswith("layer_"):
        types = rep["layer_types"]
        assert types.get("ATTENTION_OUTPUT") == 1 and types.get("KV_CACHE_UPDATE") == (3 if name in ("layer_1", "layer_2") else 2)
        assert "MOE" not in types and types.get("ROTARY_EMBEDDING") == (4 if name in ("layer_1", "layer_2") else 2)


def test_io_check_catches_mismatch(built):
    """Negative control: without the documented change, or with a renamed input, the check reports it."""
    from m3_trt.export.tensorrt.network_model import io_differences

    reports, entries = built
    raw = io_differences(reports["layer_1"], entries["decoder_sparse_moe"], documented=False)
    assert raw and "idx_cache" in raw[0]
    tampered = copy.deepcopy(entries["decoder_full_dense"])
    tampered["inputs"][1]["name"] = "positions"
    assert io_differences(reports["layer_0"], tampered) and not io_differences(reports["layer_0"], entries["decoder_full_dense"])


def test_wrong_head_count_fails_clearly_and_a_dead_worker_is_replaced(trt, model, tmp_path):
    from m3_trt.export.tensorrt.network_build import ModelHandoff, NetworkBuilder

    kw = dict(dtype="fp16", max_batch=2, max_seq_len=T)
    with ModelHandoff(model) as h, NetworkBuilder(h.source, timeout_s=120) as nb:
        rep = nb.build("layer_0", tmp_path / "bad.plan", num_heads=3, **kw)
        assert not rep["ok"] and rep["stage"] == "write-network"
        assert "3 heads x head_dim 16 = 48" in rep["error"]
        assert not (tmp_path / "bad.plan").exists()
        nb.proc.kill()  # a worker lost between requests (TensorRT aborts the process on some paths)
        nb.proc.wait()
        rep = nb.build("embedding", tmp_path / "embedding.plan", **kw)
        assert rep["ok"] and (tmp_path / "embedding.plan").stat().st_size == rep["engine_bytes"]
        assert nb.started == 2


# -- shadow parity: the same network-writing calls, interpreted in torch -------------------------

def _feeds(cfg, sparse, dtype, start, S, gen, B=2):
    from m3_trt.export.tensorrt.network_check import layer_feeds

    return layer_feeds(cfg, sparse, dtype, B, T, start, S, gen)


def _compare(model, layer, dtype_name, feeds, ic):
    from m3_trt.export.onnx import components as C
    from m3_trt.export.tensorrt.network_model import shadow_run

    comp = C.DecoderLayerComponent(model, layer)
    with torch.no_grad():
        ref = comp(feeds["hidden"], feeds["position_ids"], feeds["k_cache"].clone(), feeds["v_cache"].clone(),
                   ic.clone() if comp.sparse else None)
        out = shadow_run(model, f"layer_{layer}", feeds, dtype=dtype_name, max_seq_len=T)
    return comp.sparse, ref, out


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layer", [0, 1, 2, 3], ids=["full-dense", "sparse-moe", "sparse-dense", "full-moe"])
def test_shadow_matches_torch_component(trt, model, layer, dtype_name):
    """The check build-engine runs (network_check.check_component): prefill of 40, a decode step
    at 40, a chunk of 5 ending the 128-slot cache (the indexer chooses 3 of 8 blocks there)."""
    from m3_trt.export.tensorrt.network_check import check_component
    from m3_trt.model.modeling import DTYPES

    m = copy.deepcopy(model).to(DTYPES[dtype_name])
    res = check_component(m, f"layer_{layer}", dtype=dtype_name, max_seq_len=T, max_batch=BATCH)
    tol = TOLERANCES[("trt_network_shadow", dtype_name)]
    assert set(res["cases"]) == {"prefill", "decode", "chunk"} and res["tolerance"] == tol
    sparse = layer in (1, 2)
    for case, rows in res["cases"].items():
        assert set(rows) == {"hidden_out", "k_cache_out", "v_cache_out"} | ({"idx_cache_out", "block_idx"} if sparse else set())
        for key, row in rows.items():
            if key == "block_idx":
                assert row["equal"], f"{case}: indexer block choice differs"
            else:
                assert row["rel_err"] <= tol, f"{case}/{key}: relative error {row['rel_err']:.3e} > {tol:.1e}"
    assert res["ok"]


def test_shadow_check_catches_perturbed_weights(trt, model):
    """Negative controls of the build's check: the reference with one attention output row changed
    (hidden_out differs) or with the indexer's query projection negated (the block choice differs;
    the indexer cache, written from the key projection, does not)."""
    from m3_trt.export.tensorrt.network_check import check_component, failures

    attn = copy.deepcopy(model)
    with torch.no_grad():
        attn.model.language_model.layers[1].self_attn.o_proj.weight[0] += 0.05
    res = check_component(model, "layer_1", dtype="fp32", max_seq_len=T, max_batch=BATCH, reference=attn)
    assert not res["ok"] and any("hidden_out" in f for f in failures(res))
    assert res["cases"]["prefill"]["hidden_out"]["rel_err"] > 100 * TOLERANCES[("trt_network_shadow", "fp32")]
    idx = copy.deepcopy(model)
    with torch.no_grad():
        idx.model.language_model.layers[1].self_attn.indexer.q_proj.weight.neg_()
    res = check_component(model, "layer_1", dtype="fp32", max_seq_len=T, max_batch=BATCH, reference=idx)
    assert not res["ok"] and "chunk/block_idx: differs" in failures(res)
    assert res["cases"]["chunk"]["idx_cache_out"]["rel_err"] <= TOLERANCES[("trt_network_shadow", "fp32")]


def test_shadow_embedding_and_head(trt, model):
    from m3_trt.export.onnx import components as C
    from m3_trt.export.tensorrt.network_model import shadow_run

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.text.vocab_size, (2, 7), generator=g)
    h = torch.randn(2, 7, model.config.text.hidden_size, generator=g)
    with torch.no_grad():
        emb = shadow_run(model, "embedding", {"input_ids": ids}, dtype="fp32", max_seq_len=T)
        head = shadow_run(model, "head", {"hidden": h}, dtype="fp32", max_seq_len=T)
        logits, normed = C.Head(model)(h)
    assert_close(emb["inputs_embeds"], C.Embedding(model)(ids), "trt_network_shadow", "fp32", "embedding")
    assert_close(head["logits"], logits, "trt_network_shadow", "fp32", "logits")
    assert_close(head["final_norm"], normed, "trt_network_shadow", "fp32", "final norm")


def test_shadow_parity_catches_noncontiguous_positions(trt, model):
    """Negative control: positions with a gap break add_kv_cache_update's one-start-slot contract
    (documented); the parity check must see it in the cache and the output."""
    feeds, ic = _feeds(model.config.text, True, torch.float32, 0, 5, torch.Generator().manual_seed(0))
    feeds["position_ids"] = torch.tensor([[0, 1, 2, 6, 7]] * 2)
    _, ref, out = _compare(model, 1, "fp32", feeds, ic)
    tol = TOLERANCES[("trt_network_shadow", "fp32")]
    assert rel_err(out["k_cache_out"], ref[1]) > 100 * tol
    assert rel_err(out["hidden_out"], ref[0]) > 100 * tol
