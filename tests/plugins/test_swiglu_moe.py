"""SwiGLU-OAI MoE: torch_impl and the Triton kernels equal the reference expert loop (fp32)."""

from __future__ import annotations

import pytest
import torch
from plugin_helpers import TRITON_DEVICE, fresh_seed, needs_triton
from tolerances import TOLERANCES, max_abs, rel_err

from m3_trt.plugins.swiglu_moe import swiglu_moe
from m3_trt.plugins.swiglu_moe.reference import route

TOL = TOLERANCES[("kernel", "fp32")]
KW = dict(routed_scaling=2.0, alpha=1.702, limit=7.0)

# (T, D, E, F, Fs or 0 for no shared expert, top_k, routing bias mode)
CASES = {
    "T40-D64-E8-F32-Fs48-top2": (40, 64, 8, 32, 48, 2, "random"),
    "T40-D64-E8-F32-noshared-top2": (40, 64, 8, 32, 0, 2, "random"),
    "T1-D64-E8-F32-Fs48-top2-decode": (1, 64, 8, 32, 48, 2, "random"),
    "T40-D64-E8-F32-Fs48-top1-all-to-one-expert": (40, 64, 8, 32, 48, 1, "one"),
    "T40-D64-E8-F32-Fs48-top2-expert0-empty": (40, 64, 8, 32, 48, 2, "starve0"),
}


def _inputs(case, device="cpu"):
    T, D, E, F, Fs, top_k, mode = CASES[case]
    x = torch.randn(T, D, device=device)
    router = torch.randn(E, D, device=device) * 0.3
    bias = torch.randn(E, device=device) * 0.1
    if mode == "one":
        bias[3] = 100.0  # the bias only chooses: every token goes to expert 3 with weight 1
    elif mode == "starve0":
        bias[0] = -100.0
    # Weights scaled so that |gate| and |up| often exceed limit=7: the clamps are exercised.
    w13 = torch.randn(E, 2 * F, D, device=device) * 0.5
    w2 = torch.randn(E, D, F, device=device) * 0.2
    w13s = torch.randn(2 * Fs, D, device=device) * 0.5 if Fs else None
    w2s = torch.randn(D, Fs, device=device) * 0.2 if Fs else None
    _, experts = route(x, router, bias, top_k)
    counts = torch.bincount(experts.reshape(-1), minlength=E)
    if mode == "one":
        assert counts[3] == T
    if mode == "starve0":
        assert counts[0] == 0
    return (x, router, bias, w13, w2, w13s, w2s), dict(KW, top_k=top_k)


def _check(out, ref, seed, what):
    err = rel_err(out, ref)
    assert err <= TOL, f"seed={seed} {what}: rel err {err:.3e} > {TOL:.0e} (max-abs {max_abs(out, ref):.3e})"


def _parity(impl, case, device):
    seed = fresh_seed()
    args, kw = _inputs(case, device)
    ref = swiglu_moe(*args, **kw, impl="reference")
    out = swiglu_moe(*args, **kw, impl=impl)
    _check(out, ref, seed, impl)
    # negative control: a wrong alpha in the activation is caught by the same comparison
    bad = swiglu_moe(*args, **dict(kw, alpha=1.0), impl=impl)
    assert rel_err(bad, ref) > 100 * TOL, f"seed={seed}: wrong alpha not detected ({rel_err(bad, ref):.3e})"


@pytest.mark.parametrize("case", list(CASES))
def test_torch_impl_matches_reference(case):
    _parity("torch", case, "cpu")


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case):
    _parity("triton", case, TRITON_DEVICE)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("fault", ["no-shared-expert", "no-routed-scaling", "no-clamp"])
def test_negative_controls(impl, fault):
    seed = fresh_seed()
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    args, kw = _inputs("T40-D64-E8-F32-Fs48-top2", device)
    ref = swiglu_moe(*args, **kw, impl="reference")
    if fault == "no-shared-expert":
        args = (*args[:5], None, None)
    elif fault == "no-routed-scaling":
        kw = dict(kw, routed_scaling=1.0)
    else:
        kw = dict(kw, limit=1e9)
    bad = swiglu_moe(*args, **kw, impl=impl)
    assert rel_err(bad, ref) > 100 * TOL, f"seed={seed}: {fault} not detected ({rel_err(bad, ref):.3e})"


def test_shape_errors_name_the_tensor():
    args, kw = _inputs("T40-D64-E8-F32-Fs48-top2")
    x, router, bias, w13, w2, w13s, w2s = args
    with pytest.raises(ValueError, match=r"w2_EDF.*\(8, 64, 31\)"):
        swiglu_moe(x, router, bias, w13, w2[..., :31], w13s, w2s, **kw)
    with pytest.raises(ValueError, match="both"):
        swiglu_moe(x, router, bias, w13, w2, w13s, None, **kw)
    with pytest.raises(ValueError, match="top_k"):
        swiglu_moe(*args, **dict(kw, top_k=9))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_bf16_against_fp32_reference(impl):
    """bf16 expert weights/activations: judged against the fp32 reference on the same bf16 values."""
    seed = fresh_seed()
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    args, kw = _inputs("T40-D64-E8-F32-Fs48-top2", device)
    x, router, bias, *ws = args
    # The router stays fp32 (route() casts x to it): a bf16 router would round the logits
    # differently from the fp32 twin and could flip a near-tied expert choice.
    xb, *wb = (t.bfloat16() for t in (x, *ws))
    ref32 = swiglu_moe(xb.float(), router, bias, *(w.float() for w in wb), **kw)
    out = swiglu_moe(xb, router, bias, *wb, **kw, impl=impl)
    assert out.dtype == torch.bfloat16
    tol = TOLERANCES[("kernel", "bf16")]
    assert rel_err(out, ref32) <= tol, f"seed={seed}: rel err {rel_err(out, ref32):.3e} > {tol:.0e}"
