"""Accuracy budgets of ``m3-trt compare``: one table per (backend, dtype), each number explained.

The verdict metric for tensors is the relative error ``||out - ref|| / ||ref||`` against the torch
reference in fp32 (``kernels="reference"``). Logits are also judged end to end by top-k agreement
and KL divergence; greedy generation by exact match. Components are named ``vision_encoder``,
``projector``, ``embedding``, ``indexer.N``, ``layer.N``, ``final_norm``, ``logits``; a budget
may differ by *kind* (the name before the dot).

The base numbers (fp32 relative error, the FP8 top-1 bar) come from the project's one table,
:mod:`m3_trt.tolerances`, which the tests and the exporter's ``--verify`` also read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from m3_trt.tolerances import FP8_TOP1_AGREEMENT, TOLERANCES


@dataclass(frozen=True)
class Tolerance:
    """Budgets for one (backend, dtype). ``None`` means "reported, not gated"."""

    rel: float | None                    # default relative-error bound for tensors
    rel_by_kind: dict[str, float] = field(default_factory=dict)  # overrides by component kind
    block_agreement: float | None = None  # min fraction of identical indexer block sets per row
    top1: float | None = None            # min top-1 agreement of logits over prompt positions
    top5: float | None = None            # min mean top-5 overlap |top5(ref) ∩ top5(out)| / 5
    kl: float | None = None              # max KL(ref || backend), nats, mean over positions
    greedy_exact: bool = False           # every prompt's greedy continuation must equal the reference's
    why: str = ""

    def rel_for(self, component: str) -> float | None:
        return self.rel_by_kind.get(component.split(".")[0], self.rel)

    def as_dict(self) -> dict:
        return asdict(self)


# fp32 against fp32: only the order of accumulation differs (SDPA vs explicit matmuls, expert
# loop vs grouped GEMMs, ONNX Runtime / TensorRT kernels). fp32 round-off is 6e-8; the tiny and
# the parity suites measure 1e-7..7e-7 through four layers and the vision tower, so 1e-5 leaves
# more than an order of magnitude for depth (60 layers) while a single wrong weight, a swapped
# expert or an off-by-one block moves some component by >1e-3.
# Block choices must agree exactly: a flip needs two block scores within ~1e-6 of each other.
# Top-1 and KL follow from 1e-5 logits error (KL ~ rel² ≈ 1e-10). Top-5 overlap allows one
# 5th/6th-place near-tie swap in a hundred positions (a tie at 1e-6 is not a bug).
EXACT_FP32 = Tolerance(rel=TOLERANCES[("parity_transformers", "fp32")], block_agreement=1.0, top1=1.0, top5=0.99,
                       kl=1e-6, greedy_exact=True,
                       why="fp32 vs fp32: only accumulation order differs")

# bf16 keeps 8 mantissa bits (round-off 2^-9 = 2e-3; one matmul output ≈ 4e-3 relative): the
# tiny checkpoint measures 2e-3 at the embedding and 4e-3..6e-3 after layer 0 and in the vision
# tower. MoE layers add *routing flips*: a token whose top-k expert scores are within bf16 noise
# changes experts and gets an O(1) error on that token (tiny, layer 1: 2 of 49 tokens flip, per-
# token errors 0.59 and 0.36, the hidden state's rel error jumps to 8e-2). Rel error over S tokens
# then grows like sqrt(flips / S): 0.2 allows about 4% of tokens to flip per layer; a real bug
# (wrong RoPE, norm or scale in bf16) hits every token and gives ≥ 0.5. Block choices flip the
# same way where two block maxima are within noise: ≥ 0.9 of rows agree (tiny: ≥ 0.98).
# End to end: KL ≤ 1e-2 nats (tiny: 3.9e-3); top-1 ≥ 0.9 and top-5 overlap ≥ 0.9 — argmaxes flip
# where the reference's own top-2 margin is inside the noise; random-weight checkpoints have flat
# distributions and small margins (tiny: top-1 0.93, top-5 0.93 at KL 4e-3), trained models have
# larger ones. Greedy text is reported, not gated: one flipped near-tie changes all that follows.
BF16 = Tolerance(rel=0.2, block_agreement=0.9, top1=0.9, top5=0.9, kl=1e-2,
                 why="bf16 vs fp32: 8-bit mantissa round-off plus MoE routing flips")

# FP8 E4M3 keeps 3 mantissa bits: a relative step of 2^-3, RMS rounding error ≈ 2^-3/√12 ≈ 3.6%
# per quantized operand, so ≈5% per matmul with weights (per output channel) and activations
# (per tensor) both quantized, more on outlier-heavy tensors, plus routing and block-choice flips
# as in bf16 but far more often. The per-component rel bound is therefore a catastrophe detector,
# not the verdict: 0.5 (half the signal); a wrong or missing scale, a saturated tensor or a
# missing dequantization gives ≥ 1. The deployment bar is end to end: top-1 agreement ≥ 0.95
# with the reference (m3_trt.tolerances.FP8_TOP1_AGREEMENT) and KL ≤ 0.1 nats (for small
# differences KL ≈ ½·Var(Δlogit): 0.1 is an RMS logit shift of ~0.45). Top-5 overlap and block
# choices are reported, not gated (the indexer's top-k flips under 5% noise by design).
FP8 = Tolerance(rel=0.5, block_agreement=None, top1=FP8_TOP1_AGREEMENT, top5=None, kl=0.1,
                why="FP8 E4M3 weights (per channel) and activations (per tensor) vs fp32")

# A live Triton endpoint only returns text: greedy continuations must equal the reference's
# (the server runs the same fp32 reference, so anything else is a serving bug).
TEXT_ONLY_FP32 = Tolerance(rel=None, greedy_exact=True, why="end-to-end text only; same fp32 model behind the server")

TABLE: dict[tuple[str, str], Tolerance] = {
    ("torch", "fp32"): EXACT_FP32,          # other kernels (torch / triton) against the reference
    ("transformers", "fp32"): EXACT_FP32,
    ("onnxruntime", "fp32"): EXACT_FP32,
    ("sharded", "fp32"): EXACT_FP32,
    ("torch", "bf16"): BF16,
    ("transformers", "bf16"): BF16,
    ("onnxruntime", "bf16"): BF16,
    ("sharded", "bf16"): BF16,
    ("torch", "fp8-emulated"): FP8,
    ("triton", "fp32"): TEXT_ONLY_FP32,
}


def tolerance_for(backend: str, dtype: str) -> Tolerance:
    try:
        return TABLE[(backend, dtype)]
    except KeyError:
        known = ", ".join(f"{b}/{d}" for b, d in TABLE)
        raise ValueError(f"no tolerance table for backend {backend!r} in {dtype!r}; known: {known}") from None


# Few-layer validation (``compare --first-layers N``, m3_trt/compare/few_layers.py): NVIDIA Edge-LLM's
# gate for an export's first N layers against a PyTorch golden on prefill + greedy decode — fail
# below cosine 0.99 or above a 0.25 norm-ratio error. It is a coarse, dtype-independent catastrophe
# gate for a check run right after a full-size build (the per-dtype tables above are the fine
# verdict): fp32 and bf16 backends sit far inside it (tiny: cos > 0.9999, rel < 2e-2), a wrong
# weight, scale or layout moves one layer's output to cos < 0.9. We gate the relative error
# ||out - ref|| / ||ref|| at 0.25, which also bounds the norm-ratio error |‖out‖/‖ref‖ - 1|.
FEW_LAYER_COS_MIN = 0.99
FEW_LAYER_REL_MAX = 0.25
