"""Built-in sample inputs: a deterministic picture for the demo, the compare prompt set and benchmarks."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def demo_image_png(size: tuple[int, int] = (112, 84)) -> bytes:
    """A deterministic synthetic picture (gradient + disc) encoded as PNG."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 96)], -1)
    img[(x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 4) ** 2] = (250, 220, 40)
    buf = io.BytesIO()
    Image.fromarray(img.astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()
