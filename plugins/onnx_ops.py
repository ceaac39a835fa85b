"""The ONNX side of the m3 plugins: schemas, exporter translations, ONNX Runtime kernels.

Three nodes in the custom domain ``m3`` (opset 1), named so they never collide with a built-in
op (TensorRT's parser looks plugins up by ``op_type`` + ``plugin_version`` + ``plugin_namespace``
and ignores the domain):

==========================  ===============================================  ===================
op_type                     inputs                                           attributes
==========================  ===============================================  ===================
``M3IndexerTopK``           q_BHSD, k_BTD, q_pos_BS (int64)                  block_size, topk, local_blocks
``M3BlockSparseAttention``  q_BHSD, k_BGTD, v_BGTD, block_idx_BGSK, q_pos_BS  block_size, scale
``M3SwigluMoE``             x_TD, router_w_ED, e_bias_E, w13_EFD, w2_EDF,     top_k, routed_scaling, alpha, limit
                            w13s_FD, w2s_DF
==========================  ===============================================  ===================

Each node also carries ``plugin_version = "1"`` and ``plugin_namespace = "m3"``. The schemas
(with type/shape inference) are registered with ``onnx.defs`` so ``onnx.checker`` and
``onnx.shape_inference`` pass; the ONNX Runtime kernels (``onnxruntime-extensions`` Python ops,
fp32) call the torch implementations. Nothing is registered at import: call
:func:`register_schemas` / :func:`register_ort` / :func:`translation_table`.
"""

from __future__ import annotations

import functools

DOMAIN, VERSION = "m3", 1
PLUGIN_ATTRS = {"plugin_version": "1", "plugin_namespace": "m3"}
OPS = {
    "indexer_topk": "M3IndexerTopK",
    "block_sparse_attention": "M3BlockSparseAttention",
    "swiglu_moe": "M3SwigluMoE",
}


# -- schemas -------------------------------------------------------------------------------------

