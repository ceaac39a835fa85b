"""The prompts ``m3-trt compare`` runs: a fixed built-in set, or a JSONL file, through the checkpoint's
processor and chat template (one user turn: images first, then the text — as the server does).

Built-in set: two text-only prompts, one with the demo picture (112×84), one with two pictures of
different sizes (the demo picture and a 140×56 one), so the vision tower sees more than one grid.

Token-id prompts: a JSONL record may give ``{"input_ids": [int, ...]}`` instead of text; it is
used as is (no template). A checkpoint without ``tokenizer.json`` can only be compared on such
prompts; without a prompts file the built-in set is then :func:`builtin_token_prompts` (seeded
random ids, text only), and the command says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from m3_trt.processing import M3Processor

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
    from m3_trt.processing.samples import demo_image_png

    a, b = demo_image_png(), demo_image_png((140, 56))
    return [
        {"name": "text-short", "prompt": "What is block-sparse attention?", "images": []},
        {"name": "text-long", "prompt": "Write three sentences about compilers, GPUs and the weather in "
                                        "spring; then list five colours and count to ten.", "images": []},
        {"name": "image-1", "prompt": "Describe the picture.", "images": [("demo-112x84.png", a)]},
        {"name": "images-2-sizes", "prompt": "Compare the two pictures.",
         "images": [("demo-112x84.png", a), ("demo-140x56.png", b)]},
    ]


TOKEN_PROMPT_LENGTHS = (32, 96)  # a short prompt and one spanning several indexer blocks
TOKEN_PROMPT_SEED = 0


def builtin_token_prompts(vocab_size: int, avoid: tuple[int, ...] = ()) -> list[dict]:
    """Seeded random token ids below ``vocab_size``, none of ``avoid`` (image/video placeholders)."""
    g = torch.Generator().manual_seed(TOKEN_PROMPT_SEED)
    allowed = torch.tensor(sorted(set(range(vocab_size)) - set(avoid)), dtype=torch.long)
    out = []
    for n in TOKEN_PROMPT_LENGTHS:
        ids = allowed[torch.randint(0, len(allowed), (n,), generator=g)].tolist()
        out.append({"name": f"token-ids-{n}", "prompt": f"<{n} random token ids, seed {TOKEN_PROMPT_SEED}>",
                    "input_ids": ids, "images": []})
    return out


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
        if isinstance(rec, dict) and "input_ids" in rec:
            ids = rec["input_ids"]
            if (not isinstance(ids, list) or not ids
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
                raise ValueError(f"{prompts_file}:{n}: 'input_ids' must be a non-empty list of token ids "
                                 f"(integers >= 0)")
            if rec.get("images"):
                raise ValueError(f"{prompts_file}:{n}: token-id prompts are text only (no 'images')")
            out.append({"name": rec.get("name") or f"line{n}", "prompt": f"<{len(ids)} token ids>",
                        "input_ids": ids, "images": []})
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise ValueError(f'{prompts_file}:{n}: expected {{"prompt": str, "images": [paths]}} or '
                             f'{{"input_ids": [int, ...]}}')
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


def prompt_samples(ckpt: Path, cfg, prompts: Path | None = None, images: Path | None = None,
                   progress=print) -> tuple[list[Sample], M3Processor | None]:
    """``(samples, processor)`` for ``ckpt``: through its tokenizer, or — without ``tokenizer.json`` —
    token-id prompts (``--prompts`` records of ``input_ids``, else :func:`builtin_token_prompts`),
    announced through ``progress``; the processor is then None."""
    ckpt = Path(ckpt)
    if (ckpt / "tokenizer.json").is_file():
        proc = M3Processor.from_pretrained(ckpt)
        return prepare(load_prompts(prompts, images), proc, cfg.text.vocab_size), proc
    if images is not None:
        raise ValueError(f"--images: {ckpt} has no tokenizer.json, so image prompts cannot be built; "
                         f"compare on token ids (text only) instead")
    records = (load_prompts(prompts) if prompts is not None
               else builtin_token_prompts(cfg.text.vocab_size, (cfg.image_token_id, cfg.video_token_id)))
    progress(f"no tokenizer.json in {ckpt}: comparing on token-id prompts "
             f"({'from ' + str(prompts) if prompts else 'built-in: seeded random ids, text only'}); "
             f"greedy outputs are reported as token ids")
    return prepare(records, None, cfg.text.vocab_size), None


def prepare(records: list[dict], processor, vocab_size: int | None = None) -> list[Sample]:
    """Chat template + tokens + pixels for each record; token-id records as they are.

    ``processor`` is None for a checkpoint without a tokenizer: then every record must be token ids.
    """
    samples = []
    for rec in records:
        if "input_ids" in rec:
            bad = [i for i in rec["input_ids"] if vocab_size is not None and i >= vocab_size]
            if bad:
                raise ValueError(f"prompt {rec['name']}: token id {bad[0]} is outside the vocabulary "
                                 f"(vocab_size={vocab_size})")
            samples.append(Sample(name=rec["name"], prompt=rec["prompt"],
                                  input_ids=torch.tensor([rec["input_ids"]], dtype=torch.long)))
            continue
        if processor is None:
            raise ValueError(f"prompt {rec['name']}: the checkpoint has no tokenizer.json, so text prompts cannot "
                             f'be tokenized; give token ids instead: a --prompts JSONL of {{"input_ids": [...]}}')
        pics = [processor.decode_image(data) for _, data in rec["images"]]
        enc = processor.encode_chat(rec["prompt"], pics)
        samples.append(Sample(name=rec["name"], prompt=rec["prompt"], images=[d for _, d in rec["images"]],
                              image_names=[n for n, _ in rec["images"]], input_ids=enc["input_ids"],
                              pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw")))
    return samples
