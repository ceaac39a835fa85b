"""The serving pipeline as plain library code: what each Triton step's ``model.py`` calls.

Steps (one class or function each, no Triton types here, so they run and test in-process):

- :class:`Preprocessor` — prompt → chat template → image decoding (bytes) → M3-VL image
  processing → placeholder expansion → ``input_ids [S]``, ``pixel_values [N, D]``,
  ``image_grid_thw [n, 3]``; refuses bad requests with :class:`RequestError`.
- :class:`VisionEncoder` — a list of requests' (pixel_values, grid) → one batched vision tower +
  projector call (torch ``get_image_features``, or the exported ``vision_encoder`` + ``projector``
  graphs in ONNX Runtime) → per-request ``image_embeds [n_tokens, Dt]``.
- :class:`TokenGenerator` (torch, ``m3_trt.generate.generate``) and :class:`OnnxTokenGenerator`
  (the exported embedding / decoder-layer / head graphs in ONNX Runtime, a static KV cache per
  request) — ``input_ids`` + ``image_embeds`` + :class:`SamplingParams` → token ids; both sample
  with ``m3_trt.generate.sample_next``.
- :func:`load_steps` — the vision encoder and token generator a repository's ``parameters``
  name (``backend``, ``checkpoint``, ``export_dir``).
- :func:`text_delta` — stateless incremental detokenisation (the postprocessing step sees one
  response at a time, so it cannot keep a decoder's state).
- :func:`generate_in_process` — the four steps chained in one process: the reference the
  served answers are compared with, and the "without the server" side of the benchmark.

Legend: S prompt tokens, N patches, D = C·tp·p·p patch values, n images, Dt text hidden size.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

__all__ = [
    "RequestError", "SamplingParams", "Preprocessor", "VisionEncoder", "TokenGenerator", "OnnxTokenGenerator",
    "load_steps", "split_image_rows", "text_delta", "build_prompt", "generate_in_process",
]

REPLACEMENT = "\ufffd"  # what a UTF-8 character split across tokens decodes to, for now


class RequestError(ValueError):
    """A request the server refuses; the message names the problem and goes back to the client."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (TensorRT-LLM ensemble names in comments)."""

    max_tokens: int  # max_tokens
    temperature: float = 0.0  # temperature; 0 = greedy
    top_k: int = 0  # top_k; 0 = off
    top_p: float = 1.0  # top_p; 1 = off
    seed: int | None = None  # seed
    end_id: int | None = None  # end_id; None = the checkpoint's EOS ids

    def validate(self) -> "SamplingParams":
        if self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be > 0, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


def split_image_rows(rows_nL: np.ndarray) -> list[bytes]:
    """UINT8 ``[n, L]`` zero-padded rows → the encoded files (trailing zeros removed).

    Real PNG/JPEG/WebP/GIF files never end in a zero byte (CRC, ``FF D9``, RIFF length, ``;``),
    so stripping the padding cannot cut a file short.
    """
    rows = np.asarray(rows_nL)
    if rows.dtype != np.uint8:
        raise RequestError(f"image_bytes_input must be UINT8, got {rows.dtype}")
    if rows.ndim == 1:
        rows = rows[None]
    rows = rows.reshape(-1, rows.shape[-1]) if rows.size else rows.reshape(0, 0)
    return [r.tobytes().rstrip(b"\0") for r in rows]


