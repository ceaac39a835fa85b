"""``m3-trt build-engine``: plan, quantize, shard and export a checkpoint for a named target."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_build_engine(*, ckpt: Path | None, target: str, out: Path | None, dry_run: bool, resume: bool,
                     calib: Path | None, list_targets: bool, sets: list[str], progress: bool = True,
                     overwrite: bool = False, workers: int = 1) -> int:
    from m3_trt.build.targets import describe, list_targets as _list, load_target, parse_sets

    if list_targets:
        for p in _list():
            t = load_target(p)
            print(f"{t.name:14s} {t.description}  [{t.world} rank(s), weights {t.weight_dtype}, kv "
                  f"{t.kv_cache_dtype}, backend {t.backend}]  ({p})")
        return 0
    if ckpt is None or out is None and not dry_run:
        raise ValueError("build-engine needs CKPT and --out DIR (or --list-targets)")
    from m3_trt.model.config import M3Config
    from m3_trt.outputs import BUILD, check_output
    from m3_trt.build.plan import make_plan

    if out is not None:  # refuse a bad --out before any work (build() checks again)
        check_output(out, stage=BUILD, inputs=[ckpt, calib], overwrite=overwrite)
    tgt = load_target(target, parse_sets(sets))
    print(f"build-engine: ckpt={ckpt} target={tgt.name} out={out} dry_run={dry_run} resume={resume} calib={calib}")
    print(describe(tgt))
    cfg = M3Config.from_pretrained(ckpt)
    from m3_trt.build.builder import checkpoint_scale_block

    plan = make_plan(cfg, tgt, scale_block=checkpoint_scale_block(ckpt))
    print(plan.text())
    from m3_trt.build.plan import host_memory

    host = host_memory(cfg, workers)
    print(f"  {host['text']}: {'fits' if host['fits'] else 'DOES NOT FIT this host'}")
    if not host["fits"] and workers > 1:  # one worker is the least a build can use: it is tried
        raise ValueError(f"--workers {workers} does not fit this host: {host['text']}")
    if dry_run:
        return 0
    if not plan.fits:
        raise ValueError(f"the plan does not fit target {tgt.name}: {plan.too_large}")
    from m3_trt.build.builder import build

    build(ckpt, tgt, out, resume=resume, progress=progress, calib=calib, plan=plan, overwrite=overwrite,
          workers=workers)
    print(f"wrote {out}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("build-engine", help="plan, quantize, shard and export a checkpoint for a target",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Targets live in engines/<name>.toml (or pass a path). Any field can be "
                                   "overridden with --set key=value (e.g. --set tp=4 --set kv_cache_dtype=fp8).")
    s.add_argument("ckpt", type=Path, nargs="?")
    s.add_argument("--target", default="cpu")
    s.add_argument("--out", type=Path)
    s.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    s.add_argument("--resume", action="store_true", help="keep finished, hash-verified pieces of an interrupted build (down to single decoder "
                        "layers); starts over when the checkpoint, target, overrides or calib file changed")
    s.add_argument("--calib", type=Path, help="calibration prompts (jsonl: {\"text\": ..., \"image\": path?})")
    s.add_argument("--list-targets", action="store_true")
    s.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that is not a previous build (never the checkpoint)")
    s.add_argument("--workers", type=int, default=1,
                   help="convert N checkpoint pieces at once in N processes (the plan states the host memory "
                        "they need; refused when it does not fit)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=lambda a: cmd_build_engine(ckpt=a.ckpt, target=a.target, out=a.out, dry_run=a.dry_run,
                                                 resume=a.resume, calib=a.calib, list_targets=a.list_targets,
                                                 sets=a.sets, progress=not a.no_progress, overwrite=a.overwrite,
                                                 workers=a.workers))
