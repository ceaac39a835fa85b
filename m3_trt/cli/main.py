"""The ``m3-trt`` command line: thin commands over the library.

Each command is one options dataclass and one function taking it (``m3_trt.options``), declared
beside its library; this module only gathers them. Each command prints its resolved configuration
before long work. Optional libraries (onnxruntime, tensorrt, tritonclient, pytriton, transformers)
are imported inside the command functions that need them, so ``m3-trt --help`` and every command's
``--help`` work without them (tests/test_cli_options.py).
"""

from __future__ import annotations

import argparse
import sys

from m3_trt.build import cli as build_cli
from m3_trt.checkpoints import synthetic
from m3_trt.cli import commands, demo
from m3_trt.compare import cli as compare_cli
from m3_trt.export import cli as export_cli
from m3_trt.quant import quantize
from m3_trt.serving import cli as serving_cli

# in the order `m3-trt --help` lists them
REGISTRARS = (commands.register, demo.register, export_cli.register, build_cli.register, serving_cli.register,
              compare_cli.register, synthetic.register, quantize.register)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3-trt", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as e:
        print(f"m3-trt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
