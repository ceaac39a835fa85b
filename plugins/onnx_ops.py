"""The ONNX side of the m3 operators, derived from each operator's contract: schemas (with shape
inference), exporter translations and ONNX Runtime kernels.

One node per operator in the custom domain ``m3`` (opset 1), ``op_type`` = the contract's
``onnx_op_type`` (``M3IndexerTopK``, ``M3BlockSparseAttention``, ``M3SwigluMoE``), inputs in the
contract's order, attributes = the contract's attributes (with their defaults), plus TensorRT's
``plugin_version`` / ``plugin_namespace`` (the parser looks plugins up by ``op_type`` + those two
and ignores the domain). ``OPS`` and every function below iterate over
``plugins/registry.py``; nothing here names a particular operator.

The schemas are registered with ``onnx.defs`` so ``onnx.checker`` and ``onnx.shape_inference``
pass; their inference applies the contract's output rule to ONNX dims (``int`` or a
``dim_param`` string such as ``min(16,ceil(T/128))``). The ONNX Runtime kernels
(``onnxruntime-extensions`` Python ops, fp32) call the operators' public functions with
``impl="torch"``. Nothing is registered at import: call :func:`register_schemas` /
:func:`register_ort` / :func:`translation_table`.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import torch

from ._contract import OpContract, ShapeOps, python_signature
from .registry import OPERATORS

DOMAIN, VERSION = "m3", 1
PLUGIN_ATTRS = {"plugin_version": "1", "plugin_namespace": "m3"}
OPS = {name: op.contract.onnx_op_type for name, op in OPERATORS.items()}
_ONNX_TYPES = {"float": ("T", None), "int32": ("tensor(int32)", 6), "int64": ("tensor(int64)", 7)}


def _check_plugin_attrs(c: OpContract) -> None:
    mine = {"plugin_version": c.plugin_version, "plugin_namespace": c.plugin_namespace}
    if mine != PLUGIN_ATTRS or c.namespace != DOMAIN:
        raise ValueError(f"{c.name}: contract plugin attrs {mine} / domain {c.namespace!r} differ from "
                         f"this module's {PLUGIN_ATTRS} / {DOMAIN!r}")


# -- shape inference -------------------------------------------------------------------------------

def _sym(op: str, a, b):
    if isinstance(a, int) and isinstance(b, int):
        return {"min": min, "ceil": lambda x, y: -(-x // y)}[op](a, b)
    if a is None or b is None:
        return None
    return f"min({a},{b})" if op == "min" else f"ceil({a}/{b})"


# ONNX dims: an int (dim_value), a str (dim_param) or None (unknown)
ONNX_OPS = ShapeOps(const=int, min=lambda a, b: _sym("min", a, b), ceil_div=lambda a, b: _sym("ceil", a, b))


def _onnx_dims(type_proto):
    if type_proto is None or not type_proto.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in type_proto.tensor_type.shape.dim]


def _attr_value(ctx, a):
    proto = ctx.get_attribute(a.name)
    if proto is None:
        return a.default
    return proto.i if a.kind == "int" else proto.f


def _make_inference(c: OpContract):
    def infer(ctx) -> None:
        dims = [_onnx_dims(ctx.get_input_type(i)) if i < ctx.get_num_inputs() and ctx.has_input(i) else None
                for i in range(len(c.inputs))]
        attrs = {a.name: _attr_value(ctx, a) for a in c.attrs}
        known = all(d is not None for d, t in zip(dims, c.inputs) if not t.optional)
        shapes = c.output_shapes(dims, attrs, ONNX_OPS) if known and None not in attrs.values() else None
        for k, spec in enumerate(c.outputs):
            out = ctx.get_output_type(k)
            elem = _ONNX_TYPES[spec.dtype][1]
            out.tensor_type.elem_type = elem if elem else ctx.get_input_type(0).tensor_type.elem_type
            if shapes is not None:
                out.tensor_type.ClearField("shape")
                shape = out.tensor_type.shape
                shape.SetInParent()
                for d in shapes[k]:
                    dim = shape.dim.add()
                    if isinstance(d, int):
                        dim.dim_value = d
                    elif isinstance(d, str):
                        dim.dim_param = d
            ctx.set_output_type(k, out)

    return infer


# -- schemas -------------------------------------------------------------------------------------

def onnx_schema(c: OpContract):
    """The ``onnx.defs.OpSchema`` of one contract (inputs, outputs, attributes with defaults,
    TensorRT's plugin attributes, shape inference by the contract's rule)."""
    from onnx import helper
    from onnx.defs import OpSchema

    _check_plugin_attrs(c)
    A = OpSchema.AttrType
    P = OpSchema.FormalParameter
    opt = OpSchema.FormalParameterOption.Optional
    T = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations and weights")]
    plugin_attrs = [OpSchema.Attribute("plugin_version", A.STRING, "TensorRT plugin version"),
                    OpSchema.Attribute("plugin_namespace", A.STRING, "TensorRT plugin namespace")]
    kinds = {"int": A.INT, "float": A.FLOAT}
    inputs = [P(t.name, _ONNX_TYPES[t.dtype][0], param_option=opt) if t.optional else
              P(t.name, _ONNX_TYPES[t.dtype][0]) for t in c.inputs]
    outputs = [P(t.name, _ONNX_TYPES[t.dtype][0]) for t in c.outputs]
    attrs = [OpSchema.Attribute(a.name, kinds[a.kind], a.doc) if a.default is None else
             OpSchema.Attribute(a.name, helper.make_attribute(a.name, a.default), a.doc) for a in c.attrs]
    schema = OpSchema(c.onnx_op_type, DOMAIN, VERSION, doc=c.doc, inputs=inputs, outputs=outputs,
                      type_constraints=T, attributes=attrs + plugin_attrs)
    schema.set_type_and_shape_inference_function(_make_inference(c))
    return schema


def register_schema(c: OpContract) -> None:
    """Register one contract's schema with ``onnx.defs`` (a second call is a no-op)."""
    import onnx

    try:
        onnx.defs.register_schema(onnx_schema(c))
    except Exception as e:  # already registered in this process by another caller
        if "already" not in str(e).lower():
            raise


