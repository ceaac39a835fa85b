"""An operator's contract, declared once, and what is derived from it.

Every operator folder holds a ``contract.py`` with one :class:`OpContract`: the op's name, its
inputs (layout-named, with dtypes), its attributes (kind and default) and ONE output-shape rule.
The rest is derived from it or checked against it:

* the ``torch.library`` op: its schema string (:func:`torch_schema`) and fake (:func:`define_op`);
* the ONNX schema, the exporter's translation and the ONNX Runtime kernel (``onnx_ops.py``);
* the TensorRT plugin creator: field names, defaults, version/namespace, ``get_output_shapes``
  (``export/tensorrt/plugins.py``).

The output-shape rule is written once against a tiny shape algebra (:class:`ShapeOps`:
``const``, ``min``, ``ceil_div``) and evaluated with Python ints / torch SymInts (eager and
fake), ONNX dims (``int`` or a ``dim_param`` string) and TensorRT's ``IExprBuilder``.

Dtype words: ``"float"`` = fp32 / fp16 / bf16 (a ``"float"`` output takes the first input's
dtype); ``"int32"``, ``"int64"`` as named.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

DTYPES = ("float", "int32", "int64")
ATTR_KINDS = {"int": int, "float": float}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output. ``layout``: the dims' names, e.g. ``"B H S D"``."""

    name: str
    dtype: str
    layout: str
    optional: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {DTYPES}")


@dataclass(frozen=True)
class AttrSpec:
    """One attribute: ``kind`` is ``"int"`` or ``"float"``; ``default`` None = required."""

    name: str
    kind: str
    default: int | float | None
    doc: str = ""

    def __post_init__(self):
        if self.kind not in ATTR_KINDS:
            raise ValueError(f"attribute {self.name!r}: kind {self.kind!r} is not one of {tuple(ATTR_KINDS)}")
        if self.default is not None and not isinstance(self.default, ATTR_KINDS[self.kind]):
            raise ValueError(f"attribute {self.name!r}: default {self.default!r} is not a {self.kind}")


@dataclass(frozen=True)
class ShapeOps:
    """The shape algebra an output rule is written in (ints, SymInts, ONNX dims or TensorRT exprs)."""

    const: Callable[[int], Any]
    min: Callable[[Any, Any], Any]
    ceil_div: Callable[[Any, Any], Any]


