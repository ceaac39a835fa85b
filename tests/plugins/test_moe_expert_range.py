"""The MoE's expert range (``expert_offset`` / ``expert_count``): ranks that each hold a slice of
the experts compute partial sums whose total is the full op — in the reference, the torch path,
the Triton kernels (adapted by the dispatcher), the ONNX node run by ONNX Runtime and the
TensorRT creator's fields. Negative controls: a slice passed without its range is refused, a
wrong offset gives a wrong total, a count that disagrees with the weights is refused.

fp32 verdict: relative error ``TOLERANCES[("sharded", "fp32")]`` (1e-5). Seed fixed (``SEED``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from plugin_helpers import TRITON_DEVICE, needs_triton
from tolerances import TOLERANCES, max_abs, rel_err

from m3_trt.plugins import onnx_ops
from m3_trt.plugins.swiglu_moe import swiglu_moe

SEED = 0
TOL = TOLERANCES[("sharded", "fp32")]
KW = dict(top_k=3, routed_scaling=2.0, alpha=1.702, limit=7.0)
# rank splits of E = 8 experts: even halves, and an uneven three-way split
SPLITS = {"E8-2ranks-4+4": [(0, 4), (4, 4)], "E8-3ranks-3+1+4": [(0, 3), (3, 1), (4, 4)]}


def _inputs(device="cpu", T=24, D=32, E=8, F=16, Fs=24):
    g = torch.Generator().manual_seed(SEED)

    def w(*shape, s=0.5):
        return (torch.randn(*shape, generator=g) * s).to(device)

    return [w(T, D, s=1.0), w(E, D, s=0.3), w(E, s=0.1), w(E, 2 * F, D), w(E, D, F, s=0.2), w(2 * Fs, D),
            w(D, Fs, s=0.2)]


def _rank_sum(args, split, impl, offsets=None):
    x, router, bias, w13, w2, w13s, w2s = args
    total = torch.zeros_like(x)
    for r, (off, n) in enumerate(split):
        shared = (w13s, w2s) if r == 0 else (None, None)  # the shared expert on one rank only
        total += swiglu_moe(x, router, bias, w13[off:off + n], w2[off:off + n], *shared, **KW,
                            expert_offset=off if offsets is None else offsets[r], expert_count=n, impl=impl)
    return total


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("impl", ["reference", "torch", pytest.param("triton", marks=needs_triton)])
def test_rank_partials_sum_to_the_full_op(impl, split):
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    args = _inputs(device)
    full = swiglu_moe(*args, **KW, impl="reference")
    total = _rank_sum(args, SPLITS[split], impl)
    err = rel_err(total, full)
    assert err <= TOL, f"seed={SEED} {impl} {split}: rel err {err:.3e} > {TOL:.0e} (max-abs {max_abs(total, full):.3e})"
    # negative control: every rank told offset 0 computes the wrong experts' weights
    wrong = _rank_sum(args, SPLITS[split], impl, offsets=[0] * len(SPLITS[split]))
    assert rel_err(wrong, full) > 100 * TOL, f"seed={SEED} {impl} {split}: wrong offsets not detected"


def test_a_slice_without_its_range_is_refused():
    x, router, bias, w13, w2, w13s, w2s = _inputs()
    with pytest.raises(ValueError, match=r"w13_EFD holds 4 experts.*over 8.*expert_offset / expert_count"):
        swiglu_moe(x, router, bias, w13[4:], w2[4:], None, None, **KW, impl="torch")
    with pytest.raises(ValueError, match="expert_count=3 but w13_EFD holds 4"):
        swiglu_moe(x, router, bias, w13[4:], w2[4:], None, None, **KW, expert_offset=4, expert_count=3)
    with pytest.raises(ValueError, match=r"range \[6, 10\) is outside the router's 8 experts"):
        swiglu_moe(x, router, bias, w13[4:], w2[4:], None, None, **KW, expert_offset=6, expert_count=4)


class _TwoRanks(torch.nn.Module):
    """Both ranks' partials of one MoE, each its own m3 node with its expert range."""

    def forward(self, x, router, bias, w13, w2, w13s, w2s):
        r0 = swiglu_moe(x, router, bias, w13[:4], w2[:4], w13s, w2s, **KW, expert_offset=0, expert_count=4,
                        impl="torch")
        r1 = swiglu_moe(x, router, bias, w13[4:], w2[4:], w13s[:0], w2s[:, :0], **KW, expert_offset=4,
                        expert_count=4, impl="torch")
        return r0, r1


def test_onnx_nodes_carry_the_range_and_run_in_onnx_runtime(tmp_path):
    import onnx
    import onnxruntime as ort

    args = _inputs()
    path = tmp_path / "ranks.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_TwoRanks(), tuple(args), str(path), dynamo=True, opset_version=20,
                          custom_translation_table=onnx_ops.translation_table(), verbose=False)
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "M3SwigluMoE"]
    ranges = [{a.name: a.i for a in n.attribute if a.name.startswith("expert_")} for n in nodes]
    assert ranges == [{"expert_offset": 0, "expert_count": 4}, {"expert_offset": 4, "expert_count": 4}]
    so = ort.SessionOptions()
    onnx_ops.register_ort(so)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    r0, r1 = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), args)})
    full = swiglu_moe(*args, **KW, impl="reference")
    total = torch.from_numpy(r0 + r1)
    assert rel_err(total, full) <= TOL, f"seed={SEED}: ONNX Runtime rank sum rel err {rel_err(total, full):.3e}"
    assert rel_err(torch.from_numpy(r1), full) > 100 * TOL  # negative control: one rank alone is not the op


@pytest.mark.trt
def test_tensorrt_creator_reads_the_range(tmp_path):
    from m3_trt.export.tensorrt import import_trt, trt_available, trt_unavailable_reason
    from m3_trt.export.tensorrt.plugins import SPECS, make_creator

    if not trt_available():
        pytest.skip(trt_unavailable_reason())
    trt = import_trt()
    creator = make_creator(trt, SPECS["swiglu_moe"])
    fc = trt.PluginFieldCollection([
        trt.PluginField("expert_offset", np.array([32], np.int32), trt.PluginFieldType.INT32),
        trt.PluginField("expert_count", np.array([16], np.int32), trt.PluginFieldType.INT32),
    ])
    plugin = creator.create_plugin("x", fc, trt.TensorRTPhase.BUILD)
    assert (plugin.attrs["expert_offset"], plugin.attrs["expert_count"]) == (32, 16)
    serialized = {f.name: np.asarray(f.data).reshape(-1)[0].item() for f in plugin.get_fields_to_serialize()}
    assert (serialized["expert_offset"], serialized["expert_count"]) == (32, 16)
