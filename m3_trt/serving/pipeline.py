"""The serving pipeline as plain library code: what each Triton step's ``model.py`` calls.

Steps (one class or function each, no Triton types here, so they run and test in-process):

- :class:`Preprocessor` — prompt → chat template → image decoding (bytes) → M3-VL image
  processing → placeholder expansion → ``input_ids [S]``, ``pixel_values [N, D]``,
  ``image_grid_thw [n, 3]``; refuses bad requests with :class:`RequestError`.
- :class:`VisionEncoder` — a list of requests' (pixel_values, grid) → one batched vision tower +
  projector call (torch ``get_image_features``, or the exported ``vision_encoder`` + ``projector``
  graphs in ONNX Runtime) → per-request ``image_embeds [n_tokens, Dt]``.
- :class:`TokenGenerator` (torch, ``m3_trt.model.generate.generate``) and :class:`OnnxTokenGenerator`
  (the exported embedding / decoder-layer / head graphs in ONNX Runtime, a static KV cache per
  request) — ``input_ids`` + ``image_embeds`` + :class:`SamplingParams` → token ids; both sample
  with ``m3_trt.model.generate.sample_next``.
- :func:`load_steps` — the vision encoder and token generator a repository's ``parameters``
  name (``backend``, ``checkpoint``, ``export_dir``).
- :func:`text_delta` — stateless incremental detokenisation (the postprocessing step sees one
  response at a time, so it cannot keep a decoder's state); :class:`TokenWindow` — the bounded
  ids the ``llm`` step sends per response (new ids + a short context), so streamed bytes and
  detokenisation are linear in the answer; :class:`Detokenizer` — the same with state (m3_bls).
- :class:`RequestLimits` — caps on request bytes, image bytes and image count. The prompt itself is
  built by ``M3Processor.encode_chat`` (user text tokenized without special tokens).
- :func:`generate_in_process` — the four steps chained in one process: the reference the
  served answers are compared with, and the "without the server" side of the benchmark.

Legend: S prompt tokens, N patches, D = C·tp·p·p patch values, n images, Dt text hidden size.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

__all__ = [
    "RequestError", "SamplingParams", "Preprocessor", "VisionEncoder", "TokenGenerator", "OnnxTokenGenerator",
    "load_steps", "split_image_rows", "text_delta", "generate_in_process",
    "RequestLimits", "TokenWindow", "Detokenizer", "DETOK_CONTEXT", "eos_ids", "check_placeholders",
]

NO_END_ID = -1  # end_id that ends nothing (TensorRT-LLM's benchmarking convention)
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
    end_id: int | None = None  # end_id; None = the checkpoint's EOS ids; -1 = none (always max_tokens)
    pad_id: int | None = None  # pad_id; checked, unused (answers are never padded)

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Self, or a :class:`RequestError` naming the bad field; ids are checked against
        ``vocab_size`` when given."""
        if self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be > 0, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise RequestError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("end_id", "pad_id"):
            value = getattr(self, name)
            if name == "end_id" and value == NO_END_ID:
                continue
            if value is not None and (value < 0 or (vocab_size is not None and value >= vocab_size)):
                raise RequestError(f"{name}={value} is outside the vocabulary [0, {vocab_size if vocab_size else 'V'})")
        return self


