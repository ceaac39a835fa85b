"""One contract per operator: the torch op (fake and eager), the ONNX schema's shape inference,
the ONNX Runtime kernel and the TensorRT plugin agree with it — output shapes (including the
indexer's narrow case ``ceil(T / block_size) < topk``) and attribute defaults — for every
operator in ``plugins/registry.py``, on the cases each contract lists in ``examples``.

Seeds are fixed (``SEED``) and printed in failure messages.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tolerances import TOLERANCES, rel_err

from m3_trt.plugins import onnx_ops
from m3_trt.plugins.registry import OPERATORS

SEED = 0
TOL = TOLERANCES[("onnx_component", "fp32")]


def _cases():
    g = torch.Generator().manual_seed(SEED)
    return [(name, cid, inputs, op.contract.resolve_attrs(attrs, cid))
            for name, op in OPERATORS.items() for cid, (inputs, attrs) in op.contract.examples(g).items()]


CASES = _cases()
IDS = [f"{name}-{cid}" for name, cid, _, _ in CASES]


def _expected(name, inputs, attrs):
    return [tuple(s) for s in OPERATORS[name].contract.shapes([list(t.shape) for t in inputs], attrs)]


def test_every_operator_has_examples_and_the_indexer_a_narrow_case():
    assert {name for name, *_ in CASES} == set(OPERATORS), "every registered operator needs contract examples"
    narrow = [a for name, _, inputs, a in CASES if name == "indexer_topk"
              and -(-inputs[1].shape[1] // a["block_size"]) < a["topk"]]
    assert narrow, "the indexer examples must include n_blocks < topk"
    # so a runtime that made the output topk wide (TensorRT before the contract) fails the tests below
    for name, _, inputs, a in CASES:
        if name == "indexer_topk" and a in narrow:
            assert _expected(name, inputs, a)[0][-1] < a["topk"]


@pytest.mark.parametrize("name,cid,inputs,attrs", CASES, ids=IDS)
def test_torch_eager_and_fake_follow_the_contract(name, cid, inputs, attrs):
    expected = _expected(name, inputs, attrs)
    op = getattr(torch.ops.m3, name).default
    eager = op(*inputs, **attrs, impl="torch")
    assert [tuple(eager.shape)] == expected, f"seed={SEED} {cid}: eager {tuple(eager.shape)} != contract {expected}"
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(t) for t in inputs], **attrs, impl="torch")
    assert [tuple(fake.shape)] == expected, f"{cid}: fake {tuple(fake.shape)} != contract {expected}"
    assert fake.dtype == eager.dtype


class _AllCases(torch.nn.Module):
    """Every example case in one graph: inputs flattened, one output per case."""

    def forward(self, *flat):
        outs, i = [], 0
        for name, _cid, inputs, attrs in CASES:
            n = len(inputs)
            outs.append(OPERATORS[name].fn(*flat[i:i + n], **attrs, impl="torch"))
            i += n
        return tuple(outs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The cases exported through the contract-derived translation table, outputs unshaped
    (so ONNX shape inference and TensorRT must compute the shapes themselves)."""
    import onnx

    path = tmp_path_factory.mktemp("contracts") / "all.onnx"
    flat = [t for _, _, inputs, _ in CASES for t in inputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_AllCases(), tuple(flat), str(path), dynamo=True, opset_version=20,
                          custom_translation_table=onnx_ops.translation_table(), verbose=False)
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    onnx.save(model, str(path))
    return path, flat


def test_onnx_nodes_and_shape_inference_follow_the_contract(exported):
    import onnx

    path, _ = exported
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops == [OPERATORS[name].contract.onnx_op_type for name, *_ in CASES], ops
    for node, (name, cid, _, attrs) in zip(model.graph.node, CASES):
        got = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert {k: got[k] for k in attrs} == pytest.approx(attrs), f"{cid}: node attributes {got}"
    onnx_ops.register_schemas()
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for out, (name, cid, inputs, attrs) in zip(inferred.graph.output, CASES):
        dims = tuple(d.dim_value for d in out.type.tensor_type.shape.dim)
        assert [dims] == _expected(name, inputs, attrs), f"{cid}: ONNX inferred {dims}"


