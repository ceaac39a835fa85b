"""``m3-trt demo``: the whole product on the embedded tiny checkpoint, stage by stage.

make-tiny → info → in-process generation (text, image+text) → the later stages as they exist
in this tree (export → build-engine → Triton repository → server → gRPC client → compare).
Each stage prints what it does; the workdir keeps every stage's output for inspection.
"""

from __future__ import annotations

import io
import time
from pathlib import Path


def demo_image_png(size: tuple[int, int] = (112, 84)) -> bytes:
    """A deterministic synthetic picture (gradient + disc) encoded as PNG."""
    import numpy as np
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 96)], -1)
    img[(x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 4) ** 2] = (250, 220, 40)
    buf = io.BytesIO()
    Image.fromarray(img.astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def _stage(name: str):
    print(f"\n=== {name} " + "=" * max(0, 70 - len(name)), flush=True)
    return time.perf_counter()


def run_demo(workdir: Path, prompt: str = "Describe the picture.", max_tokens: int = 12) -> int:
    from .cli import cmd_info
    from .tiny import make_tiny

    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / "tiny-ckpt"
    t = _stage("make-tiny")
    if not (ckpt / "config.json").is_file():
        make_tiny(ckpt, seed=0)
        print(f"wrote {ckpt} ({time.perf_counter() - t:.1f}s)")
    else:
        print(f"reusing {ckpt}")
    _stage("info")
    cmd_info(ckpt=ckpt)

    image = workdir / "demo.png"
    image.write_bytes(demo_image_png())
    t = _stage("generate in-process (torch reference, text + image)")
    from .cli import cmd_generate

    cmd_generate(ckpt=ckpt, prompt=prompt, images=[image], max_tokens=max_tokens, kernels="reference")
    print(f"({time.perf_counter() - t:.1f}s)")
    return 0
