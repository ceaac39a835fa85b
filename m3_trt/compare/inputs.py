"""The prompts ``m3-trt compare`` runs: a fixed built-in set, or a JSONL file, through the checkpoint's
processor and chat template (one user turn: images first, then the text — as the server does).

Built-in set: two text-only prompts, one with the demo picture (112×84), one with two pictures of
different sizes (the demo picture and a 140×56 one), so the vision tower sees more than one grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


@dataclass
class Sample:
    """One prepared prompt: ``input_ids [1, S]`` (+ ``pixel_values [N, P]``, ``image_grid_thw [n, 3]``)."""

    name: str
    prompt: str
    images: list[bytes] = field(default_factory=list)
    image_names: list[str] = field(default_factory=list)
    input_ids: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    @property
    def vision(self) -> dict:
        return {} if self.pixel_values is None else {"pixel_values": self.pixel_values,
                                                     "image_grid_thw": self.image_grid_thw}


def builtin_prompts() -> list[dict]:
    from m3_trt.demo import demo_image_png

    a, b = demo_image_png(), demo_image_png((140, 56))
    return [
        {"name": "text-short", "prompt": "What is block-sparse attention?", "images": []},
        {"name": "text-long", "prompt": "Write three sentences about compilers, GPUs and the weather in "
                                        "spring; then list five colours and count to ten.", "images": []},
        {"name": "image-1", "prompt": "Describe the picture.", "images": [("demo-112x84.png", a)]},
        {"name": "images-2-sizes", "prompt": "Compare the two pictures.",
         "images": [("demo-112x84.png", a), ("demo-140x56.png", b)]},
    ]


def load_prompts(prompts_file: Path | None = None, images_dir: Path | None = None) -> list[dict]:
    """``{"name", "prompt", "images": [(name, bytes)]}`` records.

    With ``prompts_file`` (JSONL of ``{"prompt": str, "images": [paths]}``), image paths are
    relative to ``images_dir`` (default: the file's folder). With only ``images_dir``, the built-in
    text prompts plus one "Describe the picture." prompt per image file in it.
    """
    if prompts_file is None:
        if images_dir is None:
            return builtin_prompts()
        files = sorted(p for p in Path(images_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"--images {images_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        text = [p for p in builtin_prompts() if not p["images"]]
        return text + [{"name": f"image-{p.stem}", "prompt": "Describe the picture.",
                        "images": [(p.name, p.read_bytes())]} for p in files]
    prompts_file = Path(prompts_file)
    base = Path(images_dir) if images_dir is not None else prompts_file.parent
    out = []
    for n, line in enumerate(prompts_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{prompts_file}:{n}: not JSON: {e}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise ValueError(f'{prompts_file}:{n}: expected {{"prompt": str, "images": [paths]}}')
        images = []
        for p in rec.get("images") or []:
            path = base / p
            if not path.is_file():
                raise FileNotFoundError(f"{prompts_file}:{n}: image {path} not found")
            images.append((Path(p).name, path.read_bytes()))
        out.append({"name": rec.get("name") or f"line{n}", "prompt": rec["prompt"], "images": images})
    if not out:
        raise ValueError(f"{prompts_file}: no prompts")
    return out


def prepare(records: list[dict], processor) -> list[Sample]:
    """Chat template + tokens + pixels for each record."""
    samples = []
    for rec in records:
        pics = [processor.decode_image(data) for _, data in rec["images"]]
        content = [{"type": "image"} for _ in pics] + [{"type": "text", "text": rec["prompt"]}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        enc = processor(text, images=pics or None)
        samples.append(Sample(name=rec["name"], prompt=rec["prompt"], images=[d for _, d in rec["images"]],
                              image_names=[n for n, _ in rec["images"]], input_ids=enc["input_ids"],
                              pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw")))
    return samples