def test_onnx_runtime_kernels_follow_the_contract(exported):
    import onnxruntime as ort

    path, flat = exported
    so = ort.SessionOptions()
    onnx_ops.register_ort(so)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), flat)}
    outs = sess.run(None, feeds)
    for out, (name, cid, inputs, attrs) in zip(outs, CASES):
        assert [out.shape] == _expected(name, inputs, attrs), f"seed={SEED} {cid}: ONNX Runtime {out.shape}"
        ref = OPERATORS[name].fn(*inputs, **attrs, impl="reference")
        if ref.dtype.is_floating_point:
            err = rel_err(torch.from_numpy(out), ref)
            assert err <= TOL, f"seed={SEED} {cid}: ONNX Runtime vs reference rel err {err:.3e} > {TOL:.0e}"
        else:  # block ids: exact
            np.testing.assert_array_equal(out, ref.numpy(), err_msg=f"seed={SEED} {cid}")


@pytest.mark.trt
def test_tensorrt_plugins_follow_the_contract(exported, tmp_path):
    """One engine build (child process, TensorRT-RTX on CPU) of the whole graph, static shapes:
    each output's dims come from the plugins' ``get_output_shapes``."""
    from m3_trt.export.tensorrt import build_in_subprocess, trt_available, trt_unavailable_reason

    if not trt_available():
        pytest.skip(trt_unavailable_reason())
    import onnx

    path, flat = exported
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    profiles = {n: (tuple(t.shape),) * 3 for n, t in zip(names, flat)}
    report = build_in_subprocess(path, tmp_path / "all.engine", profiles=profiles, plugins=["m3"], timeout_s=240)
    assert report.ok, report.error
    assert report.layer_types.get("PLUGIN_V3") == len(CASES), report.layer_types
    got = [tuple(o.shape) for o in report.outputs]
    assert got == [s for name, _, inputs, attrs in CASES for s in _expected(name, inputs, attrs)], got


# -- attribute defaults --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(OPERATORS))
def test_torch_and_onnx_defaults_equal_the_contract(name):
    import onnx
    from onnx import helper

    c = OPERATORS[name].contract
    schema = {a.name: a for a in getattr(torch.ops.m3, name).default._schema.arguments}
    torch_defaults = {a.name: schema[a.name].default_value if schema[a.name].has_default_value() else None
                      for a in c.attrs}
    assert torch_defaults == c.defaults, f"torch op {name}"
    onnx_ops.register_schemas()
    attrs = onnx.defs.get_schema(c.onnx_op_type, 1, onnx_ops.DOMAIN).attributes
    onnx_defaults = {a.name: None if attrs[a.name].required else
                     helper.get_attribute_value(attrs[a.name].default_value) for a in c.attrs}
    assert onnx_defaults == pytest.approx(c.defaults), f"ONNX schema {c.onnx_op_type}"


@pytest.mark.parametrize("name", list(OPERATORS))
def test_onnx_runtime_kernel_fills_contract_defaults(name):
    """The kernel body completes a node's attributes from the contract (onnxruntime-extensions
    itself refuses a node missing a declared attribute, so the exporter writes all of them)."""
    op = OPERATORS[name]
    c = op.contract
    seen = {}

    def record(*tensors, impl, **attrs):
        seen.update(attrs, impl=impl)
        return tensors[0]

    kernel = onnx_ops.ort_kernel(dataclasses.replace(op, fn=record))
    inputs = [np.zeros(1, np.float32) for _ in c.inputs]
    required = {a.name: 3 if a.kind == "int" else 0.25 for a in c.attrs if a.default is None}
    kernel(*inputs, **required, plugin_version="1", plugin_namespace="m3")
    assert seen == {**c.defaults, **required, "impl": "torch"}
    for a in c.attrs:  # negative control: a required attribute left out is refused, naming it
        if a.default is None:
            with pytest.raises(ValueError, match=a.name):
                kernel(*inputs)


