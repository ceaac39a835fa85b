"""Peak-memory helpers for the "flat in depth" tests (issue 12): a wide checkpoint of any depth, and
the peak RSS of a command run in a subprocess.

Used by ``tests/engines/test_streaming.py`` (the build) and ``tests/test_compare_streamed.py``
(``compare --layers``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from m3_trt.model import config as cfgmod
from m3_trt.model.checkpoint import original_layout, write_sharded
from m3_trt.model.modeling import M3ForConditionalGeneration

MEMORY_RATIO = 1.25  # issue 12: 12 layers within 1.25x of 4 layers at the same width


def make_wide(out: Path, layers: int, hidden: int = 384, experts: int = 16, inter: int = 384) -> Path:
    """A project-made checkpoint (original on-disk layout, bf16, no tokenizer files), ``layers`` deep."""
    cfg = cfgmod.tiny()
    text = replace(cfg.text, hidden_size=hidden, head_dim=64, rotary_dim=32, intermediate_size=inter,
                   dense_intermediate_size=2 * inter, shared_intermediate_size=inter, num_local_experts=experts,
                   num_hidden_layers=layers,
                   layer_types=tuple("full_attention" if i % 4 == 0 else "minimax_m3_sparse" for i in range(layers)),
                   mlp_layer_types=tuple("dense" if i == 0 else "sparse" for i in range(layers)))
    cfg = replace(cfg, text=text, projector_hidden_size=hidden)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = M3ForConditionalGeneration(cfg)
    state = {k: torch.randn(v.shape, dtype=torch.bfloat16) * 0.02 for k, v in model.state_dict().items()}
    out.mkdir(parents=True)
    write_sharded(original_layout(state, layers), out, 32 << 20)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return out


# Runs argv[1:] and prints its exit status and peak RSS (KiB). The measured command must be the child
# of a small process: a child's ru_maxrss includes the RSS of the process it was (v)forked from, here
# pytest's.
_MEASURE = ("import resource, subprocess, sys; "
            "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
            "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_mib(cmd: list[str], ok: tuple[int, ...] = (0,)) -> float:
    """Peak RSS (MiB) of ``cmd`` run in a subprocess; its exit status must be one of ``ok``."""
    p = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    rc, kib = map(int, p.stdout.split()[-2:])
    assert rc in ok, f"{cmd[:4]}... exited {rc}: {p.stderr[-3000:]}"
    return kib / 1024  # KiB on Linux
