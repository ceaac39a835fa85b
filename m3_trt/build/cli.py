"""``m3-trt build-engine``: plan, quantize, shard and export a checkpoint for a named target."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from m3_trt.build.builder import build, checkpoint_scale_block
from m3_trt.build.plan import host_memory, make_plan
from m3_trt.build.targets import describe, list_targets, load_target, parse_sets
from m3_trt.model.config import M3Config
from m3_trt.options import add_command, opt
from m3_trt.outputs import BUILD, check_output


@dataclass(frozen=True, kw_only=True)
class BuildEngineOptions:
    ckpt: Path | None = field(default=None, metadata=opt(nargs="?"))
    target: str = field(default="cpu", metadata=opt("--target"))
    out: Path | None = field(default=None, metadata=opt("--out"))
    dry_run: bool = field(default=False, metadata=opt("--dry-run", help="print the plan and stop"))
    resume: bool = field(default=False, metadata=opt(
        "--resume", help="keep finished, hash-verified pieces of an interrupted build (down to single decoder "
                         "layers); starts over when the checkpoint, target, overrides or calib file changed"))
    calib: Path | None = field(default=None, metadata=opt(
        "--calib", help="calibration prompts (jsonl: {\"text\": ..., \"image\": path?})"))
    list_targets: bool = field(default=False, metadata=opt("--list-targets"))
    sets: list[str] = field(default_factory=list, metadata=opt("--set", metavar="KEY=VALUE"))
    overwrite: bool = field(default=False, metadata=opt(
        "--overwrite", help="replace an existing --out that is not a previous build (never the checkpoint)"))
    workers: int = field(default=1, metadata=opt(
        "--workers", help="convert N checkpoint pieces at once in N processes (the plan states the host memory "
                          "they need; refused when it does not fit)"))
    no_progress: bool = field(default=False, metadata=opt("--no-progress"))


def cmd_build_engine(o: BuildEngineOptions) -> int:
    if o.list_targets:
        for p in list_targets():
            t = load_target(p)
            print(f"{t.name:14s} {t.description}  [{t.world} rank(s), weights {t.weight_dtype}, kv "
                  f"{t.kv_cache_dtype}, backend {t.backend}]  ({p})")
        return 0
    if o.ckpt is None or o.out is None and not o.dry_run:
        raise ValueError("build-engine needs CKPT and --out DIR (or --list-targets)")
    if o.out is not None:  # refuse a bad --out before any work (build() checks again)
        check_output(o.out, stage=BUILD, inputs=[o.ckpt, o.calib], overwrite=o.overwrite)
    tgt = load_target(o.target, parse_sets(o.sets))
    print(f"build-engine: ckpt={o.ckpt} target={tgt.name} out={o.out} dry_run={o.dry_run} resume={o.resume} "
          f"calib={o.calib}")
    print(describe(tgt))
    cfg = M3Config.from_pretrained(o.ckpt)
    plan = make_plan(cfg, tgt, scale_block=checkpoint_scale_block(o.ckpt))
    print(plan.text())
    host = host_memory(cfg, o.workers)
    print(f"  {host['text']}: {'fits' if host['fits'] else 'DOES NOT FIT this host'}")
    if not host["fits"] and o.workers > 1:  # one worker is the least a build can use: it is tried
        raise ValueError(f"--workers {o.workers} does not fit this host: {host['text']}")
    if o.dry_run:
        return 0
    if not plan.fits:
        raise ValueError(f"the plan does not fit target {tgt.name}: {plan.too_large}")
    build(o.ckpt, tgt, o.out, resume=o.resume, progress=not o.no_progress, calib=o.calib, plan=plan,
          overwrite=o.overwrite, workers=o.workers)
    print(f"wrote {o.out}")
    return 0


def register(sub) -> None:
    """Add ``build-engine`` to the ``m3-trt`` command line."""
    add_command(sub, "build-engine", BuildEngineOptions, cmd_build_engine,
                help="plan, quantize, shard and export a checkpoint for a target",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Targets live in engines/<name>.toml (or pass a path). Any field can be "
                            "overridden with --set key=value (e.g. --set tp=4 --set kv_cache_dtype=fp8).")
