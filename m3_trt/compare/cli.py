"""``m3-trt compare CKPT --backend B``: how far a backend is from the torch reference, and where it starts.

Exit status 0 when every tolerance of the (backend, dtype) table holds, 1 when any is exceeded
(2 for bad input, from ``m3_trt.cli.main.main``).

The report (``report.json``, ``report.txt``, ``per_layer_error.png``) goes to ``--out``; without it,
to a new folder in the system temp folder (``m3-trt-compare-*``), never into the current folder.
Where it went is printed first and last. ``--out`` follows :mod:`m3_trt.outputs`: never equal to,
inside or containing the checkpoint, ``--backend-path``, ``--prompts`` or ``--images``; an existing
non-empty folder only if it holds a previous compare report (or with ``--overwrite``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from m3_trt.outputs import Stage, check_output

from m3_trt.compare.backends import BACKENDS

# a folder holding our report.json ({"tool": "m3-trt compare", ...}) is a previous compare output
COMPARE = Stage("compare", "report.json", "tool", "m3-trt compare")


def cmd_compare(*, ckpt: Path, backend: str, against: str = "reference", dtype: str = "fp32", fp8: bool = False,
                kernels: str = "reference", backend_path: Path | None = None, url: str | None = None,
                prompts: Path | None = None, images: Path | None = None, layers: bool = False, tokens: int = 8,
                out: Path | None = None, overwrite: bool = False, first_layers: int | None = None) -> int:
    from m3_trt.compare.few_layers import cmd_first_layers
    from m3_trt.compare.report import format_table, write_outputs
    from m3_trt.compare.runner import run_compare

    if out is None:
        out = Path(tempfile.mkdtemp(prefix="m3-trt-compare-"))
        print(f"compare: no --out given: the report goes to {out}", flush=True)
    else:
        check_output(out, stage=COMPARE, inputs=[ckpt, backend_path, prompts, images], overwrite=overwrite)
    if first_layers is not None:  # few-layer validation: its own streamed runner (few_layers.py)
        if against != "reference" or fp8 or url or layers:
            raise ValueError("--first-layers runs against the fp32 reference; it takes no --against, --fp8-emulate, "
                             "--url or --layers")
        return cmd_first_layers(ckpt=ckpt, n_layers=first_layers, backend=backend, backend_path=backend_path,
                                dtype=dtype, kernels=kernels, prompts=prompts, images=images, tokens=tokens, out=out)
    print(f"compare: ckpt={ckpt} backend={backend} against={against} dtype={dtype} fp8_emulate={fp8} "
          f"kernels={kernels} backend_path={backend_path} url={url} prompts={prompts or 'built-in'} images={images} "
          f"layers={layers} tokens={tokens} out={out}", flush=True)
    rep = run_compare(ckpt, backend=backend, against=against, dtype=dtype, fp8=fp8, kernels=kernels,
                      backend_path=backend_path, url=url, prompts=prompts, images=images, layers=layers,
                      tokens=tokens, progress=lambda m: print(m, flush=True))
    files = write_outputs(rep, Path(out))
    print()
    print(format_table(rep))
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0 if rep["verdict"] == "pass" else 1


def register(sub) -> None:
    s = sub.add_parser("compare", help="compare a backend with the torch reference, layer by layer and end to end")
    s.add_argument("ckpt", type=Path, help="the checkpoint (reference weights, processor, config)")
    s.add_argument("--backend", required=True, choices=list(BACKENDS))
    s.add_argument("--against", default="reference", choices=("reference", "transformers"),
                   help="reference = torch fp32 with the readable-spec kernels")
    s.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    s.add_argument("--fp8-emulate", action="store_true", help="torch backend: FP8 E4M3 weights and activations")
    s.add_argument("--kernels", default="reference", choices=("reference", "torch", "triton"),
                   help="torch backend: plugin implementation")
    s.add_argument("--backend-path", type=Path, default=None,
                   help="what the backend loads (default CKPT): an export folder (onnxruntime), a sharded build (sharded), or another checkpoint (torch/transformers)")
    s.add_argument("--url", default=None, help="triton: HOST:PORT of the gRPC endpoint")
    s.add_argument("--prompts", type=Path, default=None, help='JSONL of {"prompt": str, "images": [paths]} or {"input_ids": [int, ...]} (token ids, '
                        'as is; the only kind a checkpoint without tokenizer.json takes)')
    s.add_argument("--images", type=Path, default=None, help="image folder (paths in --prompts are relative to it)")
    s.add_argument("--layers", action="store_true", help="also compare every component, not only the logits")
    s.add_argument("--tokens", type=int, default=8, help="greedy tokens to generate and compare (0: none)")
    s.add_argument("--out", type=Path, default=None,
                   help="report folder (default: a new m3-trt-compare-* folder in the system temp folder, printed)")
    s.add_argument("--overwrite", action="store_true", help="write into an existing --out that is not a compare report")
    s.add_argument("--first-layers", type=int, default=None, metavar="N",
                   help="few-layer validation: the first N decoder layers + head, streamed one layer at a time, "
                        "prefill + --tokens decode steps (torch or onnxruntime backends)")
    s.set_defaults(fn=lambda a: cmd_compare(
        ckpt=a.ckpt, backend=a.backend, against=a.against, dtype=a.dtype, fp8=a.fp8_emulate, kernels=a.kernels,
        backend_path=a.backend_path, url=a.url, prompts=a.prompts, images=a.images, layers=a.layers,
        tokens=a.tokens, out=a.out, overwrite=a.overwrite, first_layers=a.first_layers))