@functools.cache
def register_schemas() -> None:
    """Register every operator's schema with ``onnx.defs`` (idempotent)."""
    for op in OPERATORS.values():
        register_schema(op.contract)


# -- exporter translations -------------------------------------------------------------------------

def make_translation(c: OpContract, opset):
    """A function with the torch op's signature (the exporter reads it: annotated ``int`` /
    ``float`` parameters become attributes) emitting one m3 node."""
    register_schema(c)  # onnxscript finds the node's schema by name
    sig = python_signature(c)
    node = getattr(opset, c.onnx_op_type)

    def translate(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        tensors = [values[t.name] for t in c.inputs]
        attrs = {a.name: values[a.name] for a in c.attrs}
        return node(*tensors, **attrs, **PLUGIN_ATTRS)

    translate.__signature__ = sig
    translate.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()
                                 if p.annotation is not inspect.Parameter.empty and p.name not in
                                 {t.name for t in c.inputs}}
    translate.__name__ = translate.__qualname__ = c.name
    return translate


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: one m3 node per op."""
    from onnxscript.values import Opset

    register_schemas()
    m3 = Opset(DOMAIN, VERSION)
    return {getattr(torch.ops.m3, name).default: make_translation(op.contract, m3)
            for name, op in OPERATORS.items()}


# -- ONNX Runtime kernels ----------------------------------------------------------------------------

def define_ort_op(op) -> None:
    """Declare ``op``'s Python custom op to onnxruntime-extensions (fp32, every attribute
    required on the node: the extension has no optional attributes or inputs)."""
    from onnxruntime_extensions import PyCustomOpDef as D
    from onnxruntime_extensions import onnx_op

    dt = {"float": D.dt_float, "int32": D.dt_int32, "int64": D.dt_int64}
    c = op.contract
    attrs = {a.name: D.dt_int64 if a.kind == "int" else D.dt_float for a in c.attrs}
    attrs.update({k: D.dt_string for k in PLUGIN_ATTRS})
    onnx_op(op_type=f"{DOMAIN}::{c.onnx_op_type}", inputs=[dt[t.dtype] for t in c.inputs],
            outputs=[dt[t.dtype] for t in c.outputs], attrs=attrs)(ort_kernel(op))


@functools.cache
def _define_ort_ops() -> None:
    for op in OPERATORS.values():
        define_ort_op(op)


def ort_kernel(op):
    """The ONNX Runtime kernel body of ``op``: arrays in, array out; the node's attributes are
    completed with the contract's defaults (a missing required one raises ``ValueError``)."""
    c = op.contract

    def kernel(*arrays, **node_attrs):
        for k in PLUGIN_ATTRS:
            node_attrs.pop(k, None)
        attrs = c.resolve_attrs(node_attrs, where=f"ONNX Runtime node {c.onnx_op_type}")
        # onnxruntime-extensions Python ops take no absent inputs: every input is fed (an MoE rank
        # without the shared expert passes zero-width shared weights, w13s [0, D], w2s [D, 0])
        tensors = [torch.from_numpy(np.asarray(a)) for a in arrays]
        out = op.fn(*tensors, **attrs, impl="torch")
        return np.ascontiguousarray(out.numpy())

    kernel.__name__ = c.name
    return kernel


def register_ort(session_options) -> None:
    """Make an ``onnxruntime.SessionOptions`` able to run m3 nodes (fp32)."""
    from onnxruntime_extensions import get_library_path

    _define_ort_ops()
    session_options.register_custom_ops_library(get_library_path())
