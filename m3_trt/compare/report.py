"""What a person reads: the terminal table, ``report.json`` and ``per_layer_error.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path

PLOT_SIZE_PX = (1200, 600)   # width, height of per_layer_error.png
PLOT_DPI = 100
PLOT_FLOOR = 1e-12           # lowest floor for exact (0.0) errors: a log axis has no zero


def _num(v, fmt: str = ".2e") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return format(v, fmt)


def format_table(rep: dict) -> str:
    tol = rep["tolerances"]
    lines = [f"m3-trt compare: backend {rep['backend']} ({rep['dtype']}) against {rep['against']} "
             f"on {len(rep['prompts'])} prompts, {rep['checkpoint']}",
             f"tolerances applied: ({rep['tolerance_key'][0]}, {rep['tolerance_key'][1]}) — {tol['why']}",
             "  " + ", ".join(f"{k}={v}" for k, v in tol.items() if k != "why" and v not in (None, {}, False))]
    if rep.get("mode") == "whole-model":
        lines.append("measured whole-model: both models loaded, every component recorded on one forward "
                     "(this backend / --against transformers cannot run layer by layer)")
    if rep.get("prompt_source", "").startswith("token ids"):
        lines.append(f"prompts: {rep['prompt_source']}; greedy outputs shown as token ids")
    if rep["components"]:
        streamed = any("isolated" in c for c in rep["components"])
        if streamed:
            lines += ["", "streamed, one layer of each side in memory: 'worst' = cumulative (the backend's own chain); "
                          "'isolated' = the component on the reference's input (names the wrong one); both gated"]
        iso_head = f" {'isolated':>10s}" if streamed else ""
        lines += ["", f"{'component':16s} {'metric':10s} {'worst':>10s}{iso_head} {'max-abs':>10s} {'cos-min':>10s} "
                      f"{'tolerance':>10s}  {'':4s} worst prompt"]
        for c in rep["components"]:
            mark = "ok" if c["ok"] else "FAIL"
            iso = (f" {_num(c['isolated']['worst'], '.2e' if c['metric'] == 'rel' else '.4f'):>10s}"
                   if "isolated" in c else f" {'':>10s}" if streamed else "")
            if c["metric"] == "rel":
                lines.append(f"{c['name']:16s} {'rel':10s} {_num(c['worst']):>10s}{iso} {_num(c['max_abs']):>10s} "
                             f"{_num(c['cos_min'], '.6f'):>10s} {_num(c['tolerance']):>10s}  {mark:4s} "
                             f"{c['worst_prompt']}")
            else:
                lines.append(f"{c['name']:16s} {'blocks=':10s} {_num(c['worst'], '.4f'):>10s}{iso} {'':>10s} {'':>10s} "
                             f"{_num(c['tolerance'], '.4f'):>10s}  {mark:4s} {c['worst_prompt']}")
    if rep.get("decode_isolated"):
        lines += ["", "decode steps (reported, not gated): isolated rel error per layer, max over steps and prompts",
                  "  " + ", ".join(f"{d['name']} {_num(d['isolated_rel_max'])}" for d in rep["decode_isolated"])]
    e = rep["end_to_end"]
    if e:
        def mark(m, op, fmt):
            if tol[m] is None:
                return "[not gated]"
            return f"[{'ok' if e[f'{m}_ok'] else 'FAIL'} {op} {_num(tol[m], fmt)}]"
        lines += ["", f"end to end over {e['positions']} prompt positions: logits rel (max) {_num(e['logits_rel_max'])}, "
                      f"KL {_num(e['kl'])} {mark('kl', '<=', '.2e')}, "
                      f"top-1 {e['top1']:.4f} {mark('top1', '>=', '.2f')}, "
                      f"top-5 {e['top5']:.4f} {mark('top5', '>=', '.2f')}"]
        lines += [f"  {x['prompt']:16s} logits rel {_num(x['rel'])}  KL {_num(x['kl'])}  top-1 {x['top1']:.4f}  "
                  f"top-5 {x['top5']:.4f}  ({x['positions']} positions)" for x in e["per_prompt"]]
    if rep["greedy"]:
        lines += ["", f"greedy {rep['tokens']} tokens (exact match / generated, first divergence):"]
        for g in rep["greedy"]:
            status = "identical" if g["first_divergence"] is None else f"diverges at {g['first_divergence']}"
            lines.append(f"  {g['prompt']:16s} {g['exact_match']:3d}/{g['ref_len']:<3d} {status:16s} "
                         f"{'ok' if g['ok'] else 'FAIL'}")
            if g["first_divergence"] is not None:
                ref_c = g.get("ref_continuation_text", g["ref_continuation"])
                out_c = g.get("out_continuation_text", g["out_continuation"])
                lines.append(f"    reference: {ref_c!r}")
                lines.append(f"    backend:   {out_c!r}")
    lines.append("")
    if rep["verdict"] == "pass":
        lines.append("verdict: PASS")
    else:
        f = rep["first_failure"]
        mode = f", {f['mode']}" if "mode" in f else ""
        lines.append(f"verdict: FAIL — first failing: {f['what']} ({f['metric']}{mode} {_num(f['value'])} vs "
                     f"{_num(f['tolerance']) if not isinstance(f['tolerance'], str) else f['tolerance']}, "
                     f"prompt {f['prompt']}); {len(rep['failures'])} failure(s)")
    return "\n".join(lines)


def write_json(rep: dict, path: Path) -> Path:
    path.write_text(json.dumps(rep, indent=1, default=str) + "\n")
    return path


def plot_per_layer(rep: dict, path: Path) -> Path:
    """Relative error per component (model order), one line per prompt, log y, tolerance as a step line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    comps = [c for c in rep["components"] if c["metric"] == "rel"]
    names = [c["name"] for c in comps]
    fig = Figure(figsize=(PLOT_SIZE_PX[0] / PLOT_DPI, PLOT_SIZE_PX[1] / PLOT_DPI), dpi=PLOT_DPI)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(names)))
    every = [v for c in comps
             for v in [*c["per_prompt"].values(), *c.get("isolated", {}).get("per_prompt", {}).values()]]
    positive = [v["rel"] for v in every if v["rel"] > 0]
    floor = max(PLOT_FLOOR, min(positive) / 10) if positive else PLOT_FLOOR  # exact zeros sit one decade below
    streamed = any("isolated" in c for c in comps)
    for p in rep["prompts"]:
        ys = [max(c["per_prompt"][p["name"]]["rel"], floor) if p["name"] in c["per_prompt"] else math.nan
              for c in comps]
        line, = ax.plot(x, ys, marker="o", ms=3, lw=1.2, label=p["name"] + (" (cumulative)" if streamed else ""))
        if streamed:  # the component alone, on the reference's input: same colour, dashed
            iso = [max(c["isolated"]["per_prompt"][p["name"]]["rel"], floor)
                   if "isolated" in c and p["name"] in c["isolated"]["per_prompt"] else math.nan for c in comps]
            ax.plot(x, iso, marker=".", ms=3, lw=1.0, ls=":", color=line.get_color(), label=p["name"] + " (isolated)")
    tols = [c["tolerance"] if c["tolerance"] is not None else math.nan for c in comps]
    ax.step(x, tols, where="mid", color="black", ls="--", lw=1.2,
            label=f"tolerance ({rep['tolerance_key'][0]}, {rep['tolerance_key'][1]})")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7 if len(names) > 40 else 9)
    ax.set_ylabel(f"relative error ||out - ref|| / ||ref||  (0 drawn at {floor:.0e})")
    ax.set_title(f"{rep['backend']} ({rep['dtype']}) vs {rep['against']}: per-component error — {rep['verdict'].upper()}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.subplots_adjust(bottom=0.25, top=0.92, left=0.08, right=0.98)
    fig.savefig(path, dpi=PLOT_DPI)
    return path


def write_outputs(rep: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": write_json(rep, out_dir / "report.json"), "table": out_dir / "report.txt"}
    files["table"].write_text(format_table(rep) + "\n")
    if any(c["metric"] == "rel" for c in rep["components"]):
        files["plot"] = plot_per_layer(rep, out_dir / "per_layer_error.png")
    return files
