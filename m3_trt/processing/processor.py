"""MiniMax-M3-VL processor: chat template, marker expansion, tokens, decoding, image bytes.

Specification: transformers 5.23 `MiniMaxM3VLProcessor` / `ProcessorMixin`; pixels come from
`m3_trt.processing.vision`. See the package docstring.
"""

from __future__ import annotations

import io
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from m3_trt.processing.vision import VisionPreprocessConfig, video_frame_size, preprocess_images, preprocess_videos, smart_resize

IMAGE_TOKEN = "]<]image[>["
VIDEO_TOKEN = "]<]video[>["
VISION_START_TOKEN = "]<]start of image[>["
VISION_END_TOKEN = "]<]end of image[>["
# Stands for user text in a rendered chat template (`__call__(plain_text=...)`): a private-use
# character pair around a name, which no template writes.
PLAIN_TEXT = "\ue000m3-plain-text\ue000"
# Guard for servers: images above this many pixels are refused before any decoding or resizing.
DEFAULT_MAX_INPUT_PIXELS = 64 * 1024 * 1024


class ImageDecodeError(ValueError):
    """Bytes that PIL cannot decode as an image."""


class ImageTooLargeError(ValueError):
    """An input image above the configured `max_input_pixels`."""


def _plain(value: Any) -> Any:
    # What a chat template may see: JSON-like data only (images in content parts become a marker),
    # the same protection transformers applies before rendering untrusted templates.
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


class IncrementalDecoder:
    """Feed token ids one at a time; `push` returns the newly completed text ('' while a UTF-8
    character is still split across tokens). Built on `tokenizers.decoders.DecodeStream`."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def push(self, token_id: int) -> str:
        return self._stream.step(self._tokenizer, int(token_id)) or ""


class M3Processor:
    """Tokenizer + chat template + image/video preprocessing for MiniMax-M3-VL (see module doc)."""

    def __init__(self, tokenizer, chat_template: str | None, image_cfg: VisionPreprocessConfig,
                 video_cfg: VisionPreprocessConfig, special_tokens: dict[str, str | None],
                 max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS):
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.chat_template = chat_template
        self.image_cfg, self.video_cfg = image_cfg, video_cfg
        self.special_tokens = special_tokens  # bos_token / eos_token / pad_token strings
        self.max_input_pixels = max_input_pixels
        self._template = None
        self._plain_tokenizer = None
        ids = {}
        for name, tok in (("image", IMAGE_TOKEN), ("video", VIDEO_TOKEN), ("vision_start", VISION_START_TOKEN),
                          ("vision_end", VISION_END_TOKEN)):
            ids[name] = tokenizer.token_to_id(tok)
            if ids[name] is None:
                raise ValueError(f"tokenizer has no {tok!r} token")
        for name in ("bos", "eos", "pad"):
            tok = special_tokens.get(f"{name}_token")
            ids[name] = None if tok is None else tokenizer.token_to_id(tok)
        self.token_ids: dict[str, int | None] = ids

    @classmethod
    def from_pretrained(cls, path: str | Path, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> "M3Processor":
        """Read tokenizer.json, tokenizer_config.json, chat_template.jinja, (video_)preprocessor_config.json."""
        from tokenizers import Tokenizer

        path = Path(path)
        read = lambda name: json.loads((path / name).read_text()) if (path / name).is_file() else {}  # noqa: E731
        tok_cfg = read("tokenizer_config.json")
        template = None
        if (path / "chat_template.jinja").is_file():  # transformers 5 prefers the .jinja file
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(tok_cfg.get("chat_template"), str):
            template = tok_cfg["chat_template"]
        elif isinstance(tok_cfg.get("chat_template"), list):
            template = {t["name"]: t["template"] for t in tok_cfg["chat_template"]}.get("default")

        def token_str(value):
            return value.get("content") if isinstance(value, dict) else value

        specials = {k: token_str(tok_cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        return cls(
            tokenizer=Tokenizer.from_file(str(path / "tokenizer.json")),
            chat_template=template,
            image_cfg=VisionPreprocessConfig.for_images(read("preprocessor_config.json")),
            video_cfg=VisionPreprocessConfig.for_videos(read("video_preprocessor_config.json")),
            special_tokens=specials,
            max_input_pixels=max_input_pixels,
        )

    # -- text ----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render with jinja2 in the sandbox settings transformers uses (trim_blocks, lstrip_blocks)."""
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template")
        if self._template is None:
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=_plain(messages), add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens, **_plain(kwargs))

    def chat_prompt(self, text: str, n_images: int = 0) -> str:
        """One user turn as the chat template renders it: ``n_images`` image parts (each becomes an
        ``]<]image[>[`` marker), then ``text``, then the generation prompt (the assistant's turn opens).

        The string as is; :meth:`encode_chat` is the only safe way to tokenize it with user text.
        """
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
        return self.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def encode_chat(self, text: str, images: Sequence[Any] = ()) -> dict:
        """The model inputs for one user turn (images first, then ``text``): ``__call__``'s dict.

        The template is rendered around ``PLAIN_TEXT``; its own markers (role, turn, image) become
        special tokens, while ``text`` is tokenized WITHOUT special tokens (:meth:`encode_plain`), so
        role or image markers typed into it stay plain text: a prompt cannot forge a system turn or
        an image slot. Benign text tokenizes as in the rendered string (tests/serving/test_pipeline.py).
        Every prompt of the product (generate, serving, OpenAI endpoint, compare, FP8 calibration)
        is built here.
        """
        images = list(images)
        return self(self.chat_prompt(PLAIN_TEXT, len(images)), images=images or None, plain_text=[text])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_plain(self, text: str) -> list[int]:
        """``text`` as ordinary text: special-token strings in it (role markers, image markers)
        are split into ordinary tokens, never matched as special tokens; nothing is added."""
        if self._plain_tokenizer is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(self.tokenizer.to_str())
            tok.encode_special_tokens = True
            self._plain_tokenizer = tok
        return self._plain_tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self.tokenizer, skip_special_tokens)

    # -- images --------------------------------------------------------------------------------

    def check_image_size(self, height: int, width: int) -> None:
        if height * width > self.max_input_pixels:
            raise ImageTooLargeError(
                f"image of {width}x{height} = {width * height} pixels exceeds the budget of "
                f"max_input_pixels={self.max_input_pixels}"
            )

    def decode_image(self, data: bytes) -> "Image.Image":  # noqa: F821
        """Decode encoded image bytes (PNG, JPEG, …) into a PIL image, EXIF orientation applied.

        The size is checked from the header before pixels are decoded (ImageTooLargeError).
        """
        from PIL import Image, ImageOps, UnidentifiedImageError

        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageDecodeError(f"image data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if not data:
            raise ImageDecodeError("image data is empty (0 bytes)")
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(f"image exceeds PIL's decompression-bomb limit: {e}") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageDecodeError(f"cannot decode {len(data)} bytes (starting {data[:8]!r}) as an image: {e}") from e
        self.check_image_size(image.height, image.width)
        try:
            image.load()
            return ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageDecodeError(f"image data is corrupt or truncated ({len(data)} bytes): {e}") from e

    def count_image_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens one image of this size becomes (excluding the start/end tokens)."""
        c = self.image_cfg
        h, w = smart_resize(height, width, c.factor, c.min_pixels, c.max_pixels)
        return (h // c.patch_size) * (w // c.patch_size) // (c.merge_size**2)

    def count_video_tokens(self, num_frames: int, height: int, width: int, resize: bool = False) -> int:
        """Placeholder tokens of one video (excluding start/end and timestamp tokens)."""
        c = self.video_cfg
        h, w = video_frame_size(height, width, c, resize and c.do_resize)
        t = -(-num_frames // c.temporal_patch_size)
        return t * (h // c.patch_size) * (w // c.patch_size) // (c.merge_size**2)

    # -- everything ----------------------------------------------------------------------------

    def _image_replacement(self, grid_thw: torch.Tensor) -> str:
        n = int(grid_thw.prod()) // self.image_cfg.merge_size**2
        return VISION_START_TOKEN + IMAGE_TOKEN * n + VISION_END_TOKEN

    def _video_replacement(self, grids: torch.Tensor, num_frames: int, fps: float | None) -> str:
        per_frame = int(grids[0, 1:].prod()) // self.video_cfg.merge_size**2
        out = []
        for step in range(int(grids[:, 0].sum())):
            if fps is not None:  # frame indices are 0..T-1 (no sampling), as transformers' default metadata
                out.append(f"]<]{min(step * self.video_cfg.temporal_patch_size, num_frames - 1) / fps:.1f} seconds[>[")
            out.append(VISION_START_TOKEN + VIDEO_TOKEN * per_frame + VISION_END_TOKEN)
        return "".join(out)

    def __call__(self, text: str, images: Sequence[Any] | None = None, videos: Sequence[Any] | None = None,
                 video_fps: float | Sequence[float | None] | None = None, resize_videos: bool = False,
                 plain_text: Sequence[str] = ()) -> dict:
        """Expand the vision markers in `text`, tokenize, and preprocess pixels.

        `plain_text`: one string per `PLAIN_TEXT` sentinel in `text` (user text put in a rendered
        chat template), tokenized with `encode_plain` — never scanned for markers or special tokens.

        Returns input_ids / attention_mask int64 [1, S]; with images pixel_values float32 [N, D] and
        image_grid_thw int64 [n_images, 3]; with videos pixel_values_videos and video_grid_thw
        (one row per chunk). `video_fps` (one value, or one per video) adds the timestamp markers.
        """
        images = list(images or [])
        if isinstance(videos, np.ndarray):
            videos = [videos]
        videos = list(videos or [])
        for kind, token, items in (("images", IMAGE_TOKEN, images), ("videos", VIDEO_TOKEN, videos)):
            if text.count(token) != len(items):
                raise ValueError(f"text has {text.count(token)} {token} markers but {len(items)} {kind} were passed")
        out: dict[str, Any] = {}
        image_parts: list[str] = []
        video_parts: list[str] = []
        if images:
            for image in images:
                h, w = (image.height, image.width) if hasattr(image, "height") else _hw_of_array(image)
                self.check_image_size(h, w)
            out.update(preprocess_images(images, self.image_cfg))
            image_parts = [self._image_replacement(g) for g in out["image_grid_thw"]]
        if videos:
            fps_list = list(video_fps) if isinstance(video_fps, (list, tuple)) else [video_fps] * len(videos)
            v = preprocess_videos(videos, self.video_cfg, resize=resize_videos)
            out["pixel_values_videos"], out["video_grid_thw"] = v["pixel_values_videos"], v["video_grid_thw"]
            start = 0
            for n_chunks, n_frames, fps in zip(v["num_chunks_per_video"], v["num_frames"], fps_list):
                video_parts.append(self._video_replacement(v["video_grid_thw"][start:start + n_chunks], n_frames, fps))
                start += n_chunks
        # Replace markers left to right, images and videos each in their own order (as the spec's regex).
        pieces, pos, next_image, next_video = [], 0, iter(image_parts), iter(video_parts)
        while True:
            i, j = text.find(IMAGE_TOKEN, pos), text.find(VIDEO_TOKEN, pos)
            if i < 0 and j < 0:
                break
            if j < 0 or 0 <= i < j:
                pieces += [text[pos:i], next(next_image)]
                pos = i + len(IMAGE_TOKEN)
            else:
                pieces += [text[pos:j], next(next_video)]
                pos = j + len(VIDEO_TOKEN)
        pieces.append(text[pos:])
        parts = "".join(pieces).split(PLAIN_TEXT)
        if len(parts) != len(plain_text) + 1:
            raise ValueError(f"text has {len(parts) - 1} plain-text slots but {len(plain_text)} plain texts were passed")
        ids = self.encode(parts[0])
        for plain, part in zip(plain_text, parts[1:]):
            ids += self.encode_plain(plain) + self.encode(part, add_special_tokens=False)
        out["input_ids"] = torch.tensor([ids], dtype=torch.long)
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        return out


def _hw_of_array(image: np.ndarray) -> tuple[int, int]:
    if image.ndim == 3 and image.shape[0] in (1, 3, 4):
        return int(image.shape[1]), int(image.shape[2])
    return int(image.shape[0]), int(image.shape[1])
