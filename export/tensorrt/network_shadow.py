"""A torch interpreter of the ``INetworkDefinition`` calls route (b) makes: the "shadow" network.

Engines cannot run on the CPU machines (TensorRT-RTX cannot deserialize without a GPU), so the
network-writing code of route (b) is checked by running *the same calls* against this object
instead of a real network: ``shadow_writer(feeds)`` returns a ``LayerWriter`` whose ``net`` is a
``ShadowNetwork``; every ``add_*`` records a layer, and ``outputs()`` evaluates the marked outputs
in torch, each layer in the dtype the strongly typed network gives it. The IO names and the
layer list are those of the TensorRT network; only the arithmetic is torch's.

What this proves and what it does not: it checks the *graph logic* written with TensorRT's layers
(reshapes, masks, block selection, dense MoE combine, cache slots) against the torch reference.
For the native LLM layers it implements TensorRT's *documented* semantics, which cannot be run
here:

* ``add_attention_v2``: ``softmax(Q·Kᵀ [+ add-mask | bool keep-mask]) · V`` — **no** 1/sqrt(d)
  scale (TensorRT's fused-attention guide: the caller scales Q or K first); GQA by head groups.
* ``add_rotary_embedding``: rotate-half (non-interleaved) on the first ``rotary_embedding_dim``
  channels with cos/sin caches ``[B, S, rotary_dim/2]`` (ONNX ``RotaryEmbedding`` semantics).
* ``add_kv_cache_update`` (LINEAR): ``cache[b, :, idx[b] : idx[b] + S] = update[b]``.

Only the layer kinds and enum members route (b) uses are implemented; anything else raises
``NotImplementedError`` naming it, so a new layer is never interpreted silently wrong.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch


def _torch_dtype(trt, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
    if dtype not in table:
        raise NotImplementedError(f"shadow network: dtype {dtype} not implemented")
    return table[dtype]


def _trt_dtype(trt, tdtype):
    table = {torch.float32: trt.float32, torch.float16: trt.float16, torch.bfloat16: trt.bfloat16,
             torch.int32: trt.int32, torch.int64: trt.int64, torch.bool: trt.bool}
    return table[tdtype]


def _axes(mask: int, rank: int) -> list[int]:
    return [a for a in range(rank) if mask >> a & 1]


class ShadowTensor:
    """Stands for an ``ITensor``: ``shape`` / ``dtype`` / ``name`` like TensorRT's, value on demand."""

    def __init__(self, layer: "ShadowLayer", index: int):
        self.layer, self.index, self.name = layer, index, f"{layer.kind}_{id(layer):x}_{index}"

    @property
    def value(self) -> torch.Tensor:
        return self.layer.evaluate()[self.index]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self):
        return _trt_dtype(self.layer.net.trt, self.value.dtype)


class ShadowLayer:
    """One recorded ``add_*`` call; attributes set after creation (``mask``, ``reshape_dims``…) are kept."""

    def __init__(self, net: "ShadowNetwork", kind: str, fn, n_out: int = 1):
        object.__setattr__(self, "_attrs", {})
        self.net, self.kind, self._fn, self._out, self._n = net, kind, fn, None, n_out

    def __setattr__(self, key, value):
        if key.startswith("_") or key in ("net", "kind"):
            object.__setattr__(self, key, value)
        else:
            self._attrs[key] = value

    def __getattr__(self, key):
        attrs = object.__getattribute__(self, "_attrs")
        if key in attrs:
            return attrs[key]
        raise AttributeError(key)

    def get_output(self, i: int) -> ShadowTensor:
        return ShadowTensor(self, i)

    def evaluate(self) -> tuple[torch.Tensor, ...]:
        if self._out is None:
            out = self._fn(self._attrs)
            self._out = out if isinstance(out, tuple) else (out,)
        return self._out


