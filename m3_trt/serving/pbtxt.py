"""Filling ``config.pbtxt`` templates safely: every substituted value is a protobuf text-format string body.

A value goes between the template's double quotes (``string_value: "${checkpoint}"``) or stands
alone as a number (``max_batch_size: ${max_batch_size}``). :func:`escape` writes backslashes,
quotes and control characters as text-format escapes, so a checkpoint path such as
``/x"} parameters {key: "backend" ...`` stays one string instead of adding fields to the config;
numbers pass through unchanged. Non-ASCII text stays UTF-8 (both Triton's C++ parser and
``google.protobuf.text_format`` read it).
"""

from __future__ import annotations

import string

__all__ = ["escape", "render"]

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}  # ' needs none in "..."


def escape(value: object) -> str:
    """``str(value)`` as the body of a text-format string literal."""
    out = []
    for ch in str(value):
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return "".join(out)


def render(template: str, values: dict, *, raw: frozenset[str] = frozenset()) -> str:
    """``string.Template`` substitution with every value escaped, except the keys in ``raw``
    (pre-built text-format blocks such as an engine's input list)."""
    return string.Template(template).substitute({k: v if k in raw else escape(v) for k, v in values.items()})
