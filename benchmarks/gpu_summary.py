"""Goals and the one-screen summary of a GPU check (``kernels-<gpu>.json`` + ``layer-<gpu>.json``
-> ``summary.txt``). The goals of issue 14 are reported as met / not met / not measured, never
asserted; a dry run or a CPU run measures nothing they speak of.
"""

from __future__ import annotations

import json
from pathlib import Path

from gpu_common import SEED_DECODE_TOK_S

GOALS = (
    ("prefill_vs_masked_2k", "block-sparse prefill >= 1.5x masked SDPA at 2K", 1.5),
    ("prefill_vs_masked_16k", "block-sparse prefill >= 4x masked SDPA at 16K", 4.0),
    ("prefill_vs_flash_8k", "indexer + sparse prefill >= 1x unmasked flash at 8K", 1.0),
    ("prefill_vs_flash_32k", "indexer + sparse prefill >= 2x unmasked flash at 32K", 2.0),
    ("decode_vs_flash_64k", "indexer + sparse decode at 64K >= 3x flash decode", 3.0),
    ("moe_decode_floor", "MoE decode (1 and 16 tokens) within 1.5x the HBM floor", 1.5),
)


def evaluate_goals(k: dict) -> list[dict]:
    """Each goal of issue 14 as met / not met / not measured, with the figure it was judged on."""
    def get(section, key, field_):
        row = k.get(section, {}).get(key, {})
        return row.get(field_) if isinstance(row, dict) else None

    figures = {
        "prefill_vs_masked_2k": get("prefill", "L2048", "speedup_vs_masked"),
        "prefill_vs_masked_16k": get("prefill", "L16384", "speedup_vs_masked"),
        "prefill_vs_flash_8k": get("prefill", "L8192", "speedup_vs_flash"),
        "prefill_vs_flash_32k": get("prefill", "L32768", "speedup_vs_flash"),
        "decode_vs_flash_64k": get("decode", "L65536", "speedup_vs_flash"),
    }
    floors = [get("moe", f"T{t}", "over_floor") for t in (1, 16)]
    out = []
    for key, text, target in GOALS:
        if key == "moe_decode_floor":
            fig = None if any(f is None for f in floors) else max(floors)
            met = None if fig is None else fig <= target
        else:
            fig = figures[key]
            met = None if fig is None else fig >= target
        if k.get("environment", {}).get("profile") != "gpu":
            met = None  # a dry run or a CPU run measures nothing the goals speak of
        out.append(dict(goal=text, target=target, measured=fig, met=met))
    return out


def _fmt(x, scale=1.0, unit="", digits=2):
    return "-" if x is None else f"{x * scale:.{digits}f}{unit}"


def summary_text(k: dict, layer: dict | None) -> str:
    env = k.get("environment", {})
    lines = [f"m3-trt GPU check ({env.get('profile', '?')}): {env.get('gpu') or 'no GPU'} | driver {env.get('driver', '-')}"
             f" | torch {env.get('torch')} | triton {env.get('triton')} | copy {env.get('copy_bandwidth_GBps')} GB/s"]
    if env.get("note"):
        lines.append(f"  {env['note']}")
    checks = k.get("correctness", {})
    passed = [n for n, r in checks.items() if isinstance(r, dict) and r.get("passed")]
    failed = [n for n in checks if n not in passed]
    lines.append(f"correctness: {len(passed)}/{len(checks)} passed" + (f"; NOT passed: {', '.join(failed)}" if failed else ""))
    lines.append("prefill   L  sparse ms  indexer ms  masked x  flash x")
    for r in k.get("prefill", {}).values():
        if isinstance(r, dict) and "L" in r:
            lines.append(f"  {r['L']:>8}  {_fmt(r['sparse_s'], 1e3):>9}  {_fmt(r['indexer_s'], 1e3):>10}  "
                         f"{_fmt(r.get('speedup_vs_masked')):>8}  {_fmt(r['speedup_vs_flash']):>7}")
    lines.append("decode    L  sparse us  indexer us  flash us  flash x")
    for r in k.get("decode", {}).values():
        if isinstance(r, dict) and "L" in r:
            lines.append(f"  {r['L']:>8}  {_fmt(r['sparse_s'], 1e6, digits=1):>9}  {_fmt(r['indexer_s'], 1e6, digits=1):>10}  "
                         f"{_fmt(r['flash_decode_s'], 1e6, digits=1):>8}  {_fmt(r['speedup_vs_flash']):>7}")
    lines.append("moe  tokens  triton ms  reference ms  experts  x HBM floor")
    for r in k.get("moe", {}).values():
        if isinstance(r, dict) and "tokens" in r:
            lines.append(f"  {r['tokens']:>10}  {_fmt(r['fast_s'], 1e3, digits=3):>9}  {_fmt(r['reference_s'], 1e3, digits=3):>12}"
                         f"  {r['experts_used']:>7}  {_fmt(r['over_floor']):>11}")
    errors = problems(k, "kernels")
    if layer:
        errors += problems(layer, "layer")
        lines += layer_summary_lines(layer)
    lines.append("goals (issue 14; reported, never asserted):")
    for g in evaluate_goals(k):
        verdict = {True: "MET", False: "NOT MET", None: "not measured"}[g["met"]]
        lines.append(f"  [{verdict:>12}] {g['goal']}: {_fmt(g['measured'])}")
    if errors:
        lines.append(f"steps with an error or skipped: {', '.join(errors)}")
    ok = bool(checks) and not failed and not errors
    lines.append("verdict: " + ("ok (every step ran, every check passed)" if ok else "problems (see above)"))
    return "\n".join(lines) + "\n"


