"""Layer-by-layer ONNX export: every component in ONNX Runtime equals its torch component, and
the chained components generate the reference's greedy tokens."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from tolerances import TOLERANCES

from m3_trt.export.onnx import export_model
from m3_trt.export.onnx.runtime import OnnxModel

MODES = ["m3", "none"]


@pytest.fixture(scope="module", params=MODES, ids=[f"plugins-{m}" for m in MODES])
def exported(request, tiny_export):
    out = tiny_export(request.param)
    return request.param, out, json.loads((out / "manifest.json").read_text())


def test_every_component_matches_torch_prefill_and_decode(exported):
    mode, out, manifest = exported
    v = manifest["verify"]
    assert v["tolerance"] == TOLERANCES[("onnx_component", "fp32")]
    names = set(v["components"])
    for i in range(4):
        assert {f"layer_{i}/prefill", f"layer_{i}/decode"} <= names
    assert {"embedding", "head", "vision_encoder", "projector"} <= names
    bad = {k: r["rel_err"] for k, r in v["components"].items() if not r["ok"]}
    assert not bad, f"components over tolerance: {bad}"
    assert v["ok"]


def test_manifest_names_every_file_and_signature(exported):
    mode, out, manifest = exported
    files = {p.name for p in out.iterdir()}
    listed = {"manifest.json"}
    for c in manifest["components"]:
        listed.add(c["file"])
        listed |= set(c.get("layers", {}).values()) | ({c["data"]} if "data" in c else set())
        assert c["inputs"] and c["outputs"]
    assert files == listed
    layer = next(c for c in manifest["components"] if c["name"] == "decoder_sparse_moe")
    shapes = {i["name"]: i["shape"] for i in layer["inputs"]}
    assert shapes["hidden"] == ["batch", "seq", 64] and shapes["k_cache"] == ["batch", 2, 128, 16]
    assert manifest["opset"] >= 18 and manifest["plugins"] == mode


def test_plugin_nodes_and_checker(exported):
    from m3_trt.plugins.onnx_ops import register_schemas

    mode, out, manifest = exported
    register_schemas()
    expect = {
        "decoder_sparse_moe": ["m3::M3BlockSparseAttention", "m3::M3IndexerTopK", "m3::M3SwigluMoE"],
        "decoder_sparse_dense": ["m3::M3BlockSparseAttention", "m3::M3IndexerTopK"],
        "decoder_full_moe": ["m3::M3SwigluMoE"],
        "decoder_full_dense": [],
    }
    for c in manifest["components"]:
        if c["name"] in expect:
            assert c["custom_ops"] == (expect[c["name"]] if mode == "m3" else []), c["name"]
        onnx.checker.check_model(str(out / c["file"]), full_check=True)
    if mode == "m3":
        g = onnx.load(str(out / "decoder_sparse_moe.onnx"), load_external_data=False).graph
        node = next(n for n in g.node if n.op_type == "M3IndexerTopK")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"m3"
        assert (attrs["block_size"], attrs["topk"], attrs["local_blocks"]) == (16, 3, 1)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image+text"])
def test_chained_components_generate_reference_tokens(exported, tiny_ckpt, with_image):
    from m3_trt.processing.samples import demo_image_png
    from m3_trt.model.generate import greedy
    from m3_trt.model.modeling import M3ForConditionalGeneration
    from m3_trt.processing import M3Processor

    _, out, _ = exported
    proc = M3Processor.from_pretrained(tiny_ckpt)
    images = [proc.decode_image(demo_image_png())] if with_image else None
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": "What is shown here?"}]
    enc = proc(proc.apply_chat_template([{"role": "user", "content": content}]), images=images)
    model = M3ForConditionalGeneration.from_pretrained(tiny_ckpt)
    vision = dict(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]) if with_image else {}
    ref = greedy(model, enc["input_ids"], 32, **vision)
    onnx_model = OnnxModel(out)
    embeds = onnx_model.image_embeds(enc["pixel_values"].numpy(), enc["image_grid_thw"].numpy()) if with_image else None
    got = onnx_model.generate(enc["input_ids"].numpy(), 32, image_embeds=embeds)
    assert got == ref


def test_layers_of_one_variant_share_a_graph(tmp_path):
    """Four sparse-MoE layers: one graph, four weight files, each layer verified separately."""
    from hf_twins import make_pair

    _, model = make_pair(dict(layer_types=["minimax_m3_sparse"] * 4, mlp_layer_types=["sparse"] * 4))
    out = export_model(model, tmp_path / "shared", plugins="m3", max_seq_len=32, verify=True, progress=None,
                       components=["decoder_sparse_moe"])
    manifest = json.loads((out / "manifest.json").read_text())
    (comp,) = manifest["components"]
    assert comp["layers"] == {str(i): f"layer_{i}.data" for i in range(4)}
    assert len(list(out.glob("*.onnx"))) == 1
    assert manifest["verify"]["ok"] and len(manifest["verify"]["components"]) == 8


def test_negative_control_scrambled_weights_detected(exported, tiny_ckpt, tmp_path):
    """A weight file whose bytes are off would be caught by the component comparison."""
    import shutil

    import onnxruntime as ort

    from m3_trt.export.onnx.components import DecoderLayerComponent
    from m3_trt.export.onnx.runtime import layer_model, session_options
    from m3_trt.model.modeling import M3ForConditionalGeneration

    mode, out, manifest = exported
    work = shutil.copytree(out, tmp_path / "copy")
    raw = bytearray((work / "layer_0.data").read_bytes())
    raw[64:128] = bytes(reversed(raw[64:128]))  # scramble 16 floats of the first weight
    (work / "layer_0.data").write_bytes(bytes(raw))
    comp = next(c for c in manifest["components"] if c["name"] == "decoder_full_dense")
    model = M3ForConditionalGeneration.from_pretrained(tiny_ckpt, kernels="portable")
    torch_layer = DecoderLayerComponent(model, 0)
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 3, 64, generator=g), torch.arange(3)[None].expand(2, 3).contiguous(),
            torch.zeros(2, 2, 128, 16), torch.zeros(2, 2, 128, 16))
    with torch.no_grad():
        ref = torch_layer(*args)[0].numpy()
    errs = {}
    for name, folder in (("good", out), ("scrambled", work)):
        sess = ort.InferenceSession(layer_model(folder, comp["file"], "layer_0.data").SerializeToString(),
                                    session_options(mode == "m3"))
        got = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})[0]
        errs[name] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    tol = TOLERANCES[("onnx_component", "fp32")]
    assert errs["good"] <= tol and errs["scrambled"] > 100 * tol, errs
