"""Route (a): tiny torch modules → ONNX (dynamic axes, external data) → TensorRT engine on CPU.

What is checked: the build succeeds with explicit min/opt/max profiles, the engine file is
written, the network has a sane number of layers, and its IO (names, dynamic dims, dtypes)
is exactly the ONNX graph's. Engines cannot be run here (no GPU: see
test_engine_does_not_deserialize_without_gpu), so there is no numeric parity in this file.
"""

from __future__ import annotations

import pytest

from trt_test_helpers import export_case, onnx_io

pytestmark = pytest.mark.trt

CASES = [
    ("rmsnorm", "fp32"),
    ("mlp", "fp32"),
    ("attention", "fp32"),
    ("kv_write", "fp32"),
    ("topk", "fp32"),
    ("conv3d", "fp32"),
    ("mlp", "fp16"),
    ("attention", "bf16"),
    ("rmsnorm", "bf16"),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(name, dtype):
        if (name, dtype) not in cache:
            cache[(name, dtype)] = export_case(name, dtype, out)
        return cache[(name, dtype)]

    return get


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{d}-dynB-dynS" for n, d in CASES])
def test_onnx_builds_engine_with_dynamic_profiles(trt, exported, tmp_path, name, dtype):
    from m3_trt.export.tensorrt import build_engine_from_onnx

    onnx_path, profiles = exported(name, dtype)
    engine = tmp_path / f"{name}.engine"
    report = build_engine_from_onnx(onnx_path, engine, profiles=profiles, dtype=dtype, timeout_s=120)

    assert report.ok, report.error
    assert report.stage == "done"
    assert engine.is_file() and engine.stat().st_size == report.engine_bytes > 0
    assert not list(tmp_path.glob("*.tmp")), "temp file left behind"
    assert 1 <= report.num_layers <= 200, report.layer_types
    # the network's IO is the ONNX graph's: names, ranks, static dims, -1 where symbolic, dtypes
    want_in, want_out = onnx_io(onnx_path)
    assert [(t.name, t.shape, t.dtype) for t in report.inputs] == want_in
    assert [(t.name, t.shape, t.dtype) for t in report.outputs] == want_out
    assert any(-1 in t.shape for t in report.inputs), "export lost its dynamic axes"


def test_external_weights_are_read_from_the_onnx_path(trt, exported, tmp_path):
    """The MLP's weights live in mlp-fp32.onnx.data; parsing without the path must fail."""
    from m3_trt.export.tensorrt import build_engine_from_onnx, import_trt

    onnx_path, profiles = exported("mlp", "fp32")
    data = onnx_path.parent / (onnx_path.name + ".data")
    assert data.is_file() and data.stat().st_size > 0
    assert build_engine_from_onnx(onnx_path, tmp_path / "a.engine", profiles=profiles).ok

    # negative control: same bytes, no path → the parser cannot find the external weights
    trtm = import_trt()
    logger = trtm.Logger(trtm.Logger.INTERNAL_ERROR)
    net = trtm.Builder(logger).create_network(0)
    parser = trtm.OnnxParser(net, logger)
    assert not parser.parse(onnx_path.read_bytes())


def test_unregistered_custom_op_reports_plugin_not_found(trt, tmp_path):
    """Negative control: a custom-domain node nobody registered fails at parse, named in our error."""
    import onnx
    from onnx import TensorProto, helper

    from m3_trt.export.tensorrt import build_engine_from_onnx

    node = helper.make_node("m3_never_registered", ["x"], ["y"], name="the_custom_node", domain="m3",
                            plugin_version="1", plugin_namespace="m3")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])])
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("m3", 1)]), path)

    report = build_engine_from_onnx(path, tmp_path / "x.engine", profiles={"x": ((1, 8), (2, 8), (4, 8))})
    assert not report.ok and report.stage == "parse"
    assert "Plugin not found, are the plugin name, version, and namespace correct?" in report.error
    assert report.failing_node == "the_custom_node (m3_never_registered)"
    assert not (tmp_path / "x.engine").exists()


def test_bad_profiles_and_dtype_raise_before_building(trt, exported, tmp_path):
    from m3_trt.export.tensorrt import build_engine_from_onnx

    onnx_path, profiles = exported("kv_write", "fp32")
    with pytest.raises(ValueError, match=r"misses dynamic inputs \['new', 'pos'\]"):
        build_engine_from_onnx(onnx_path, tmp_path / "e", profiles={"cache": profiles["cache"]})
    with pytest.raises(ValueError, match="names inputs the graph lacks"):
        build_engine_from_onnx(onnx_path, tmp_path / "e", profiles={**profiles, "nope": profiles["pos"]})
    with pytest.raises(ValueError, match="does not fit the graph"):
        build_engine_from_onnx(onnx_path, tmp_path / "e", profiles={**profiles, "cache": ((1, 16, 64),) * 3})
    with pytest.raises(ValueError, match="strongly typed"):
        build_engine_from_onnx(onnx_path, tmp_path / "e", profiles=profiles, dtype="fp16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_engine_from_onnx(onnx_path, tmp_path / "e", profiles=profiles, dtype="int8")
    assert not list(tmp_path.iterdir())


def test_subprocess_build_matches_in_process_build(trt, exported, tmp_path):
    from m3_trt.export.tensorrt import build_engine_from_onnx, build_in_subprocess

    onnx_path, profiles = exported("attention", "fp32")
    here = build_engine_from_onnx(onnx_path, tmp_path / "here.engine", profiles=profiles)
    child = build_in_subprocess(onnx_path, tmp_path / "child.engine", profiles=profiles, timeout_s=120)
    assert here.ok and child.ok, child.error
    assert child.inputs == here.inputs and child.outputs == here.outputs
    assert child.num_layers == here.num_layers
    assert (tmp_path / "child.engine").stat().st_size == child.engine_bytes > 0


def test_engine_does_not_deserialize_without_gpu(trt, exported, tmp_path):
    """Pins the CPU limit: TensorRT-RTX builds plans but cannot load them without a CUDA driver."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: deserialization is expected to work here")
    from m3_trt.export.tensorrt import build_engine_from_onnx, try_deserialize

    onnx_path, profiles = exported("rmsnorm", "fp32")
    assert build_engine_from_onnx(onnx_path, tmp_path / "r.engine", profiles=profiles).ok
    ok, err = try_deserialize(tmp_path / "r.engine")
    assert not ok
    assert "CUDA driver version is insufficient for CUDA runtime version" in err