def problems(record: dict, prefix: str) -> list[str]:
    """``prefix/section/step`` of every step (two levels deep) that errored or was skipped."""
    def bad(r):
        return isinstance(r, dict) and ("error" in r or "skipped" in r)

    found = []
    for sec, box in record.items():
        if bad(box):
            found.append(f"{prefix}/{sec}")
        elif isinstance(box, dict):
            found += [f"{prefix}/{sec}/{n}" for n, r in box.items() if bad(r)]
    return found


def layer_summary_lines(layer: dict) -> list[str]:
    out = ["layer (sparse attention + MoE, bf16 random weights; triton vs reference path):"]
    pre = layer.get("prefill", {})
    if isinstance(pre, dict) and "triton_s" in pre:
        out.append(f"  prefill {pre['tokens']}: triton {_fmt(pre['triton_s'], 1e3)} ms, reference {_fmt(pre.get('reference_s'), 1e3)} ms,"
                   f" output rel err {_fmt(pre.get('rel_err_vs_reference'), digits=4)}")
    for name, r in layer.get("decode", {}).items():
        if isinstance(r, dict) and "triton_s" in r:
            out.append(f"  decode ctx {r['context']}: triton {_fmt(r['triton_s'], 1e3, digits=3)} ms, reference "
                       f"{_fmt(r.get('reference_s'), 1e3, digits=3)} ms, floor {_fmt(r['floor_s'], 1e3, digits=3)} ms")
    proj = layer.get("projection", {})
    if isinstance(proj, dict) and "per_token_60_layers_s" in proj:
        out.append(f"  60 layers at ctx {proj['context']}: {_fmt(proj['per_token_60_layers_s'], 1e3)} ms/token on this GPU's "
                   f"speed ({proj['layers_fit_per_gpu']} layers fit in its memory: {_fmt(proj['per_gpu_share_s'], 1e3)} ms/token)")
        out.append(f"  8xB200 paper projection: {_fmt(proj['b200x8_tok_s'], digits=0)} tok/s vs the seed's "
                   f"~{SEED_DECODE_TOK_S:.0f} tok/s (assumptions in layer JSON)")
    return out


def write_summary(out: Path, slug: str | None) -> str:
    """``summary.txt`` from ``kernels-<slug>.json`` and ``layer-<slug>.json`` (slug: the GPU's, or
    the only kernels file in ``out``); printed too."""
    if slug is None:
        found = sorted(out.glob("kernels-*.json"))
        slug = found[-1].stem.split("-", 1)[1] if found else "missing"
    kpath, lpath = out / f"kernels-{slug}.json", out / f"layer-{slug}.json"
    kernels = json.loads(kpath.read_text()) if kpath.is_file() else {"environment": {"note": f"{kpath.name} missing"}}
    layer = json.loads(lpath.read_text()) if lpath.is_file() else {"layer": {"error": f"{lpath.name} missing"}}
    text = summary_text(kernels, layer)
    (out / "summary.txt").write_text(text)
    print("\n" + text, end="", flush=True)
    return text


