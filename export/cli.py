"""``m3-trt export``: layer-by-layer ONNX (and, with ``--tensorrt``, engines) for a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path


def cmd_export(*, ckpt: Path, out: Path, dtype: str, plugins: str, max_seq_len: int, max_batch: int,
               verify: bool, tensorrt: bool, quant: str = "none", calib: Path | None = None,
               overwrite: bool = False) -> int:
    from m3_trt.model.config import M3Config
    from m3_trt.outputs import ONNX_EXPORT, check_output

    from m3_trt.export.onnx import export_model

    check_output(out, stage=ONNX_EXPORT, inputs=[ckpt, calib], overwrite=overwrite)  # before any work
    cfg = M3Config.from_pretrained(ckpt)  # validate before any work
    print(f"export: ckpt={ckpt} out={out} dtype={dtype} plugins={plugins} max_seq_len={max_seq_len} "
          f"max_batch={max_batch} verify={verify} tensorrt={tensorrt} quant={quant} calib={calib} "
          f"layers={cfg.text.num_hidden_layers}")
    export_model(ckpt, out, dtype=dtype, plugins=plugins, max_seq_len=max_seq_len, max_batch=max_batch,
                 verify=verify, quant=quant, calib=calib, overwrite=overwrite)
    manifest = json.loads((out / "manifest.json").read_text())
    if verify and not manifest.get("verify", {}).get("ok", True):
        print("export: verification FAILED (see manifest.json 'verify')")
        return 1
    if tensorrt:
        from m3_trt.export.tensorrt_build import build_engines

        report = build_engines(out, dtype=dtype)
        return 0 if all(r["ok"] for r in report.values()) else 1
    print(f"wrote {out}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("export", help="export each component to ONNX (+ optional TensorRT engines)")
    s.add_argument("ckpt", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    s.add_argument("--plugins", default="m3", choices=("m3", "none"))
    s.add_argument("--max-seq-len", type=int, default=256)
    s.add_argument("--max-batch", type=int, default=8)
    s.add_argument("--verify", action="store_true", help="run each component in ONNX Runtime vs torch")
    s.add_argument("--tensorrt", action="store_true", help="also build a serialized engine per component")
    s.add_argument("--quant", default="none", choices=("none", "fp8"),
                   help="fp8: E4M3 weights + calibrated activation scales as Q/DQ pairs")
    s.add_argument("--calib", type=Path, help="calibration prompts (jsonl of {text, image?}); default built-in")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT that is not a previous export (never the checkpoint)")
    s.set_defaults(fn=lambda a: cmd_export(ckpt=a.ckpt, out=a.out, dtype=a.dtype, plugins=a.plugins,
                                           max_seq_len=a.max_seq_len, max_batch=a.max_batch, verify=a.verify,
                                           tensorrt=a.tensorrt, quant=a.quant, calib=a.calib,
                                           overwrite=a.overwrite))