def build_prompt(processor, prompt: str, n_images: int) -> str:
    """One user turn: the images first, then the text, through the checkpoint's chat template."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


class Preprocessor:
    """Prompt + encoded images → model inputs, within the configured limits."""

    def __init__(self, checkpoint: str | Path, *, max_input_len: int, max_input_pixels: int):
        from m3_trt.processing import M3Processor

        self.processor = M3Processor.from_pretrained(checkpoint, max_input_pixels=max_input_pixels)
        self.max_input_len = max_input_len

    def __call__(self, prompt: str, images: Sequence[bytes] = ()) -> dict[str, np.ndarray]:
        from m3_trt.processing import ImageDecodeError, ImageTooLargeError

        pics = []
        for i, blob in enumerate(images):
            try:
                pics.append(self.processor.decode_image(blob))
            except ImageTooLargeError as e:
                raise RequestError(f"image {i} is over the pixel budget: {e}") from e
            except ImageDecodeError as e:
                raise RequestError(f"image {i} is not a decodable image: {e}") from e
        enc = self.processor(build_prompt(self.processor, prompt, len(pics)), images=pics or None)
        ids = enc["input_ids"].reshape(-1).numpy().astype(np.int64)
        if ids.size > self.max_input_len:
            raise RequestError(
                f"prompt is {ids.size} tokens (images included), over max_input_len={self.max_input_len}"
            )
        d = self.processor.image_cfg
        patch_dim = 3 * d.temporal_patch_size * d.patch_size * d.patch_size
        pixels = enc.get("pixel_values")
        grid = enc.get("image_grid_thw")
        return {
            "input_ids": ids,
            "pixel_values": (pixels.numpy() if pixels is not None else np.zeros((0, patch_dim))).astype(np.float32),
            "image_grid_thw": (grid.numpy() if grid is not None else np.zeros((0, 3))).astype(np.int64),
        }


class VisionEncoder:
    """Image patches → projected image tokens, several requests per forward.

    ``features(pixel_values [N, D] fp32, grid [n, 3] int64) -> [N/merge², Dt]`` is the backend:
    the torch model's ``get_image_features`` or the ONNX export's vision_encoder + projector.
    """

    def __init__(self, features, config):
        self.features = features
        self.config = config
        merge = config.vision.spatial_merge_size
        self.merge_sq = merge * merge

    @classmethod
    def from_model(cls, model) -> "VisionEncoder":
        import torch

        def features(pixels, grid):
            with torch.no_grad():
                return model.get_image_features(torch.from_numpy(pixels), torch.from_numpy(grid)).float().numpy()

        return cls(features, model.config)

    @classmethod
    def from_onnx(cls, onnx_model) -> "VisionEncoder":
        """Over an ``m3_trt.export.onnx.runtime.OnnxModel``."""
        return cls(lambda pixels, grid: np.asarray(onnx_model.image_embeds(pixels, grid), np.float32),
                   onnx_model.config)

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path) -> "VisionEncoder":
        import torch
        from m3_trt.model import M3ForConditionalGeneration

        return cls.from_model(M3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32))

    def __call__(self, batch: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """``[(pixel_values [N_i, D], grid [n_i, 3]), ...]`` → ``[image_embeds [T_i, Dt], ...]``."""
        counts = [int((np.asarray(g).reshape(-1, 3).prod(-1)).sum()) // self.merge_sq for _, g in batch]
        hidden = self.config.text.hidden_size
        live = [(p, g) for (p, g), c in zip(batch, counts) if c]
        if not live:
            return [np.zeros((0, hidden), np.float32) for _ in batch]
        pixels = np.ascontiguousarray(np.concatenate([np.asarray(p, np.float32) for p, _ in live]))
        grid = np.ascontiguousarray(np.concatenate([np.asarray(g, np.int64).reshape(-1, 3) for _, g in live]))
        feats = self.features(pixels, grid)
        return list(np.split(feats, np.cumsum(counts)[:-1]))


def _eos_ids(config) -> tuple[int, ...]:
    eos = config.text.eos_token_id
    return tuple(eos) if isinstance(eos, (tuple, list)) else (eos,)


def _check_placeholders(input_ids: np.ndarray, image_embeds: np.ndarray | None, config) -> np.ndarray | None:
    """``image_embeds`` as ``[n, Dt]`` fp32 (None when empty), one row per image placeholder id."""
    n_placeholders = int((np.asarray(input_ids) == config.image_token_id).sum())
    embeds = None
    if image_embeds is not None and np.asarray(image_embeds).size:
        embeds = np.asarray(image_embeds, np.float32).reshape(-1, config.text.hidden_size)
    if (embeds.shape[0] if embeds is not None else 0) != n_placeholders:
        raise RequestError(f"prompt has {n_placeholders} image placeholders but "
                           f"{0 if embeds is None else embeds.shape[0]} image embeddings arrived")
    return embeds


class TokenGenerator:
    """Runs ``m3_trt.generate.generate`` for one request at a time (an iterator per request)."""

    def __init__(self, model):
        self.model = model
        self.eos = _eos_ids(model.config)

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path) -> "TokenGenerator":
        import torch
        from m3_trt.model import M3ForConditionalGeneration

        return cls(M3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32))

    def __call__(self, input_ids: np.ndarray, image_embeds: np.ndarray | None, params: SamplingParams) -> Iterator[int]:
        import torch
        from m3_trt.generate import generate

        params.validate()
        ids = torch.from_numpy(np.asarray(input_ids, np.int64).reshape(1, -1))
        embeds = _check_placeholders(input_ids, image_embeds, self.model.config)
        embeds = torch.from_numpy(embeds) if embeds is not None else None
        eos = (params.end_id,) if params.end_id is not None else self.eos
        return generate(self.model, ids, image_embeds=embeds, max_new_tokens=params.max_tokens, eos_token_id=eos,
                        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed)


class OnnxTokenGenerator:
    """Token generation over an ONNX export in ONNX Runtime, one static KV cache per request.

    Same contract as :class:`TokenGenerator`. The export's caches are ``max_seq_len`` slots long
    (fixed at export time), so a request whose prompt + ``max_tokens`` exceeds that is refused.
    """

    def __init__(self, onnx_model):
        self.model = onnx_model
        self.config = onnx_model.config
        self.eos = _eos_ids(onnx_model.config)

    def __call__(self, input_ids: np.ndarray, image_embeds: np.ndarray | None, params: SamplingParams) -> Iterator[int]:
        params.validate()
        ids = np.asarray(input_ids, np.int64).reshape(1, -1)
        embeds = _check_placeholders(ids, image_embeds, self.config)
        limit = self.model.max_seq_len
        if ids.shape[1] + params.max_tokens > limit:
            raise RequestError(f"prompt ({ids.shape[1]} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                               f"ONNX export's max_seq_len={limit}")
        return self._tokens(ids, embeds, params)

    def _tokens(self, ids: np.ndarray, embeds: np.ndarray | None, params: SamplingParams) -> Iterator[int]:
        import torch

        from m3_trt.generate import sample_next

        eos = set((params.end_id,) if params.end_id is not None else self.eos)
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        caches = self.model.new_cache(1)
        logits = self.model.forward(ids, caches, 0, image_embeds=embeds)
        pos = ids.shape[1]
        for _ in range(params.max_tokens):
            tok = sample_next(torch.from_numpy(np.asarray(logits[0, -1], np.float32)), temperature=params.temperature,
                              top_k=params.top_k, top_p=params.top_p, generator=gen)
            yield tok
            if tok in eos:
                return
            logits = self.model.forward(np.array([[tok]], np.int64), caches, pos)
            pos += 1


def load_steps(params: dict[str, str]) -> tuple[VisionEncoder, "TokenGenerator | OnnxTokenGenerator"]:
    """The vision encoder and token generator for a repository model's ``parameters``.

    ``backend`` ``torch`` loads the checkpoint's torch reference; ``onnxruntime`` opens the ONNX
    export in ``export_dir`` (one ``OnnxModel`` shared by both steps of this process).
    """
    backend = params.get("backend", "torch")
    if backend == "torch":
        import torch
        from m3_trt.model import M3ForConditionalGeneration

        model = M3ForConditionalGeneration.from_pretrained(params["checkpoint"], dtype=torch.float32)
        return VisionEncoder.from_model(model), TokenGenerator(model)
    if backend == "onnxruntime":
        from m3_trt.export.onnx.runtime import OnnxModel

        # the same per-instance thread budget as the torch steps (instances scale, not threads)
        model = OnnxModel(params["export_dir"], threads=int(params.get("torch_threads", 1)))
        return VisionEncoder.from_onnx(model), OnnxTokenGenerator(model)
    raise ValueError(f"backend {backend!r} cannot run in a python-backend step (torch | onnxruntime)")


def _stable(processor, ids: Sequence[int]) -> str:
    # Text that can no longer change: trailing U+FFFD may be the first bytes of a character
    # whose remaining bytes come with the next token.
    return processor.decode(list(ids)).rstrip(REPLACEMENT) if len(ids) else ""


def text_delta(processor, ids: Sequence[int], new_tokens: int, finished: bool) -> str:
    """Text to send for a response whose cumulative ids are ``ids`` (the last ``new_tokens`` new).

    Summed over a request's responses this telescopes to ``decode(ids)``: each response sends
    what became stable since the previous one, and the final one flushes the rest.
    """
    ids = list(ids)
    before = _stable(processor, ids[: len(ids) - new_tokens])
    now = processor.decode(ids) if finished else _stable(processor, ids)
    return now[len(before):]


def generate_in_process(preprocessor: Preprocessor, vision: VisionEncoder, generator: TokenGenerator,
                        prompt: str, images: Sequence[bytes], params: SamplingParams) -> Iterator[str]:
    """The served pipeline without the server: yields the same text pieces as a streaming request."""
    enc = preprocessor(prompt, images)
    embeds = vision([(enc["pixel_values"], enc["image_grid_thw"])])[0]
    toks: list[int] = []
    for tok in generator(enc["input_ids"], embeds, params):
        toks.append(tok)
        piece = text_delta(preprocessor.processor, toks, 1, False)
        if piece:
            yield piece
    tail = text_delta(preprocessor.processor, toks, 0, True)
    if tail:
        yield tail