@pytest.mark.trt
@pytest.mark.parametrize("name", list(OPERATORS))
def test_tensorrt_creator_defaults_equal_the_contract(trt_module, name):
    from m3_trt.export.tensorrt.plugins import SPECS, make_creator

    trt = trt_module
    c = OPERATORS[name].contract
    creator = make_creator(trt, SPECS[name])
    assert (creator.name, creator.plugin_version, creator.plugin_namespace) == \
        (c.onnx_op_type, c.plugin_version, c.plugin_namespace)
    advertised = {f.name: (np.asarray(f.data).reshape(-1)[0].item() if np.asarray(f.data).size else None)
                  for f in creator.field_names}
    assert advertised == pytest.approx(c.defaults), f"TensorRT creator {c.onnx_op_type} field_names"
    required = {a.name: 0.5 for a in c.attrs if a.default is None}
    fields = [trt.PluginField(k, np.array([v], np.float32), trt.PluginFieldType.FLOAT32) for k, v in required.items()]
    plugin = creator.create_plugin("x", trt.PluginFieldCollection(fields), trt.TensorRTPhase.BUILD)
    assert plugin.attrs == pytest.approx(c.resolve_attrs(required, "test"))
    if required:  # negative control: a required field left out is refused, naming it
        with pytest.raises(ValueError, match=next(iter(required))):
            creator.create_plugin("x", trt.PluginFieldCollection([]), trt.TensorRTPhase.BUILD)


@pytest.fixture(scope="session")
def trt_module():
    from m3_trt.export.tensorrt import import_trt, trt_available, trt_unavailable_reason

    if not trt_available():
        pytest.skip(trt_unavailable_reason())
    return import_trt()


# -- a new operator is one folder ------------------------------------------------------------------

def test_a_new_operator_is_its_contract_and_implementation(tmp_path):
    """A toy operator declared as a new folder would declare it (contract + implementation +
    ``define_op``): the torch op and its fake, the ONNX translation, schema and ONNX Runtime
    kernel and the TensorRT creator all come from the generic code, nothing written per op."""
    import onnx
    import onnxruntime as ort
    from onnxscript.values import Opset

    from m3_trt.plugins._contract import AttrSpec, OpContract, Operator, TensorSpec, define_op

    contract = OpContract(
        name="toy_gain", onnx_op_type="M3ToyGain", doc="y = gain * x * w (test-only operator)",
        inputs=(TensorSpec("x_TD", "float", "T D"), TensorSpec("w_D", "float", "D")),
        outputs=(TensorSpec("y_TD", "float", "T D"),),
        attrs=(AttrSpec("gain", "float", 2.0),),
        output_shapes=lambda dims, attrs, ops: [list(dims[0])])

    def toy_gain_torch(x_TD, w_D, *, gain):
        return gain * x_TD * w_D

    toy_op = define_op(contract, {"torch": toy_gain_torch})

    def toy_gain(x_TD, w_D, *, gain=contract.defaults["gain"], impl="torch"):
        return toy_op(x_TD, w_D, gain=gain, impl=impl)

    toy = Operator(contract, toy_gain, {"torch": toy_gain_torch}, portable=toy_gain_torch)

    class M(torch.nn.Module):
        def forward(self, x, w):
            return toy_gain(x, w, gain=3.0)

    g = torch.Generator().manual_seed(SEED)
    x, w = torch.randn(5, 4, generator=g), torch.randn(4, generator=g)
    path = tmp_path / "toy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(M(), (x, w), str(path), dynamo=True, opset_version=20, verbose=False,
                          custom_translation_table={torch.ops.m3.toy_gain.default:
                                                    onnx_ops.make_translation(contract, Opset("m3", 1))})
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node] == ["M3ToyGain"]
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx_ops.define_ort_op(toy)
    so = ort.SessionOptions()
    onnx_ops.register_ort(so)
    (y,) = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {
        i.name: t.numpy() for i, t in zip(model.graph.input, (x, w))})
    assert rel_err(torch.from_numpy(y), 3.0 * x * w) <= TOL
    assert rel_err(torch.from_numpy(y), 2.0 * x * w) > 100 * TOL  # negative control: the attribute is read

    from m3_trt.export.tensorrt import import_trt, trt_available
    from m3_trt.export.tensorrt.plugins import PluginSpec, make_creator

    if trt_available():
        creator = make_creator(import_trt(), PluginSpec(contract))
        assert (creator.name, [f.name for f in creator.field_names]) == ("M3ToyGain", ["gain"])
