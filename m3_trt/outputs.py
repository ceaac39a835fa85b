"""Output folders: the one rule every command that writes a folder follows.

* **Inputs are never touched.** An output equal to, inside, or containing any of the command's
  inputs (the checkpoint, an export it reads) is refused, whatever the flags.
* **Only our own outputs are replaced.** An existing output is replaced only when it carries the
  marker of the same stage (``build.json`` with ``format: m3-trt-build/…``, an ONNX export's or a
  repository's ``manifest.json`` …), or when the user passes ``--overwrite``. Anything else — a
  user's folder, a file, a checkpoint — is refused with an error naming the folder.
* **Nothing half-written.** Work happens in a sibling ``.<name>.partial…`` folder that is renamed
  into place when complete; a replaced output is first renamed to ``.<name>.old-<pid>`` and removed
  only after the new one is in place. These two kinds of sibling are the only paths written
  outside ``out`` (both beside it, both removed on success).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


class OutputError(ValueError):
    """An output folder the command refuses to write; the message names the folder and why."""


@dataclass(frozen=True)
class Stage:
    """What marks a folder as a previous output of one stage: ``marker`` file, JSON ``key`` prefix."""

    name: str
    marker: str
    key: str
    prefix: str

    def owns(self, folder: Path) -> bool:
        f = folder / self.marker
        if not f.is_file():
            return False
        try:
            value = json.loads(f.read_text()).get(self.key)
        except (OSError, ValueError, AttributeError):
            return False
        return isinstance(value, str) and value.startswith(self.prefix)


BUILD = Stage("build-engine", "build.json", "format", "m3-trt-build/")
ONNX_EXPORT = Stage("export", "manifest.json", "format", "m3-trt-onnx/")
TRITON_REPO = Stage("triton-repo", "manifest.json", "stage", "triton-repository")
QUANTIZED = Stage("quantize", "m3_trt_quantize.json", "format", "m3-trt-quantize/")
SYNTHETIC = Stage("make-synthetic", "m3_trt_synthetic.json", "format", "m3-trt-synthetic/")


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output(out: str | Path, *, stage: Stage, inputs: Iterable[str | Path] = (),
                 overwrite: bool = False) -> Path:
    """Validate ``out`` for ``stage``; returns it resolved. Raises :class:`OutputError` to refuse."""
    out = Path(out)
    real = out.resolve()
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).resolve()
        if _related(real, src):
            how = "is" if real == src else ("is inside" if src in real.parents else "contains")
            raise OutputError(f"{stage.name}: --out {out} {how} the input {inp}; choose a folder outside it")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{stage.name}: --out {out} exists and is not a folder; refusing to replace it")
    if out.is_dir() and any(out.iterdir()) and not stage.owns(out) and not overwrite:
        raise OutputError(
            f"{stage.name}: --out {out} exists and is not a previous {stage.name} output (no {stage.marker} "
            f"of ours); refusing to replace it. Choose a new folder, or pass --overwrite to replace it")
    return real


def partial_dir(out: Path) -> Path:
    """The fixed work folder beside ``out`` (used by resumable builds)."""
    return out.parent / f".{out.name}.partial"


def swap_into_place(work: Path, out: Path) -> None:
    """``work`` becomes ``out``; a previous ``out`` is removed only after the rename succeeded."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    try:
        work.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
