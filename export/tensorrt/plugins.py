"""TensorRT IPluginV3 creators for the three M3 custom ops (``m3::indexer_topk``,
``m3::block_sparse_attention``, ``m3::swiglu_moe``).

Legend: B batch, H indexer heads, Hq query heads, G KV heads, S queries, T key slots,
D head dim, K selected blocks, Tok tokens, Dm hidden, E experts, F expert intermediate.

TensorRT's ONNX parser looks a plugin up by the node's ``op_type`` plus its ``plugin_version``
and ``plugin_namespace`` attributes (the ONNX domain is ignored); every other node attribute
is handed to ``create_plugin`` as a ``PluginField``. The specs below are that contract, as data.

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
* ``enqueue`` wraps TensorRT's device pointers as torch tensors and calls the op's GPU
  function on TensorRT's stream. It never runs here (no engine can be deserialized without
  a GPU); it is unverified until a GPU session runs it.

Nothing here imports TensorRT at module import time; ``make_creator`` takes the module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

NAMESPACE = "m3"
VERSION = "1"


@dataclass(frozen=True)
class PluginSpec:
    """One custom op: its TensorRT name/version/namespace, IO and attributes.

    ``inputs`` / ``outputs`` are ``(name, dtype)`` with dtype one of 'float' (same as input 0),
    'int32', 'int64'. ``attrs`` maps attribute name → ('int' | 'float', default).
    ``output_shape(in_dims, attrs, const)`` gives each output's dims from the inputs' dims,
    where a dim is whatever the caller's shape algebra uses (``IDimensionExpr`` in TensorRT,
    with ``const`` = ``IExprBuilder.constant`` to make one from an int).
    Float inputs must all share input 0's dtype (fp32, fp16 or bf16).
    """

    name: str
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]
    attrs: dict[str, tuple[str, Any]] = field(default_factory=dict)
    output_shape: Callable[[list, dict, Callable[[int], Any]], list] | None = None
    kernel: str = ""  # 'module:function' run by enqueue on a GPU
    version: str = VERSION
    namespace: str = NAMESPACE


def _indexer_shape(dims, attrs, const):
    q, _k, _pos = dims  # q_BHSD, k_BTD, q_pos_BS
    return [[q[0], q[1], q[2], const(int(attrs["topk"]))]]


def _same_as_first(dims, attrs, const):
    return [list(dims[0])]


# The TensorRT plugin name is the ONNX node's op_type (plugins/onnx_ops.py is the one source).
from m3_trt.plugins.onnx_ops import OPS as ONNX_OP_TYPES  # noqa: E402

SPECS: dict[str, PluginSpec] = {
    "indexer_topk": PluginSpec(
        name=ONNX_OP_TYPES["indexer_topk"],
        inputs=(("q_BHSD", "float"), ("k_BTD", "float"), ("q_pos_BS", "int64")),
        outputs=(("block_idx_BHSK", "int32"),),
        attrs={"block_size": ("int", 128), "topk": ("int", 16), "local_blocks": ("int", 1)},
        output_shape=_indexer_shape,
        kernel="m3_trt.plugins.indexer_topk.triton_kernel:indexer_topk_triton",
    ),
    "block_sparse_attention": PluginSpec(
        name=ONNX_OP_TYPES["block_sparse_attention"],
        inputs=(
            ("q_BHSD", "float"),
            ("k_BGTD", "float"),
            ("v_BGTD", "float"),
            ("block_idx_BGSK", "int32"),
            ("q_pos_BS", "int64"),
        ),
        outputs=(("out_BHSD", "float"),),
        attrs={"block_size": ("int", 128), "scale": ("float", 1.0)},
        output_shape=_same_as_first,
        kernel="m3_trt.plugins.block_sparse_attention.triton_kernel:block_sparse_attention_triton",
    ),
    "swiglu_moe": PluginSpec(
        name=ONNX_OP_TYPES["swiglu_moe"],
        inputs=(
            ("x_TD", "float"),
            ("router_w_ED", "float"),
            ("e_bias_E", "float"),
            ("w13_EFD", "float"),
            ("w2_EDF", "float"),
            ("w13s_FD", "float"),
            ("w2s_DF", "float"),
        ),
        outputs=(("y_TD", "float"),),
        attrs={
            "top_k": ("int", 4),
            "routed_scaling": ("float", 2.0),
            "alpha": ("float", 1.702),
            "limit": ("float", 7.0),
        },
        output_shape=_same_as_first,
        kernel="m3_trt.plugins.swiglu_moe.torch_impl:swiglu_moe_torch",
    ),
}


def _read_fields(spec: PluginSpec, fc) -> dict[str, Any]:
    """Attributes from a PluginFieldCollection (missing ones take the spec default)."""
    attrs = {k: default for k, (_kind, default) in spec.attrs.items()}
    for f in fc or ():
        if f.name in attrs:
            value = np.asarray(f.data).reshape(-1)
            kind = spec.attrs[f.name][0]
            attrs[f.name] = int(value[0]) if kind == "int" else float(value[0])
    return attrs


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
    """Run the op's GPU function on TensorRT's ``stream`` and copy the result into TensorRT's output.

    NOT exercised on these CPU machines (TensorRT-RTX cannot deserialize an engine without a
    GPU, so no engine ever runs here); it is the GPU path for a lent device.
    """
    import importlib

    import torch

    mod, _, fn = spec.kernel.partition(":")
    func = getattr(importlib.import_module(mod), fn)
    args = [_as_torch(p, d) for p, d in zip(inputs, input_desc)]
    outs = [_as_torch(p, d) for p, d in zip(outputs, output_desc)]
    with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
        result = func(*args, **attrs)
        if result.shape != outs[0].shape:
            # the indexer returns min(topk, n_blocks) columns; the plugin's output is topk wide, -1 padded
            outs[0].fill_(-1)
            outs[0][..., : result.shape[-1]].copy_(result)
        else:
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
            shapes = self.spec.output_shape(dims, self.attrs, expr_builder.constant)
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
            io = self.spec.inputs + self.spec.outputs
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
    out = []
    for k, (kind, _d) in spec.attrs.items():
        if kind == "int":
            out.append(trt.PluginField(k, np.array([attrs[k]], np.int32), trt.PluginFieldType.INT32))
        else:
            out.append(trt.PluginField(k, np.array([attrs[k]], np.float32), trt.PluginFieldType.FLOAT32))
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
    """Creators for the named specs (all three by default)."""
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
