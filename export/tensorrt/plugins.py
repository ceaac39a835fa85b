"""TensorRT IPluginV3 creators for the m3 operators, derived from their contracts
(``plugins/<op>/contract.py``, listed in ``plugins/registry.py``).

Legend: B batch, H indexer heads, Hq query heads, G KV heads, S queries, T key slots,
D head dim, K selected blocks, Tok tokens, Dm hidden, E experts, F expert intermediate.

TensorRT's ONNX parser looks a plugin up by the node's ``op_type`` plus its ``plugin_version``
and ``plugin_namespace`` attributes (the ONNX domain is ignored); every other node attribute
is handed to ``create_plugin`` as a ``PluginField``. All of it — name, version, namespace, IO
dtypes, field names and defaults, and the output-shape rule evaluated with ``IExprBuilder``
(``min`` / ``ceil_div`` of dims) — comes from the contract; nothing is written here per op.

What works where (probe log: docs/tensorrt_rtx.md):

* TensorRT-RTX 1.7.1 on a CPU machine: the creators register, the parser finds them by
  name/version/namespace and builds the ``PLUGIN_V3`` layer, and the engine build runs our
  ``get_output_shapes`` / ``supports_format_combination`` / ``configure_plugin`` callbacks and
  serializes the plugin fields — *provided* the process can ``dlopen("libtensorrt_rtx.so")``.
  The wheel ships only ``libtensorrt_rtx.so.1``; without the unversioned name the parser
  aborts the process right after ``create_plugin`` ("terminate called without an active
  exception"). ``subprocess_build`` puts a symlink on the child's ``LD_LIBRARY_PATH``.
  ``INetworkDefinition`` in TensorRT-RTX has no ``add_plugin_v3``: the ONNX parser is the
  only way to put a plugin into a network.
* ``enqueue`` wraps TensorRT's device pointers as torch tensors and calls the operator's public
  function (``impl`` = the spec's ``impl``) on TensorRT's stream. It never runs here (no engine
  can be deserialized without a GPU); it is unverified until a GPU session runs it.

Nothing here imports TensorRT at module import time; ``make_creator`` takes the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from m3_trt.plugins._contract import OpContract, ShapeOps
from m3_trt.plugins.registry import OPERATORS

# impl that enqueue runs per operator on the GPU; the MoE's Triton kernel has no expert range of
# its own (the dispatcher adapts it), so the plugin runs the torch path there
GPU_IMPL = {"indexer_topk": "triton", "block_sparse_attention": "triton", "swiglu_moe": "torch"}


@dataclass(frozen=True)
class PluginSpec:
    """One operator as TensorRT sees it: a view of its contract plus the GPU ``impl``.

    ``inputs`` / ``outputs`` are ``(name, dtype)`` with dtype one of 'float' (same as input 0),
    'int32', 'int64'; ``attrs`` maps attribute name → ('int' | 'float', default or None).
    Float inputs must all share input 0's dtype (fp32, fp16 or bf16).
    """

    contract: OpContract
    impl: str = "torch"

    @property
    def name(self) -> str:
        return self.contract.onnx_op_type

    @property
    def version(self) -> str:
        return self.contract.plugin_version

    @property
    def namespace(self) -> str:
        return self.contract.plugin_namespace

    @property
    def inputs(self) -> tuple[tuple[str, str], ...]:
        return tuple((t.name, t.dtype) for t in self.contract.inputs)

    @property
    def outputs(self) -> tuple[tuple[str, str], ...]:
        return tuple((t.name, t.dtype) for t in self.contract.outputs)

    @property
    def attrs(self) -> dict[str, tuple[str, Any]]:
        return {a.name: (a.kind, a.default) for a in self.contract.attrs}

    def output_shape(self, dims: list, attrs: dict, ops: ShapeOps) -> list:
        return self.contract.output_shapes(dims, attrs, ops)


SPECS: dict[str, PluginSpec] = {name: PluginSpec(op.contract, GPU_IMPL.get(name, "torch"))
                                for name, op in OPERATORS.items()}


def trt_shape_ops(trt, expr_builder) -> ShapeOps:
    """The contract's shape algebra over TensorRT ``IDimensionExpr`` s."""
    op = trt.DimensionOperation
    return ShapeOps(const=expr_builder.constant,
                    min=lambda a, b: expr_builder.operation(op.MIN, a, b),
                    ceil_div=lambda a, b: expr_builder.operation(op.CEIL_DIV, a, b))


def _read_fields(spec: PluginSpec, fc) -> dict[str, Any]:
    """Attributes from a PluginFieldCollection: missing ones take the contract default, a missing
    required one raises ``ValueError`` naming it."""
    given = {}
    for f in fc or ():
        if f.name in spec.attrs:
            given[f.name] = np.asarray(f.data).reshape(-1)[0].item()
    return spec.contract.resolve_attrs(given, where=f"TensorRT plugin {spec.name}")


_TORCH_DTYPES = {"FLOAT": ("<f4", None), "HALF": ("<f2", None), "BF16": ("<i2", "bfloat16"),
                 "INT32": ("<i4", None), "INT64": ("<i8", None)}