class ShadowNetwork:
    """The subset of ``INetworkDefinition`` that ``LayerWriter`` and ``network_model`` call."""

    def __init__(self, trt, feeds: Mapping[str, Any]):
        self.trt = trt
        self.feeds = {k: torch.as_tensor(v) for k, v in feeds.items()}
        self.layers: list[ShadowLayer] = []
        self.outputs: list[ShadowTensor] = []

    @property
    def num_layers(self) -> int:
        return len(self.layers) - sum(1 for l in self.layers if l.kind == "INPUT")

    def _add(self, kind: str, fn, n_out: int = 1) -> ShadowLayer:
        layer = ShadowLayer(self, kind, fn, n_out)
        self.layers.append(layer)
        return layer

    def _dt(self, dtype):
        return _torch_dtype(self.trt, dtype)

    # -- IO -----------------------------------------------------------------------------------------
    def add_input(self, name, dtype, shape):
        if name not in self.feeds:
            raise KeyError(f"shadow network: no value fed for input {name!r}")
        v = self.feeds[name]
        want = self._dt(dtype)
        if v.dtype != want or v.dim() != len(shape) or any(d != -1 and d != s for d, s in zip(shape, v.shape)):
            raise ValueError(f"shadow input {name!r}: fed {tuple(v.shape)} {v.dtype}, network declares {tuple(shape)} {want}")
        t = self._add("INPUT", lambda a: v).get_output(0)
        t.name = name
        return t

    def mark_output(self, t: ShadowTensor) -> None:
        self.outputs.append(t)

    def run(self) -> dict[str, torch.Tensor]:
        """Values of the marked outputs by name."""
        return {t.name: t.value for t in self.outputs}

    # -- layers -------------------------------------------------------------------------------------
    def add_constant(self, shape, weights):
        arr = np.array(weights.numpy(), copy=True).reshape(tuple(shape))
        return self._add("CONSTANT", lambda a: torch.from_numpy(arr))

    def add_cast(self, t, dtype):
        return self._add("CAST", lambda a: t.value.to(self._dt(dtype)))

    def add_identity(self, t):
        return self._add("IDENTITY", lambda a: t.value)

    def add_elementwise(self, x, y, op):
        E = self.trt.ElementWiseOperation
        fns = {E.SUM: torch.add, E.PROD: torch.mul, E.SUB: torch.sub, E.DIV: torch.div,
               E.MIN: torch.minimum, E.MAX: torch.maximum, E.POW: torch.pow,
               E.FLOOR_DIV: lambda p, q: torch.div(p, q, rounding_mode="floor"),
               E.LESS: torch.lt, E.GREATER: torch.gt, E.EQUAL: torch.eq,
               E.AND: torch.logical_and, E.OR: torch.logical_or}
        if op not in fns:
            raise NotImplementedError(f"shadow network: elementwise {op}")

        def run(a):
            p, q = x.value, y.value
            if p.dim() != q.dim() or p.dtype != q.dtype:
                raise ValueError(f"elementwise {op.name}: TensorRT needs equal rank and dtype, got "
                                 f"{tuple(p.shape)} {p.dtype} and {tuple(q.shape)} {q.dtype}")
            return fns[op](p, q)
        return self._add("ELEMENTWISE", run)

    def add_unary(self, x, op):
        U = self.trt.UnaryOperation
        fns = {U.SQRT: torch.sqrt, U.RECIP: torch.reciprocal, U.EXP: torch.exp, U.COS: torch.cos,
               U.SIN: torch.sin, U.NOT: torch.logical_not, U.ABS: torch.abs, U.NEG: torch.neg}
        if op not in fns:
            raise NotImplementedError(f"shadow network: unary {op}")
        return self._add("UNARY", lambda a: fns[op](x.value))

    def add_activation(self, x, kind):
        if kind != self.trt.ActivationType.SIGMOID:
            raise NotImplementedError(f"shadow network: activation {kind}")
        return self._add("ACTIVATION", lambda a: torch.sigmoid(x.value))

    def add_reduce(self, x, op, axes, keep_dims):
        R = self.trt.ReduceOperation
        fns = {R.SUM: torch.sum, R.AVG: torch.mean, R.PROD: torch.prod,
               R.MAX: lambda v, dim, keepdim: torch.amax(v, dim=dim, keepdim=keepdim),
               R.MIN: lambda v, dim, keepdim: torch.amin(v, dim=dim, keepdim=keepdim)}
        if op not in fns:
            raise NotImplementedError(f"shadow network: reduce {op}")
        return self._add("REDUCE", lambda a: fns[op](x.value, dim=_axes(axes, x.value.dim()), keepdim=keep_dims))

    def add_matrix_multiply(self, x, op_x, y, op_y):
        M = self.trt.MatrixOperation

        def run(a):
            p, q = x.value, y.value
            if p.dim() != q.dim():
                raise ValueError(f"matrix multiply: ranks {p.dim()} and {q.dim()} differ")
            p = p.transpose(-1, -2) if op_x == M.TRANSPOSE else p
            q = q.transpose(-1, -2) if op_y == M.TRANSPOSE else q
            return torch.matmul(p, q)
        return self._add("MATRIX_MULTIPLY", run)

    def add_shuffle(self, x):
        def run(a):
            v = x.value
            if "first_transpose" in a:
                v = v.permute(*a["first_transpose"])
            if "reshape_dims" in a:
                dims = [v.shape[i] if d == 0 and a.get("zero_is_placeholder", True) else d
                        for i, d in enumerate(a["reshape_dims"])]
                v = v.reshape(dims)
            if "second_transpose" in a:
                v = v.permute(*a["second_transpose"])
            return v.contiguous()
        return self._add("SHUFFLE", run)

    def add_select(self, cond, x, y):
        return self._add("SELECT", lambda a: torch.where(cond.value, x.value, y.value))

    def add_gather(self, x, indices, axis):
        return self._add("GATHER", lambda a: torch.index_select(x.value, axis, indices.value.reshape(-1).long())
                         .reshape(*x.value.shape[:axis], *indices.value.shape, *x.value.shape[axis + 1:]))

    def add_topk(self, x, op, k, axes):
        def run(a):
            v = x.value
            (axis,) = _axes(axes, v.dim())
            vals, idx = torch.topk(v, k, dim=axis, largest=op == self.trt.TopKOperation.MAX, sorted=True)
            return vals, idx.to(torch.int32)
        return self._add("TOPK", run, 2)

    # -- native LLM layers (documented semantics; see module docstring) -----------------------------
    def add_attention_v2(self, q, k, v, norm_op, causal_kind):
        if norm_op != self.trt.AttentionNormalizationOp.SOFTMAX:
            raise NotImplementedError(f"shadow network: attention normalization {norm_op}")

        def run(a):
            qv, kv, vv = q.value, k.value, v.value
            rep = qv.shape[1] // kv.shape[1]
            kv, vv = kv.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
            s = torch.matmul(qv.float(), kv.float().transpose(-1, -2))
            S, T = s.shape[-2:]
            mask = a.get("mask")
            if mask is not None:
                m = mask.value
                s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
            elif causal_kind != self.trt.CausalMaskKind.NONE:
                off = T - S if causal_kind == self.trt.CausalMaskKind.LOWER_RIGHT else 0
                keep = torch.arange(T)[None, :] <= torch.arange(S)[:, None] + off
                s = s.masked_fill(~keep, float("-inf"))
            return torch.matmul(torch.softmax(s, -1), vv.float()).to(qv.dtype)
        return self._add("ATTENTION", run)

    def add_rotary_embedding(self, x, cos, sin, interleaved, rotary_dim):
        if interleaved:
            raise NotImplementedError("shadow network: interleaved rotary embedding")

        def run(a):
            xv, c, s = x.value, cos.value[:, None], sin.value[:, None]
            half = rotary_dim // 2
            x1, x2, rest = xv[..., :half], xv[..., half:rotary_dim], xv[..., rotary_dim:]
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], -1)
        return self._add("ROTARY_EMBEDDING", run)

    def add_kv_cache_update(self, cache, update, write_indices, mode):
        if mode != self.trt.KVCacheMode.LINEAR:
            raise NotImplementedError(f"shadow network: kv cache mode {mode}")

        def run(a):
            out = cache.value.clone()
            u, idx = update.value, write_indices.value
            if idx.dtype != torch.int32:
                raise ValueError(f"kv cache update: write indices must be int32, got {idx.dtype}")
            for b in range(out.shape[0]):
                i = int(idx[b])
                out[b, :, i:i + u.shape[2]] = u[b]
            return out
        return self._add("KV_CACHE_UPDATE", run)


def shadow_writer(feeds: Mapping[str, Any]):
    """A ``LayerWriter`` over a ``ShadowNetwork`` fed with ``feeds`` (input name → tensor)."""
    from m3_trt.export.tensorrt._trt import import_trt
    from m3_trt.export.tensorrt.network_layers import LayerWriter

    trt = import_trt()
    w = LayerWriter.__new__(LayerWriter)
    w.trt, w.builder, w.logger, w._keep = trt, None, None, []
    w.net = ShadowNetwork(trt, feeds)
    return w