# Python ints and torch SymInts (eager results, the fake under torch.export)
INT_OPS = ShapeOps(const=int, min=torch.sym_min, ceil_div=lambda a, b: (a + b - 1) // b)


@dataclass(frozen=True)
class OpContract:
    """One custom operator. ``output_shapes(in_dims, attrs, ops)`` → each output's dims, where
    ``in_dims`` holds each input's dims (None for an absent optional input)."""

    name: str                       # torch.library ``m3::<name>``, folder name, registry key
    onnx_op_type: str               # ONNX node op_type == TensorRT plugin name
    doc: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attrs: tuple[AttrSpec, ...]
    output_shapes: Callable[[list, dict, ShapeOps], list]
    plugin_version: str = "1"
    plugin_namespace: str = "m3"
    namespace: str = "m3"           # torch.library namespace and ONNX domain
    # small fp32 inputs for the contract tests: ``examples(generator)`` → {case id: (inputs, attrs)};
    # the cases must reach every branch of the output rule (the indexer: ``n_blocks < topk``)
    examples: Callable[[torch.Generator], dict[str, tuple[list, dict]]] | None = None

    def __post_init__(self):
        names = [t.name for t in self.inputs + self.outputs] + [a.name for a in self.attrs]
        if len(set(names)) != len(names) or "impl" in names:
            raise ValueError(f"{self.name}: input/output/attribute names must be unique and not 'impl': {names}")
        seen_default = None
        for a in self.attrs:
            if a.default is not None:
                seen_default = a.name
            elif seen_default:
                raise ValueError(f"{self.name}: required attribute {a.name!r} follows {seen_default!r}, which has "
                                 "a default; list required attributes first (the torch schema needs it)")

    @property
    def qualname(self) -> str:
        return f"{self.namespace}::{self.name}"

    @property
    def defaults(self) -> dict[str, int | float | None]:
        return {a.name: a.default for a in self.attrs}

    def resolve_attrs(self, given: dict[str, Any], where: str) -> dict[str, int | float]:
        """``given`` completed with defaults and cast to each attribute's kind; raises on a
        missing required or an unknown attribute, naming it and ``where`` it came from."""
        unknown = set(given) - {a.name for a in self.attrs}
        if unknown:
            raise ValueError(f"{where}: {self.name} has no attribute(s) {sorted(unknown)}")
        out = {}
        for a in self.attrs:
            value = given.get(a.name, a.default)
            if value is None:
                raise ValueError(f"{where}: {self.name} needs attribute {a.name!r} ({a.kind}, no default)")
            out[a.name] = ATTR_KINDS[a.kind](value)
        return out

    def shapes(self, in_dims: list, attrs: dict, ops: ShapeOps = INT_OPS) -> list:
        return self.output_shapes(in_dims, attrs, ops)


# -- torch.library ------------------------------------------------------------------------------

def torch_schema(c: OpContract) -> str:
    """The op's schema, e.g. ``(Tensor q_BHSD, ..., SymInt topk=16, ..., str impl="torch") -> Tensor``."""
    args = [f"Tensor{'?' if t.optional else ''} {t.name}" for t in c.inputs]
    for a in c.attrs:
        typ = "SymInt" if a.kind == "int" else "float"
        args.append(f"{typ} {a.name}" + ("" if a.default is None else f"={a.default!r}"))
    args.append('str impl="torch"')
    outs = ", ".join("Tensor" for _ in c.outputs)
    return f"({', '.join(args)}) -> {outs if len(c.outputs) == 1 else '(' + outs + ')'}"


def python_signature(c: OpContract, impl_default: str | None = "torch") -> inspect.Signature:
    """Positional inputs, then the attributes (with their defaults), then ``impl``."""
    P = inspect.Parameter
    params = [P(t.name, P.POSITIONAL_OR_KEYWORD, default=None if t.optional else P.empty,
                annotation=torch.Tensor | None if t.optional else torch.Tensor) for t in c.inputs]
    params += [P(a.name, P.POSITIONAL_OR_KEYWORD, default=P.empty if a.default is None else a.default,
                 annotation=ATTR_KINDS[a.kind]) for a in c.attrs]
    if impl_default is not None:
        params.append(P("impl", P.POSITIONAL_OR_KEYWORD, default=impl_default, annotation=str))
    return inspect.Signature(params)


_TORCH_OUT_DTYPES = {"int32": torch.int32, "int64": torch.int64}


def define_op(c: OpContract, impls: dict[str, Callable]):
    """Register ``m3::<name>`` from the contract: the schema is :func:`torch_schema`, the kernel
    calls ``impls[impl](*inputs, **attrs)``, the fake applies the contract's output rule."""
    sig = python_signature(c)
    n_in = len(c.inputs)

    def split(args, kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        values = list(bound.arguments.values())
        return values[:n_in], dict(zip((a.name for a in c.attrs), values[n_in:-1])), values[-1]

    def kernel(*args, **kwargs):
        tensors, attrs, impl = split(args, kwargs)
        if impl not in impls:
            raise ValueError(f"{c.qualname}: impl must be one of {tuple(impls)}, got {impl!r}")
        return impls[impl](*tensors, **attrs)

    def fake(*args, **kwargs):
        tensors, attrs, _ = split(args, kwargs)
        dims = [None if t is None else list(t.shape) for t in tensors]
        shapes = c.output_shapes(dims, attrs, INT_OPS)
        first = tensors[0]
        outs = tuple(first.new_empty(s, dtype=_TORCH_OUT_DTYPES.get(o.dtype, first.dtype))
                     for s, o in zip(shapes, c.outputs))
        return outs if len(outs) > 1 else outs[0]

    kernel.__signature__ = sig
    op = torch.library.custom_op(c.qualname, kernel, mutates_args=(), schema=torch_schema(c))
    op.register_fake(fake)
    return op


@dataclass(frozen=True)
class Operator:
    """A registry entry: the contract, the public dispatcher (checks, then runs the torch op with
    ``impl=``), the implementations by name, and the static-shape function that ``--plugins none``
    exports in standard ONNX ops."""

    contract: OpContract
    fn: Callable
    impls: dict[str, Callable]
    portable: Callable