def split_image_rows(rows_nL: np.ndarray, lengths_n: np.ndarray | None = None) -> list[bytes]:
    """UINT8 ``[n, L]`` zero-padded rows (+ each file's length ``[n]``) → the encoded files.

    With ``lengths`` (``image_bytes_lengths``, what :func:`m3_trt.serving.client.build_inputs`
    sends) every row is cut at its length, so files that end in zero bytes (BMP, TIFF, PPM, a
    WebP's RIFF pad byte) arrive whole. Without it (a client written for the TensorRT-LLM
    templates) trailing zeros are stripped, which is exact for PNG / JPEG / GIF only.
    """
    rows = np.asarray(rows_nL)
    if rows.dtype != np.uint8:
        raise RequestError(f"image_bytes_input must be UINT8, got {rows.dtype}")
    if rows.ndim == 1:
        rows = rows[None]
    rows = rows.reshape(-1, rows.shape[-1]) if rows.size else rows.reshape(0, 0)
    if lengths_n is None:
        return [r.tobytes().rstrip(b"\0") for r in rows]
    lengths = np.asarray(lengths_n).reshape(-1)
    if lengths.size != rows.shape[0]:
        raise RequestError(f"image_bytes_lengths has {lengths.size} values for {rows.shape[0]} images")
    if lengths.size and (int(lengths.min()) < 0 or int(lengths.max()) > rows.shape[1]):
        raise RequestError(f"image_bytes_lengths {lengths.tolist()} must lie within 0..{rows.shape[1]} "
                           f"(the image_bytes_input row length)")
    return [r[: int(n)].tobytes() for r, n in zip(rows, lengths)]


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """Per-request caps (the ``max_request_bytes`` / ``max_image_bytes`` / ``max_images``
    parameters of the preprocessing and m3_bls configs)."""

    max_request_bytes: int = 32 << 20
    max_image_bytes: int = 16 << 20
    max_images: int = 8

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "RequestLimits":
        d = cls()
        return cls(*(int(params.get(f.name, getattr(d, f.name))) for f in dataclasses.fields(cls)))

    def check(self, prompt: str, images: Sequence[bytes], request_bytes: int | None = None) -> None:
        """RequestError naming the cap a request exceeds (``request_bytes``: the inputs' size as
        received, default prompt + images)."""
        if len(images) > self.max_images:
            raise RequestError(f"{len(images)} images in one request, over max_images={self.max_images}")
        for i, blob in enumerate(images):
            if len(blob) > self.max_image_bytes:
                raise RequestError(f"image {i} is {len(blob)} bytes, over max_image_bytes={self.max_image_bytes}")
        total = request_bytes if request_bytes is not None else len(prompt.encode("utf-8")) + sum(map(len, images))
        if total > self.max_request_bytes:
            raise RequestError(f"request is {total} bytes, over max_request_bytes={self.max_request_bytes}")


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
        enc = self.processor.encode_chat(prompt, pics)
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
        from m3_trt.model.modeling import M3ForConditionalGeneration

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


def eos_ids(config) -> tuple[int, ...]:
    eos = config.text.eos_token_id
    return tuple(eos) if isinstance(eos, (tuple, list)) else (eos,)


