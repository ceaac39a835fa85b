"""Compile every Triton kernel of the plugins for an H100 (sm_90) down to a cubin, no GPU needed.

Run as a script in a process without ``TRITON_INTERPRET`` (the interpreter replaces the kernels
with Python stand-ins); ``test_triton_compile.py`` does that. Prints one ``ok`` line per variant.
"""

from __future__ import annotations

import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from m3_trt.plugins.block_sparse_attention.triton_kernel import _bsa_kernel
from m3_trt.plugins.indexer_topk.triton_kernel import _indexer_topk_kernel
from m3_trt.plugins.swiglu_moe.triton_kernel import _down_kernel, _gate_up_kernel


def compile_sm90(kernel, pointers, floats, constexprs):
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in floats else "i32") for n in names}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm.get("cubin"), f"{kernel.fn.__name__}: no cubin"
    return compiled


def main():
    for dt in ("bf16", "fp32"):
        p = f"*{dt}"
        fp32 = dt == "fp32"
        flags = dict(CAST_FP32=fp32, IEEE=fp32)
        for split in (False, True):
            compile_sm90(_bsa_kernel, dict(q_ptr=p, k_ptr=p, v_ptr=p, idx_ptr="*i32", pos_ptr="*i64", o_ptr=p,
                                           acc_ptr="*fp32", ml_ptr="*fp32"), {"scale"},
                         dict(R=16, R_P2=16, D=128, D_P2=128, BLOCK_SIZE=128, BS_P2=128, SPLIT=split,
                              **flags))
            print(f"ok block_sparse_attention {dt} split={split}")
        compile_sm90(_indexer_topk_kernel, dict(q_ptr=p, k_ptr=p, pos_ptr="*i64", out_ptr="*i32"), set(),
                     dict(BLOCK_SIZE=128, BS_P2=128, D=128, D_P2=128, N_P2=128, K=16, K_P2=16, LOCAL=1, BLOCK_M=64,
                          **flags))
        print(f"ok indexer_topk {dt}")
        compile_sm90(_gate_up_kernel, dict(x_ptr=p, w13_ptr=p, ids_ptr="*i32", tile_e_ptr="*i32", h_ptr=p),
                     {"alpha", "limit"}, dict(BM=64, BN=64, BK=64, **flags))
        compile_sm90(_down_kernel, dict(h_ptr=p, w2_ptr=p, ids_ptr="*i32", tile_e_ptr="*i32", wt_ptr="*fp32",
                                        y_ptr="*fp32"), set(), dict(BM=64, BN=64, BK=64, **flags))
        print(f"ok swiglu_moe {dt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
