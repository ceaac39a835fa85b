"""Sharded reference (gloo ranks on CPU) equals the unsharded reference: prefill + 8 decode steps.

One process group per world size runs every case of that size (spawn costs ~3 s per group).
Negative control: every rank loads rank 0's slice; the all-reduced logits must then differ.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tolerances import TOLERANCES  # noqa: E402

# (id, tp, ep, wrong_rank)
CASES = {
    2: [("W2-TP2-EP1-attnTP-moeTP2", 2, 1, False), ("W2-TP1-EP2", 1, 2, False), ("W2-TP2-EP2", 2, 2, False),
        ("W2-TP2-EP2-rank0-slices-everywhere", 2, 2, True)],
    4: [("W4-TP1-EP4", 1, 4, False), ("W4-TP4-EP4-kvrep2", 4, 4, False), ("W4-TP4-EP2-moeTP2", 4, 2, False),
        ("W4-TP4-EP4-rank0-slices-everywhere", 4, 4, True)],
}
_RESULTS: dict[int, dict] = {}


def results(world: int, ckpt: Path, tmp: Path) -> dict:
    if world not in _RESULTS:
        import sharded_worker

        from m3_trt.runtime.dist import spawn

        out = tmp / f"sharded-{world}.json"
        spawn(sharded_worker.run_cases, world, str(ckpt), CASES[world], str(out))
        _RESULTS[world] = json.loads(out.read_text())
    return _RESULTS[world]


@pytest.mark.parametrize("world,case", [(w, c) for w, cs in CASES.items() for c in cs],
                         ids=[c[0] for cs in CASES.values() for c in cs])
def test_sharded_logits_equal_reference(world, case, tiny_ckpt, tmp_path_factory):
    name, tp, ep, wrong = case
    r = results(world, tiny_ckpt, tmp_path_factory.mktemp(f"w{world}"))[name]
    tol = TOLERANCES[("sharded", "fp32")]
    errs = [r["prefill"]] + r["decode"]
    assert len(r["decode"]) == 8
    if wrong:
        assert min(errs) > 100 * tol, f"{name}: rank 0's slices on every rank were not caught: {errs}"
    else:
        assert max(errs) <= tol, f"{name}: prefill {r['prefill']:.2e}, decode {[f'{e:.1e}' for e in r['decode']]}"
        if name.endswith("kvrep2"):
            assert r["kv_heads_per_rank"] == 1