class _CudaArray:
    """A raw device pointer as a ``__cuda_array_interface__`` object (torch wraps it without a copy)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str):
        self.__cuda_array_interface__ = {"data": (int(ptr), False), "shape": shape, "typestr": typestr, "version": 3}


def _as_torch(ptr: int, desc):
    import torch

    typestr, view = _TORCH_DTYPES[desc.type.name]
    t = torch.as_tensor(_CudaArray(ptr, tuple(int(d) for d in desc.dims), typestr), device="cuda")
    return t.view(getattr(torch, view)) if view else t


def _enqueue_kernel(spec: "PluginSpec", attrs: dict, input_desc, output_desc, inputs, outputs, stream) -> None:
    """Run the operator on TensorRT's ``stream`` and copy the result into TensorRT's output.

    NOT exercised on these CPU machines (TensorRT-RTX cannot deserialize an engine without a
    GPU, so no engine ever runs here); it is the GPU path for a lent device.
    """
    import torch

    fn = OPERATORS[spec.contract.name].fn
    args = [_as_torch(p, d) for p, d in zip(inputs, input_desc)]
    outs = [_as_torch(p, d) for p, d in zip(outputs, output_desc)]
    with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
        result = fn(*args, **attrs, impl=spec.impl)
        if result.shape != outs[0].shape:  # both follow the contract's rule: a mismatch is a bug
            raise RuntimeError(f"{spec.name}: result shape {tuple(result.shape)} != TensorRT output "
                               f"{tuple(outs[0].shape)}")
        outs[0].copy_(result)


def make_plugin_class(trt):
    """The IPluginV3 class for module ``trt`` (one class serves every spec)."""

    class M3Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, spec: PluginSpec, attrs: dict):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.spec = spec
            self.attrs = dict(attrs)
            self.plugin_name = spec.name
            self.plugin_version = spec.version
            self.plugin_namespace = spec.namespace
            self.num_outputs = len(spec.outputs)
            self.timing_cache_id = ""

        # -- core / build ------------------------------------------------------------
        def get_capability_interface(self, _type):
            return self

        def clone(self):
            return M3Plugin(self.spec, self.attrs)

        def get_output_data_types(self, input_types):
            dt = {"int32": trt.int32, "int64": trt.int64}
            return [dt.get(kind, input_types[0]) for _n, kind in self.spec.outputs]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            dims = [[d for d in x] for x in inputs]
            shapes = self.spec.output_shape(dims, self.attrs, trt_shape_ops(trt, expr_builder))
            out = []
            for s in shapes:
                e = trt.DimsExprs(len(s))
                for i, d in enumerate(s):
                    e[i] = d
                out.append(e)
            return out

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            # an absent optional input (the MoE's shared expert) shifts the outputs' positions
            io = self.spec.inputs[:num_inputs] + self.spec.outputs
            kind = io[pos][1]
            if kind == "int32":
                return desc.type == trt.int32
            if kind == "int64":
                return desc.type == trt.int64
            if pos == 0:
                return desc.type in (trt.float32, trt.float16, trt.bfloat16)
            return desc.type == in_out[0].desc.type

        def configure_plugin(self, inp, out):
            pass

        def get_workspace_size(self, inp, out):
            return 0

        def get_valid_tactics(self):
            return []

        # -- runtime -----------------------------------------------------------------
        def on_shape_change(self, inp, out):
            pass

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection(_fields(trt, self.spec, self.attrs))

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            _enqueue_kernel(self.spec, self.attrs, input_desc, output_desc, inputs, outputs, stream)
            return 0

    return M3Plugin


def _fields(trt, spec: PluginSpec, attrs: dict):
    """One field per attribute; a required attribute without a value (the creator's advertised
    ``field_names``) gets an empty array: there is no default to show."""
    out = []
    for k, (kind, _d) in spec.attrs.items():
        value = [] if attrs.get(k) is None else [attrs[k]]
        if kind == "int":
            out.append(trt.PluginField(k, np.array(value, np.int32), trt.PluginFieldType.INT32))
        else:
            out.append(trt.PluginField(k, np.array(value, np.float32), trt.PluginFieldType.FLOAT32))
    return out


def make_creator(trt, spec: PluginSpec):
    """An ``IPluginCreatorV3One`` for ``spec`` (register it with ``register_creators``)."""
    plugin_cls = make_plugin_class(trt)

    class M3PluginCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = spec.name
            self.plugin_namespace = spec.namespace
            self.plugin_version = spec.version
            defaults = {k: d for k, (_kind, d) in spec.attrs.items()}
            self.field_names = trt.PluginFieldCollection(_fields(trt, spec, defaults))

        def create_plugin(self, name, fc, phase):
            return plugin_cls(spec, _read_fields(spec, fc))

    return M3PluginCreator()


def m3_creators(trt, names=None) -> list:
    """Creators for the named specs (every registered operator by default)."""
    return [make_creator(trt, SPECS[n]) for n in (names or SPECS)]


def register_creators(trt, creators) -> list:
    """Register creators in the global plugin registry; returns those newly registered.

    The creators must stay referenced while TensorRT may call them (the registry holds a
    raw pointer); callers keep the returned list alive.
    """
    registry = trt.get_plugin_registry()
    done = []
    for c in creators:
        existing = registry.get_creator(c.name, c.plugin_version, c.plugin_namespace)
        if existing is None and registry.register_creator(c, c.plugin_namespace):
            done.append(c)
    return done
