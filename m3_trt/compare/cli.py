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
from dataclasses import dataclass, field
from pathlib import Path

from m3_trt.options import add_command, opt
from m3_trt.outputs import Stage, check_output

from m3_trt.compare.backends import BACKENDS
from m3_trt.compare.few_layers import cmd_first_layers
from m3_trt.compare.report import format_table, write_outputs
from m3_trt.compare.runner import run_compare

# a folder holding our report.json ({"tool": "m3-trt compare", ...}) is a previous compare output
COMPARE = Stage("compare", "report.json", "tool", "m3-trt compare")


@dataclass(frozen=True, kw_only=True)
class CompareOptions:
    ckpt: Path = field(metadata=opt(help="the checkpoint (reference weights, processor, config)"))
    backend: str = field(metadata=opt("--backend", choices=list(BACKENDS)))
    against: str = field(default="reference", metadata=opt(
        "--against", choices=("reference", "transformers"),
        help="reference = torch fp32 with the readable-spec kernels"))
    dtype: str = field(default="fp32", metadata=opt("--dtype", choices=("fp32", "bf16")))
    fp8_emulate: bool = field(default=False, metadata=opt(
        "--fp8-emulate", help="torch backend: FP8 E4M3 weights and activations"))
    kernels: str = field(default="reference", metadata=opt(
        "--kernels", choices=("reference", "torch", "triton"), help="torch backend: plugin implementation"))
    backend_path: Path | None = field(default=None, metadata=opt(
        "--backend-path", help="what the backend loads (default CKPT): an export folder (onnxruntime), a sharded "
                               "build (sharded), or another checkpoint (torch/transformers)"))
    url: str | None = field(default=None, metadata=opt("--url", help="triton: HOST:PORT of the gRPC endpoint"))
    prompts: Path | None = field(default=None, metadata=opt(
        "--prompts", help='JSONL of {"prompt": str, "images": [paths]} or {"input_ids": [int, ...]} (token ids, '
                          'as is; the only kind a checkpoint without tokenizer.json takes)'))
    images: Path | None = field(default=None, metadata=opt(
        "--images", help="image folder (paths in --prompts are relative to it)"))
    layers: bool = field(default=False, metadata=opt(
        "--layers", help="also judge every component, not only the logits. torch, onnxruntime and sharded stream: one "
                         "decoder layer of each side in memory (each layer read once per step), each component judged "
                         "isolated (on the reference's input) and cumulative (the backend's own chain); transformers "
                         "and triton (and --against transformers) load whole models: cumulative only"))
    tokens: int = field(default=8, metadata=opt("--tokens", help="greedy tokens to generate and compare (0: none)"))
    out: Path | None = field(default=None, metadata=opt(
        "--out", help="report folder (default: a new m3-trt-compare-* folder in the system temp folder, printed)"))
    overwrite: bool = field(default=False, metadata=opt(
        "--overwrite", help="write into an existing --out that is not a compare report"))
    first_layers: int | None = field(default=None, metadata=opt(
        "--first-layers", metavar="N", help="few-layer validation: the first N decoder layers + head, streamed one "
                                            "layer at a time, prefill + --tokens decode steps (torch, onnxruntime or "
                                            "sharded backends; the --layers walk stopped after layer N-1)"))


def cmd_compare(o: CompareOptions) -> int:
    out = o.out
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="m3-trt-compare-"))
        print(f"compare: no --out given: the report goes to {out}", flush=True)
    else:
        check_output(out, stage=COMPARE, inputs=[o.ckpt, o.backend_path, o.prompts, o.images], overwrite=o.overwrite)
    if o.first_layers is not None:  # few-layer validation: its own streamed runner (few_layers.py)
        if o.against != "reference" or o.fp8_emulate or o.url or o.layers:
            raise ValueError("--first-layers runs against the fp32 reference; it takes no --against, --fp8-emulate, "
                             "--url or --layers")
        return cmd_first_layers(ckpt=o.ckpt, n_layers=o.first_layers, backend=o.backend, backend_path=o.backend_path,
                                dtype=o.dtype, kernels=o.kernels, prompts=o.prompts, images=o.images, tokens=o.tokens,
                                out=out)
    print(f"compare: ckpt={o.ckpt} backend={o.backend} against={o.against} dtype={o.dtype} fp8_emulate={o.fp8_emulate} "
          f"kernels={o.kernels} backend_path={o.backend_path} url={o.url} prompts={o.prompts or 'built-in'} "
          f"images={o.images} layers={o.layers} tokens={o.tokens} out={out}", flush=True)
    rep = run_compare(o.ckpt, backend=o.backend, against=o.against, dtype=o.dtype, fp8=o.fp8_emulate, kernels=o.kernels,
                      backend_path=o.backend_path, url=o.url, prompts=o.prompts, images=o.images, layers=o.layers,
                      tokens=o.tokens, progress=lambda m: print(m, flush=True))
    files = write_outputs(rep, Path(out))
    print()
    print(format_table(rep))
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0 if rep["verdict"] == "pass" else 1


def register(sub) -> None:
    """Add ``compare`` to the ``m3-trt`` command line."""
    add_command(sub, "compare", CompareOptions, cmd_compare,
                help="compare a backend with the torch reference, layer by layer and end to end")