def check_placeholders(input_ids: np.ndarray, image_embeds: np.ndarray | None, config) -> np.ndarray | None:
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
    """Runs ``m3_trt.model.generate.generate`` for one request at a time (an iterator per request)."""

    def __init__(self, model):
        self.model = model
        self.eos = eos_ids(model.config)

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path) -> "TokenGenerator":
        import torch
        from m3_trt.model.modeling import M3ForConditionalGeneration

        return cls(M3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32))

    def __call__(self, input_ids: np.ndarray, image_embeds: np.ndarray | None, params: SamplingParams) -> Iterator[int]:
        import torch
        from m3_trt.model.generate import generate

        params.validate(self.model.config.text.vocab_size)
        ids = torch.from_numpy(np.asarray(input_ids, np.int64).reshape(1, -1))
        embeds = check_placeholders(input_ids, image_embeds, self.model.config)
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
        self.eos = eos_ids(onnx_model.config)

    def __call__(self, input_ids: np.ndarray, image_embeds: np.ndarray | None, params: SamplingParams) -> Iterator[int]:
        params.validate(self.config.text.vocab_size)
        ids = np.asarray(input_ids, np.int64).reshape(1, -1)
        embeds = check_placeholders(ids, image_embeds, self.config)
        limit = self.model.max_seq_len
        if ids.shape[1] + params.max_tokens > limit:
            raise RequestError(f"prompt ({ids.shape[1]} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                               f"ONNX export's max_seq_len={limit}")
        return self._tokens(ids, embeds, params)

    def _tokens(self, ids: np.ndarray, embeds: np.ndarray | None, params: SamplingParams) -> Iterator[int]:
        import torch

        from m3_trt.model.generate import sample_next

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
        from m3_trt.model.modeling import M3ForConditionalGeneration

        model = M3ForConditionalGeneration.from_pretrained(params["checkpoint"], dtype=torch.float32)
        return VisionEncoder.from_model(model), TokenGenerator(model)
    if backend == "onnxruntime":
        from m3_trt.export.onnx.runtime import OnnxModel

        # the same per-instance thread budget as the torch steps (instances scale, not threads)
        model = OnnxModel(params["export_dir"], threads=int(params.get("torch_threads", 1)))
        return VisionEncoder.from_onnx(model), OnnxTokenGenerator(model)
    raise ValueError(f"backend {backend!r} cannot run in a python-backend step (torch | onnxruntime)")


def _stable(processor, ids: Sequence[int]) -> str:
    # Text that can no longer change: one trailing U+FFFD may be the first bytes of a character
    # whose remaining bytes come with the next token (a lossy UTF-8 decode turns an incomplete
    # trailing sequence into exactly one U+FFFD; earlier ones are final).
    text = processor.decode(list(ids)) if len(ids) else ""
    return text[:-1] if text.endswith(REPLACEMENT) else text


def text_delta(processor, ids: Sequence[int], new_tokens: int, finished: bool) -> str:
    """Text to send for a response whose cumulative ids are ``ids`` (the last ``new_tokens`` new).

    Summed over a request's responses this telescopes to ``decode(ids)``: each response sends
    what became stable since the previous one, and the final one flushes the rest.
    """
    ids = list(ids)
    before = _stable(processor, ids[: len(ids) - new_tokens])
    now = processor.decode(ids) if finished else _stable(processor, ids)
    return now[len(before):]


# Context ids sent before the new ones. The unsent tail of an answer is at most one incomplete
# UTF-8 character (<= 3 bytes, so <= 3 tokens); 8 leaves room for tokens that decode to nothing.
DETOK_CONTEXT = 8


class TokenWindow:
    """The ids one streamed ``llm`` response carries: a bounded tail of context + the new ids.

    ``push(new) -> (ids, n_new)``; ``text_delta(processor, ids, n_new, finished)`` on them gives
    the same text as on the cumulative ids, with bytes per response independent of the answer's
    length (the context covers whatever text is not yet stable).
    """

    def __init__(self, context: int = DETOK_CONTEXT):
        self.context = context
        self.tail: list[int] = []

    def push(self, new: Sequence[int]) -> tuple[list[int], int]:
        ids = self.tail + [int(t) for t in new]
        self.tail = ids[-self.context:] if self.context else []
        return ids, len(new)


class Detokenizer:
    """Per-request incremental detokenisation: ``push(new_ids, finished) -> text`` (linear work)."""

    def __init__(self, processor, context: int = DETOK_CONTEXT):
        self.processor = processor
        self.window = TokenWindow(context)

    def push(self, new: Sequence[int], finished: bool = False) -> str:
        ids, n = self.window.push(new)
        return text_delta(self.processor, ids, n, finished)


def generate_in_process(preprocessor: Preprocessor, vision: VisionEncoder, generator: TokenGenerator,
                        prompt: str, images: Sequence[bytes], params: SamplingParams) -> Iterator[str]:
    """The served pipeline without the server: yields the same text pieces as a streaming request."""
    enc = preprocessor(prompt, images)
    embeds = vision([(enc["pixel_values"], enc["image_grid_thw"])])[0]
    detok = Detokenizer(preprocessor.processor)
    for tok in generator(enc["input_ids"], embeds, params):
        piece = detok.push([tok])
        if piece:
            yield piece
    tail = detok.push([], finished=True)
    if tail:
        yield tail
