"""Command-line options declared once: one frozen dataclass per command, its fields are the options.

PATTERN (every stage's cli module): ``@dataclass(frozen=True, kw_only=True) class XOptions`` whose fields
carry ``field(default=..., metadata=opt("--flag", help=...))`` (no flags: a positional); ``register(sub)``
calls ``add_command(sub, "x", XOptions, cmd_x, help=...)``; ``cmd_x(o: XOptions)`` reads ``o.field``.
A new or changed flag also updates the CLI snapshot: ``python tests/test_cli_options.py --update``.

The field is the option: its name is argparse's ``dest``, its annotation gives the type, its default
the default (no default: required), so a flag, its type, default and help are written in one place
and the command function has one signature. How an annotation becomes an argument:

* ``bool`` (default False) → ``action="store_true"``;
* ``list[T]`` (``default_factory=list``) → ``action="append"`` of ``T``;
* ``T | None`` → ``type=T``; ``str`` → no ``type`` (argparse's own strings);
* ``opt(env="NAME")``: the default is ``$NAME`` when set when the parser is built.

This module is a root module (rank 0 in ``tests/test_import_graph.py``): it imports nothing from
``m3_trt``, so every stage's cli module may use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, Callable, TypeVar

__all__ = ["opt", "add_command", "from_args"]

T = TypeVar("T")
_KEY = "cli"  # the metadata key a field's command-line settings live under


def opt(*flags: str, help: str | None = None, choices: typing.Sequence[Any] | None = None,
        metavar: str | None = None, nargs: str | None = None, env: str | None = None) -> dict[str, Any]:
    """A field's ``metadata``: its flags (none: a positional) and argparse settings that are not its type."""
    for f in flags:
        if not f.startswith("-"):
            raise ValueError(f"opt(): flag {f!r} must start with '-' (a positional takes no flags)")
    return {_KEY: {"flags": flags, "help": help, "choices": None if choices is None else tuple(choices),
                   "metavar": metavar, "nargs": nargs, "env": env}}


def _argument(f: dataclasses.Field, hint: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """(flags, add_argument keywords) for one dataclass field."""
    if _KEY not in f.metadata:
        raise TypeError(f"options field {f.name!r} has no metadata=opt(...)")
    m = f.metadata[_KEY]
    kw: dict[str, Any] = {}
    has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if m["env"]:
        default = os.environ.get(m["env"], default)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # T | None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"options field {f.name!r}: only 'T | None' unions are supported, not {hint}")
        hint, origin, args = inner[0], typing.get_origin(inner[0]), typing.get_args(inner[0])
    if hint is bool:
        if default is not False:
            raise TypeError(f"options field {f.name!r}: a bool option is a store_true flag and defaults to False")
        kw["action"] = "store_true"
    elif origin is list:
        kw["action"] = "append"
        if args and args[0] is not str:
            kw["type"] = args[0]
    elif hint is not str:
        kw["type"] = hint
    if kw.get("action") != "store_true":
        for k in ("choices", "metavar", "nargs"):
            if m[k] is not None:
                kw[k] = m[k]
    if m["help"] is not None:
        kw["help"] = m["help"]
    if m["flags"]:
        kw["dest"] = f.name
        if has_default:
            kw["default"] = default
        else:
            kw["required"] = True
        return m["flags"], kw
    if has_default and kw.get("action") != "store_true":
        kw["default"] = default
    return (f.name,), kw


def add_command(sub: argparse._SubParsersAction, name: str, options: type[T], fn: Callable[[T], int | None],
                **parser_kw: Any) -> argparse.ArgumentParser:
    """Add subcommand ``name`` whose arguments are the fields of dataclass ``options``, in field order.

    The parsed namespace becomes one ``options`` instance and ``fn(instance)`` runs it (as ``args.fn(args)``).
    ``parser_kw`` goes to ``sub.add_parser`` (help, description, formatter_class).
    """
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"{options!r} is not a dataclass")
    hints = typing.get_type_hints(options)
    s = sub.add_parser(name, **parser_kw)
    for f in dataclasses.fields(options):
        flags, kw = _argument(f, hints[f.name])
        s.add_argument(*flags, **kw)
    s.set_defaults(fn=lambda a: fn(from_args(options, a)))
    return s


def from_args(options: type[T], args: argparse.Namespace) -> T:
    """The ``options`` instance whose fields are the same-named attributes of a parsed namespace."""
    return options(**{f.name: getattr(args, f.name) for f in dataclasses.fields(options)})
