"""The fused FP8 encoder never loads a library it did not just build (issue 10, item 14).

The old encoder kept ``$XDG_CACHE_HOME/m3_trt/e4m3_rows_<tag>.so`` and ``dlopen``\\ ed it when present,
before its self-check: a library planted there ran its constructor in every process that
converted a checkpoint. These tests plant such a library (its constructor writes a marker file),
build the encoder, and check the marker never appears, that what is loaded sits in a private
(0700, ours) folder that is gone afterwards, and that the bit-exact self-check against torch
still refuses a wrong kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from m3_trt.quant import encode as qc

CC = shutil.which(os.environ.get("CC", "cc"))
pytestmark = pytest.mark.skipif(CC is None, reason="needs a C compiler (the encoder and the planted library)")

PLANTED_SRC = r"""
#include <stdio.h>
#include <stdint.h>
__attribute__((constructor)) static void planted(void) {
  FILE *f = fopen("%(marker)s", "w"); if (f) { fputs("ran", f); fclose(f); }
}
void m3_e4m3_rows_bf16(const uint16_t *x, const float *s, int64_t r, int64_t c, uint8_t *o) {}
void m3_e4m3_rows_f16(const uint16_t *x, const float *s, int64_t r, int64_t c, uint8_t *o) {}
"""


def _old_cache_path(cache_home: Path) -> Path:
    """Where the previous version looked for (and loaded) the compiled encoder."""
    tag = hashlib.sha256((qc._C_SRC + CC).encode()).hexdigest()[:16]
    return cache_home / "m3_trt" / f"e4m3_rows_{tag}.so"


def test_planted_library_in_the_old_cache_is_never_loaded(tmp_path, monkeypatch):
    marker = tmp_path / "constructor-ran"
    planted = _old_cache_path(tmp_path / "cache")
    planted.parent.mkdir(parents=True)
    (tmp_path / "p.c").write_text(PLANTED_SRC % {"marker": marker})
    subprocess.run([CC, "-fPIC", "-shared", "-o", str(planted), str(tmp_path / "p.c")], check=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.cache too

    loaded = []
    real_cdll = ctypes.CDLL

    def recording_cdll(path, *a, **kw):
        folder = Path(path).parent
        st = folder.stat()
        loaded.append((Path(path), stat.S_IMODE(st.st_mode), st.st_uid, folder))
        return real_cdll(path, *a, **kw)

    monkeypatch.setattr(ctypes, "CDLL", recording_cdll)
    lib = qc._build_c_kernel()
    assert not marker.exists(), "the planted library's constructor ran"
    assert lib is not None  # a compiler is here, so the fresh build passed its self-check
    assert len(loaded) == 1
    path, mode, uid, folder = loaded[0]
    assert path != planted and planted.parent not in path.parents
    assert mode == 0o700 and uid == os.getuid()
    assert not folder.exists()  # nothing left behind to plant into or to reuse
    # and the kernel it returned is the bit-exact encoder (the self-check's reference, on fresh data)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 30
    scale = x.float().abs().amax(-1, keepdim=True) / qc.E4M3_MAX
    want = (x.float() / scale).clamp(-qc.E4M3_MAX, qc.E4M3_MAX).to(qc.E4M3).view(torch.uint8)
    got = torch.empty_like(want)
    lib.m3_e4m3_rows_bf16(x.data_ptr(), scale.data_ptr(), 8, 64, got.data_ptr())
    assert torch.equal(got, want)


def test_self_check_refuses_a_kernel_that_rounds_differently(monkeypatch):
    """Negative control: a one-constant change (round half up instead of to even) is caught."""
    assert "0x7FFFFu" in qc._C_SRC
    monkeypatch.setattr(qc, "_C_SRC", qc._C_SRC.replace("0x7FFFFu", "0x80000u"))
    assert qc._build_c_kernel() is None
