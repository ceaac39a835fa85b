"""The Triton kernels compile for an H100 (sm_90, through ptxas to a cubin) on this GPU-less
machine: catches what the interpreter never checks (types across ``if``/loops, dot shapes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: really compile, every run
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_sm90.py"))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.count("ok ") == 8, proc.stdout
