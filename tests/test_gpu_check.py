"""``scripts/gpu_check.sh --dry-run``: the GPU proof runs every step at tiny shapes on CPU (kernels
in Triton's interpreter), so a change that breaks a step fails here, not in the one GPU call.

One run of the script (module fixture, ~25 s of CPU); the tests read what it wrote: every step
ran without error, every correctness check has its numbers within the tolerance table's budget
and a negative control that was detected, the layer's two paths agree, and the summary reports
the goals without judging them (a dry run measures nothing they speak of).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tolerances import TOLERANCES

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the script sets it for a dry run itself
    return subprocess.run(["bash", str(SCRIPT), "--out", str(out), *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=out.parent)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "results"
    proc = _run(out, "--dry-run")
    return out, proc


def _load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def test_dry_run_exits_clean_and_says_what_it_would_measure(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "on a GPU this measures: prefill L=[2048" in proc.stdout
    assert "131072" in proc.stdout and "'E': 128" in proc.stdout
    names = {p.name for p in out.iterdir()}
    assert names == {"gpu_check.json", "gpu_check.log", "kernels-dryrun.json", "layer-dryrun.json", "summary.txt"}, names
    assert _load(out, "gpu_check.json")["format"].startswith("m3-trt-gpu-check/")


def _steps(record: dict):
    for section, box in record.items():
        if isinstance(box, dict):
            for name, row in box.items():
                if isinstance(row, dict):
                    yield f"{section}/{name}", row


def test_every_step_ran(dry_run):
    out, _ = dry_run
    for fname in ("kernels-dryrun.json", "layer-dryrun.json"):
        bad = {k: r.get("error") or r.get("skipped") for k, r in _steps(_load(out, fname))
               if "error" in r or "skipped" in r}
        assert not bad, f"{fname}: {bad}"
    k = _load(out, "kernels-dryrun.json")
    assert k["environment"]["profile"] == "dry-run" and k["environment"]["copy_bandwidth_GBps"] > 0
    assert set(k["prefill"]) == {"L24"} and set(k["decode"]) == {"L48"} and set(k["moe"]) >= {"T1", "weights"}
    for row in k["prefill"].values():
        assert {"sparse_s", "indexer_s", "sdpa_causal_s", "sdpa_masked_s", "speedup_vs_masked", "kept_of_causal"} <= set(row)
        assert 0 < row["kept_of_causal"] <= 1
    for row in k["moe"].values():
        if "tokens" in row:
            assert row["hbm_floor_s"] > 0 and row["experts_used"] >= 1


def test_correctness_within_tolerance_with_detected_negative_controls(dry_run):
    out, _ = dry_run
    checks = _load(out, "kernels-dryrun.json")["correctness"]
    expected = {f"{op}_{mode}_{dt}" for op in ("indexer", "attention") for mode in ("prefill", "decode")
                for dt in ("fp32", "bf16")} | {"attention_64bit_offsets_bf16"} | \
               {f"moe_T{t}_{dt}" for t in (1, 4) for dt in ("fp32", "bf16")}
    assert set(checks) == expected
    for name, r in checks.items():
        assert r["passed"] is True, (name, r)
        if name.startswith("indexer"):
            assert r["rows_differing_beyond_ties"] == 0 and r["negative_control_detected"], (name, r)
        elif name == "attention_64bit_offsets_bf16":
            assert all(e <= r["tolerance"] for e in r["rel_err_per_batch_row"]), r
        else:
            tol = TOLERANCES[("kernel", name.rsplit("_", 1)[1])]
            assert r["tolerance"] == tol and math.isfinite(r["rel_err"]) and r["rel_err"] <= tol, (name, r)
            assert r["negative_control_rel_err"] > 10 * tol, (name, r)


def test_layer_paths_agree_and_projection_is_filled(dry_run):
    out, _ = dry_run
    layer = _load(out, "layer-dryrun.json")
    tol = TOLERANCES[("kernel", "bf16")]
    rows = [layer["prefill"], *layer["decode"].values()]
    assert len(rows) == 3
    for r in rows:
        assert r["rel_err_vs_reference"] <= tol, r
        assert r["triton_s"] > 0 and r["reference_s"] > 0
    for r in layer["decode"].values():
        assert r["floor_s"] > 0 and r["cache_copy_bytes"] > 0
    proj = layer["projection"]
    assert proj["per_token_60_layers_s"] == pytest.approx(60 * proj["measured_layer_decode_s"])
    assert proj["b200x8_tok_s"] > 0 and proj["seed_tok_s"] == 31.0 and "hbm_TBps" in proj["assumptions"]


def test_summary_reports_goals_without_judging_a_dry_run(dry_run):
    out, _ = dry_run
    text = (out / "summary.txt").read_text()
    assert "correctness: 13/13 passed" in text
    assert text.count("[not measured]") == 6 and "MET]" not in text
    assert "verdict: ok" in text
    assert len(text.splitlines()) <= 40  # one screen


def test_refuses_a_folder_that_is_not_its_own(tmp_path):
    """The one output rule: a user's non-empty folder is never written into."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = _run(foreign, "--dry-run")
    assert proc.returncode != 0
    assert "is not a previous gpu-check output" in proc.stdout + proc.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_unknown_argument_is_named(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr
