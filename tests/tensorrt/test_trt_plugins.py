"""The m3 plugin ops through TensorRT's ONNX parser (route a with --plugins m3), on CPU.

Found on TensorRT-RTX 1.7.1.116 (docs/tensorrt_rtx.md): the parser finds our Python
IPluginV3 creators by op_type + plugin_version + plugin_namespace, and with the
``libtensorrt_rtx.so`` soname shim the build runs our shape/format callbacks and serializes an
engine. Without the shim the process aborts inside the parser. Both outcomes are pinned here
(builds run in child processes: an abort must not take pytest down). Never parse a plugin
node in the pytest process itself.
"""

from __future__ import annotations

import numpy as np
import pytest

from trt_test_helpers import plugin_cases, plugin_onnx

pytestmark = pytest.mark.trt

OPS = ["indexer_topk", "block_sparse_attention", "swiglu_moe"]


@pytest.mark.parametrize("op", OPS, ids=[f"m3::{o}-fp32-dyn" for o in OPS])
def test_plugin_node_parses_and_builds_with_soname_shim(trt, tmp_path, op):
    from m3_trt.export.tensorrt import build_in_subprocess

    path = tmp_path / f"{op}.onnx"
    plugin_onnx(op, path)
    _inputs, _inits, _attrs, profiles, (out_shape, out_dtype) = plugin_cases()[op]
    report = build_in_subprocess(path, tmp_path / f"{op}.engine", profiles=profiles, plugins=[f"m3:{op}"], timeout_s=120)

    assert report.ok, report.error
    assert report.layer_types.get("PLUGIN_V3") == 1, report.layer_types
    assert (tmp_path / f"{op}.engine").stat().st_size == report.engine_bytes > 0
    # the output shape/dtype come from our get_output_shapes / get_output_data_types callbacks
    # (the ONNX graph gives the output a type but no shape), e.g. indexer K = min(topk, ceil(T / block_size)),
    # the contract's rule (plugins/indexer_topk/contract.py): dynamic here because T is
    assert [(t.shape, t.dtype) for t in report.outputs] == [(out_shape, out_dtype)]


def test_plugin_node_without_registered_creator_fails_cleanly(trt, tmp_path):
    """Negative control: same graph, no creators registered → 'Plugin not found' from the parser."""
    from m3_trt.export.tensorrt import build_in_subprocess

    plugin_onnx("indexer_topk", tmp_path / "i.onnx")
    profiles = plugin_cases()["indexer_topk"][3]
    report = build_in_subprocess(tmp_path / "i.onnx", tmp_path / "i.engine", profiles=profiles, plugins=[], timeout_s=120)
    assert not report.ok and report.stage == "parse"
    assert "Plugin not found, are the plugin name, version, and namespace correct?" in report.error
    assert report.failing_node == "indexer_topk_0 (M3IndexerTopK)"


def test_plugin_node_aborts_without_soname_shim(trt, tmp_path):
    """Pins the TensorRT-RTX 1.7.1 limit: importing a plugin node dlopens 'libtensorrt_rtx.so',
    which the wheel does not ship, and the failure aborts the process."""
    from m3_trt.export.tensorrt import build_in_subprocess
    from m3_trt.export.tensorrt.subprocess_build import rtx_soname_shim_dir

    if rtx_soname_shim_dir() is None:
        pytest.skip("this TensorRT has libtensorrt_rtx.so (or is not TensorRT-RTX): nothing to pin")
    plugin_onnx("indexer_topk", tmp_path / "i.onnx")
    profiles = plugin_cases()["indexer_topk"][3]
    report = build_in_subprocess(tmp_path / "i.onnx", tmp_path / "i.engine", profiles=profiles,
                                 plugins=["m3:indexer_topk"], soname_shim=False, timeout_s=120)
    assert not report.ok and report.stage == "crashed"
    assert "SIGABRT" in report.error
    assert "terminate called without an active exception" in report.error
    assert not (tmp_path / "i.engine").exists()


def test_creator_turns_onnx_attributes_into_plugin_state(trt):
    """In-process and unregistered: create_plugin reads the fields the parser would pass."""
    from m3_trt.export.tensorrt.plugins import SPECS, make_creator

    creator = make_creator(trt, SPECS["indexer_topk"])
    assert (creator.name, creator.plugin_version, creator.plugin_namespace) == ("M3IndexerTopK", "1", "m3")
    fc = trt.PluginFieldCollection([
        trt.PluginField("topk", np.array([8], np.int32), trt.PluginFieldType.INT32),
        trt.PluginField("block_size", np.array([64], np.int32), trt.PluginFieldType.INT32),
    ])
    plugin = creator.create_plugin("x", fc, trt.TensorRTPhase.BUILD)
    assert plugin.attrs == {"block_size": 64, "topk": 8, "local_blocks": 1}  # local_blocks: contract default
    assert plugin.get_output_data_types([trt.float32, trt.float32, trt.int64]) == [trt.int32]
    clone = plugin.clone()
    assert clone.attrs == plugin.attrs and clone is not plugin


@pytest.mark.parametrize("dtype", ["fp32", "bf16"], ids=lambda d: f"matmul-bsa-relu-{d}")
def test_plugin_between_standard_layers_builds(trt, tmp_path, dtype):
    """A plugin inside a graph (MatMul → reshape → m3::block_sparse_attention → Relu), in the graph's dtype."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    from m3_trt.export.tensorrt import build_in_subprocess

    t = {"fp32": TP.FLOAT, "bf16": TP.BFLOAT16}[dtype]
    w = (np.random.default_rng(0).standard_normal((64, 256)) * 0.05).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["W32"], ["W"], to=t),
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Reshape", ["h", "shape"], ["h4"]),
        helper.make_node("Transpose", ["h4"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("M3BlockSparseAttention", ["q", "k", "v", "idx", "pos"], ["o"], domain="m3",
                         plugin_version="1", plugin_namespace="m3", block_size=16, scale=32**-0.5),
        helper.make_node("Relu", ["o"], ["y"]),
    ]
    vi = helper.make_tensor_value_info
    ins = [vi("x", t, ["B", "S", 64]), vi("k", t, ["B", 2, "T", 32]), vi("v", t, ["B", 2, "T", 32]),
           vi("idx", TP.INT32, ["B", 2, "S", 4]), vi("pos", TP.INT64, ["B", "S"])]
    inits = [numpy_helper.from_array(w, "W32"), numpy_helper.from_array(np.array([0, 0, 8, 32], np.int64), "shape")]
    graph = helper.make_graph(nodes, "g", ins, [vi("y", t, None)], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("m3", 1)]),
              str(tmp_path / "g.onnx"))
    kv = ((1, 2, 1, 32), (1, 2, 64, 32), (2, 2, 128, 32))
    profiles = {"x": ((1, 1, 64), (1, 8, 64), (2, 16, 64)), "k": kv, "v": kv,
                "idx": ((1, 2, 1, 4), (1, 2, 8, 4), (2, 2, 16, 4)), "pos": ((1, 1), (1, 8), (2, 16))}
    report = build_in_subprocess(tmp_path / "g.onnx", tmp_path / "g.engine", profiles=profiles, dtype=dtype,
                                 plugins=["m3"], timeout_s=120)
    assert report.ok, report.error
    assert report.layer_types.get("PLUGIN_V3") == 1 and report.layer_types.get("MATRIX_MULTIPLY") == 1
    assert [(o.shape, o.dtype) for o in report.outputs] == [((-1, 8, -1, 32), {"fp32": "FLOAT", "bf16": "BF16"}[dtype])]
