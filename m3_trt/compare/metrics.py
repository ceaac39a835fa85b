"""Error metrics of ``m3-trt compare`` (all computed in float64 on CPU).

Legend: P positions (tokens), V vocabulary, K top-k width; ``*_PV`` logits for one prompt.

* tensors: relative error ``||out - ref|| / ||ref||`` (the verdict), max-abs error, cosine similarity;
* indexer block choices (int32 ``[B, G, S, K]``, ``-1`` padded): fraction of rows whose selected
  *sets* are identical (order is free: ours are ascending, transformers' are in score order);
* logits: KL(ref || out) mean over positions, top-k agreement = mean over positions of
  ``|topk(ref) ∩ topk(out)| / k`` (for k = 1: the fraction of equal argmaxes);
* greedy: exact-match length and the first divergent position with both continuations.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _flat64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64).reshape(-1)


def check_shapes(out: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"{what or 'tensor'}: backend shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = _flat64(out), _flat64(ref)
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((_flat64(out) - _flat64(ref)).abs().max()) if ref.numel() else 0.0


def cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = _flat64(out), _flat64(ref)
    return float(o @ r / (o.norm() * r.norm()).clamp_min(1e-30))


def tensor_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"rel": rel_err(out, ref), "max_abs": max_abs(out, ref), "cos": cosine(out, ref)}


def block_agreement(out_idx: torch.Tensor, ref_idx: torch.Tensor) -> float:
    """Fraction of rows (all leading dims) whose selected block sets are identical."""
    check_shapes(out_idx, ref_idx, "block indices")
    K = ref_idx.shape[-1]
    o = out_idx.reshape(-1, K).long().sort(-1).values
    r = ref_idx.reshape(-1, K).long().sort(-1).values
    return float((o == r).all(-1).double().mean()) if r.shape[0] else 1.0


def kl_mean(ref_PV: torch.Tensor, out_PV: torch.Tensor) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(out)) in nats."""
    check_shapes(out_PV, ref_PV, "logits")
    r = torch.log_softmax(ref_PV.detach().double().reshape(-1, ref_PV.shape[-1]), -1)
    o = torch.log_softmax(out_PV.detach().double().reshape(-1, out_PV.shape[-1]), -1)
    return float((r.exp() * (r - o)).sum(-1).mean())


def topk_agreement(ref_PV: torch.Tensor, out_PV: torch.Tensor, k: int) -> float:
    """Mean over positions of ``|topk(ref) ∩ topk(out)| / k``."""
    check_shapes(out_PV, ref_PV, "logits")
    V = ref_PV.shape[-1]
    k = min(k, V)
    r = ref_PV.detach().reshape(-1, V).topk(k, -1).indices
    o = out_PV.detach().reshape(-1, V).topk(k, -1).indices
    hits = (r[:, :, None] == o[:, None, :]).any(-1).double().sum(-1)
    return float((hits / k).mean())


def logits_metrics(ref_PV: torch.Tensor, out_PV: torch.Tensor) -> dict[str, float]:
    return {"kl": kl_mean(ref_PV, out_PV), "top1": topk_agreement(ref_PV, out_PV, 1),
            "top5": topk_agreement(ref_PV, out_PV, 5), "positions": int(ref_PV.reshape(-1, ref_PV.shape[-1]).shape[0])}


def greedy_match(ref: Sequence, out: Sequence, decode=None, context: int = 0) -> dict:
    """Compare two greedy continuations (token ids, or characters for text-only backends).

    ``exact_match`` is the length of the common prefix; ``first_divergence`` is that index, or
    ``None`` when both are identical. ``ref_continuation`` / ``out_continuation`` are the parts
    from the divergence on (decoded with ``decode`` when given, else the ids themselves).
    """
    n = 0
    for a, b in zip(ref, out):
        if a != b:
            break
        n += 1
    identical = n == len(ref) == len(out)
    start = max(0, n - context)
    show = (lambda s: decode(list(s))) if decode is not None else (lambda s: list(s) if not isinstance(s, str) else s)
    return {
        "ref_len": len(ref), "out_len": len(out), "exact_match": n,
        "first_divergence": None if identical else n,
        "ref_continuation": show(ref[start:]), "out_continuation": show(out[start:]),
    }