def _infer_indexer(ctx) -> None:
    import onnx

    q = ctx.get_input_type(0).tensor_type
    k = ctx.get_input_type(1).tensor_type
    out = ctx.get_output_type(0)
    out.tensor_type.elem_type = onnx.TensorProto.INT32
    if q.HasField("shape") and k.HasField("shape"):
        dims = list(q.shape.dim)[:3]
        t_dim = k.shape.dim[1]
        for d in dims:
            out.tensor_type.shape.dim.add().CopyFrom(d)
        kdim = out.tensor_type.shape.dim.add()
        attrs = {a.name: a for a in ctx.get_attributes()} if hasattr(ctx, "get_attributes") else {}
        topk = ctx.get_attribute("topk").i if not attrs else attrs["topk"].i
        bs = ctx.get_attribute("block_size").i if not attrs else attrs["block_size"].i
        if t_dim.HasField("dim_value"):
            kdim.dim_value = min(topk, -(-t_dim.dim_value // bs))
        else:
            kdim.dim_param = "topk_width"
    ctx.set_output_type(0, out)


def _infer_same_as_input0(ctx) -> None:
    ctx.set_output_type(0, ctx.get_input_type(0))


@functools.cache
def register_schemas() -> None:
    """Register the three schemas with ``onnx.defs`` (idempotent)."""
    import onnx
    from onnx.defs import OpSchema

    A = OpSchema.AttrType
    P = OpSchema.FormalParameter
    opt = OpSchema.FormalParameterOption.Optional
    T = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations and weights")]
    plugin_attrs = [OpSchema.Attribute("plugin_version", A.STRING, "TensorRT plugin version"),
                    OpSchema.Attribute("plugin_namespace", A.STRING, "TensorRT plugin namespace")]
    specs = [
        ("M3IndexerTopK", "Lightning-indexer top-k key-block selection (see plugins/indexer_topk).",
         [P("q", "T"), P("k", "T"), P("q_pos", "tensor(int64)")], [P("block_idx", "tensor(int32)")],
         [OpSchema.Attribute(n, A.INT, n) for n in ("block_size", "topk", "local_blocks")], _infer_indexer),
        ("M3BlockSparseAttention", "GQA attention over the selected key blocks (see plugins/block_sparse_attention).",
         [P("q", "T"), P("k", "T"), P("v", "T"), P("block_idx", "tensor(int32)"), P("q_pos", "tensor(int64)")],
         [P("out", "T")], [OpSchema.Attribute("block_size", A.INT, "block_size"),
                           OpSchema.Attribute("scale", A.FLOAT, "softmax scale")], _infer_same_as_input0),
        ("M3SwigluMoE", "Sigmoid-routed SwiGLU-OAI MoE with a shared expert (see plugins/swiglu_moe).",
         [P("x", "T"), P("router_w", "T"), P("e_bias", "T"), P("w13", "T"), P("w2", "T"),
          P("w13s", "T", param_option=opt), P("w2s", "T", param_option=opt)], [P("y", "T")],
         [OpSchema.Attribute("top_k", A.INT, "experts per token"),
          OpSchema.Attribute("routed_scaling", A.FLOAT, "routed scaling factor"),
          OpSchema.Attribute("alpha", A.FLOAT, "SwiGLU-OAI sigmoid gain"),
          OpSchema.Attribute("limit", A.FLOAT, "SwiGLU-OAI clamp")], _infer_same_as_input0),
    ]
    for name, doc, inputs, outputs, attrs, infer in specs:
        schema = OpSchema(name, DOMAIN, VERSION, doc=doc, inputs=inputs, outputs=outputs, type_constraints=T,
                          attributes=attrs + plugin_attrs)
        schema.set_type_and_shape_inference_function(infer)
        try:
            onnx.defs.register_schema(schema)
        except Exception as e:  # already registered in this process by another caller
            if "already" not in str(e).lower():
                raise


# -- exporter translations -------------------------------------------------------------------------

def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: one m3 node per op."""
    import importlib

    import torch
    from onnxscript.values import Opset

    register_schemas()
    for name in OPS:
        importlib.import_module(f"m3_trt.plugins.{name}.op")
    m3 = Opset(DOMAIN, VERSION)

    def indexer_topk(q, k, q_pos, block_size: int, topk: int, local_blocks: int, impl: str = "torch"):
        return m3.M3IndexerTopK(q, k, q_pos, block_size=block_size, topk=topk, local_blocks=local_blocks,
                                **PLUGIN_ATTRS)

    def block_sparse_attention(q, k, v, block_idx, q_pos, block_size: int, scale: float, impl: str = "torch"):
        return m3.M3BlockSparseAttention(q, k, v, block_idx, q_pos, block_size=block_size, scale=scale,
                                         **PLUGIN_ATTRS)

    def swiglu_moe(x, router_w, e_bias, w13, w2, w13s, w2s, top_k: int, routed_scaling: float, alpha: float,
                   limit: float, impl: str = "torch"):
        return m3.M3SwigluMoE(x, router_w, e_bias, w13, w2, w13s, w2s, top_k=top_k, routed_scaling=routed_scaling,
                              alpha=alpha, limit=limit, **PLUGIN_ATTRS)

    return {
        torch.ops.m3.indexer_topk.default: indexer_topk,
        torch.ops.m3.block_sparse_attention.default: block_sparse_attention,
        torch.ops.m3.swiglu_moe.default: swiglu_moe,
    }


# -- ONNX Runtime kernels ----------------------------------------------------------------------------

@functools.cache
def _define_ort_ops() -> None:
    """Python custom ops for onnxruntime-extensions (fp32), calling the torch implementations."""
    import numpy as np
    import torch
    from onnxruntime_extensions import PyCustomOpDef as D
    from onnxruntime_extensions import onnx_op

    from m3_trt.plugins.block_sparse_attention import block_sparse_attention
    from m3_trt.plugins.indexer_topk import indexer_topk
    from m3_trt.plugins.swiglu_moe import swiglu_moe

    t = torch.from_numpy

    @onnx_op(op_type=f"{DOMAIN}::M3IndexerTopK", inputs=[D.dt_float, D.dt_float, D.dt_int64], outputs=[D.dt_int32],
             attrs={"block_size": D.dt_int64, "topk": D.dt_int64, "local_blocks": D.dt_int64,
                    "plugin_version": D.dt_string, "plugin_namespace": D.dt_string})
    def _indexer(q, k, pos, **attrs):
        return indexer_topk(t(q), t(k), t(pos), block_size=int(attrs["block_size"]), topk=int(attrs["topk"]),
                            local_blocks=int(attrs["local_blocks"]), impl="torch").numpy()

    @onnx_op(op_type=f"{DOMAIN}::M3BlockSparseAttention",
             inputs=[D.dt_float, D.dt_float, D.dt_float, D.dt_int32, D.dt_int64], outputs=[D.dt_float],
             attrs={"block_size": D.dt_int64, "scale": D.dt_float, "plugin_version": D.dt_string,
                    "plugin_namespace": D.dt_string})
    def _attention(q, k, v, idx, pos, **attrs):
        return block_sparse_attention(t(q), t(k), t(v), t(idx), t(pos), block_size=int(attrs["block_size"]),
                                      scale=float(attrs["scale"]), impl="torch").numpy()

    @onnx_op(op_type=f"{DOMAIN}::M3SwigluMoE", inputs=[D.dt_float] * 7, outputs=[D.dt_float],
             attrs={"top_k": D.dt_int64, "routed_scaling": D.dt_float, "alpha": D.dt_float, "limit": D.dt_float,
                    "plugin_version": D.dt_string, "plugin_namespace": D.dt_string})
    def _moe(x, rw, eb, w13, w2, w13s, w2s, **attrs):
        y = swiglu_moe(t(x), t(rw), t(eb), t(w13), t(w2), t(w13s), t(w2s), top_k=int(attrs["top_k"]),
                       routed_scaling=float(attrs["routed_scaling"]), alpha=float(attrs["alpha"]),
                       limit=float(attrs["limit"]), impl="torch")
        return np.ascontiguousarray(y.numpy())


def register_ort(session_options) -> None:
    """Make an ``onnxruntime.SessionOptions`` able to run m3 nodes (fp32)."""
    from onnxruntime_extensions import get_library_path

    _define_ort_ops()
    session_options.register_custom_ops_library(get_library_path())
