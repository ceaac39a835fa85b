"""Greedy generation from a ``build-engine`` output across its ranks.

``generate_sharded(build_dir, input_ids, max_new_tokens)`` spawns one gloo process per rank
(world size from ``build.json``) and returns rank 0's tokens; every rank decodes the same tokens
because the logits are replicated. Under ``torchrun --nproc-per-node W -m m3_trt.runtime.run
BUILD --ids 1,2,3 --max-new-tokens 8`` each process runs one rank (NCCL on GPUs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def _rank_main(rank: int, world: int, build_dir: str, ids: list[int], n: int, eos, out_file: str | None) -> None:
    from m3_trt.model.generate import greedy
    from m3_trt.runtime.load import load_rank

    model = load_rank(build_dir, rank)
    toks = greedy(model, torch.tensor([ids]), n, eos_token_id=eos)
    if rank == 0 and out_file:
        Path(out_file).write_text(json.dumps(toks))


def generate_sharded(build_dir: str | Path, input_ids: torch.Tensor, max_new_tokens: int,
                     eos_token_id=None) -> list[int]:
    from m3_trt.runtime.dist import spawn

    manifest = json.loads((Path(build_dir) / "build.json").read_text())
    world = int(manifest["layout"]["world"])
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "tokens.json")
        spawn(_rank_main, world, str(build_dir), [int(i) for i in input_ids.reshape(-1)], max_new_tokens,
              eos_token_id, out)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> int:
    from m3_trt.runtime.dist import init

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("build_dir")
    p.add_argument("--ids", required=True, help="comma-separated prompt token ids")
    p.add_argument("--max-new-tokens", type=int, default=16)
    a = p.parse_args(argv)
    rank, world = init()
    out = tempfile.mktemp(suffix=".json")
    _rank_main(rank, world, a.build_dir, [int(x) for x in a.ids.split(",")], a.max_new_tokens, None, out)
    if rank == 0:
        print(Path(out).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
