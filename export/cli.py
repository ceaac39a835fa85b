"""``m3-trt export``: layer-by-layer ONNX (and, with ``--tensorrt``, engines) for a checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from m3_trt.export.onnx import export_model
from m3_trt.export.tensorrt_build import build_engines
from m3_trt.model.config import M3Config
from m3_trt.options import add_command, opt
from m3_trt.outputs import ONNX_EXPORT, check_output


@dataclass(frozen=True, kw_only=True)
class ExportCommandOptions:
    ckpt: Path = field(metadata=opt())
    out: Path = field(metadata=opt())
    dtype: str = field(default="fp32", metadata=opt("--dtype", choices=("fp32", "fp16", "bf16")))
    plugins: str = field(default="m3", metadata=opt("--plugins", choices=("m3", "none")))
    max_seq_len: int = field(default=256, metadata=opt("--max-seq-len"))
    max_batch: int = field(default=8, metadata=opt("--max-batch"))
    verify: bool = field(default=False, metadata=opt("--verify", help="run each component in ONNX Runtime vs torch"))
    tensorrt: bool = field(default=False, metadata=opt(
        "--tensorrt", help="also build a serialized engine per component"))
    quant: str = field(default="none", metadata=opt(
        "--quant", choices=("none", "fp8"), help="fp8: E4M3 weights + calibrated activation scales as Q/DQ pairs"))
    calib: Path | None = field(default=None, metadata=opt(
        "--calib", help="calibration prompts (jsonl of {text, image?}); default built-in"))
    overwrite: bool = field(default=False, metadata=opt(
        "--overwrite", help="replace an existing OUT that is not a previous export (never the checkpoint)"))


def cmd_export(o: ExportCommandOptions) -> int:
    check_output(o.out, stage=ONNX_EXPORT, inputs=[o.ckpt, o.calib], overwrite=o.overwrite)  # before any work
    cfg = M3Config.from_pretrained(o.ckpt)  # validate before any work
    print(f"export: ckpt={o.ckpt} out={o.out} dtype={o.dtype} plugins={o.plugins} max_seq_len={o.max_seq_len} "
          f"max_batch={o.max_batch} verify={o.verify} tensorrt={o.tensorrt} quant={o.quant} calib={o.calib} "
          f"layers={cfg.text.num_hidden_layers}")
    export_model(o.ckpt, o.out, dtype=o.dtype, plugins=o.plugins, max_seq_len=o.max_seq_len, max_batch=o.max_batch,
                 verify=o.verify, quant=o.quant, calib=o.calib, overwrite=o.overwrite)
    manifest = json.loads((o.out / "manifest.json").read_text())
    if o.verify and not manifest.get("verify", {}).get("ok", True):
        print("export: verification FAILED (see manifest.json 'verify')")
        return 1
    if o.tensorrt:
        report = build_engines(o.out, dtype=o.dtype)
        return 0 if all(r["ok"] for r in report.values()) else 1
    print(f"wrote {o.out}")
    return 0


def register(sub) -> None:
    """Add ``export`` to the ``m3-trt`` command line."""
    add_command(sub, "export", ExportCommandOptions, cmd_export,
                help="export each component to ONNX (+ optional TensorRT engines)")
