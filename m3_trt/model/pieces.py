"""The checkpoint piece by piece, straight from its safetensors shards (the build's streaming reader).

A *piece* is the unit a build holds in memory at once: ``embedding``, ``layer.<i>`` (one decoder
layer), ``head`` (final norm + LM head), ``vision`` (the vision tower) and ``projector``. Pieces
are assigned by the in-memory parameter name each checkpoint key maps to
(:func:`m3_trt.model.checkpoint.map_key`), so both on-disk layouts (the original MiniMax one and
transformers') stream the same way.

:class:`PieceModel` is the whole model built on the ``meta`` device (no memory); ``with
pm.loaded(piece, dtype):`` materializes only that piece's parameters from the memory-mapped
shards (FP8 codes dequantized with their block scales, exactly as
:func:`m3_trt.model.checkpoint.load_into` does), converts them to ``dtype`` and returns them to
``meta`` on exit. Peak memory is one piece in fp32 plus its copy in ``dtype``; the shards'
memory maps are opened per piece and dropped after it (mapped pages count in RSS).
:meth:`PieceReader.raw` gives a piece's tensors as stored (FP8 codes and scales untouched).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from m3_trt.model.checkpoint import (FP8_DTYPES, IGNORED, SCALE_SUFFIX, CheckpointError, SafetensorsCheckpoint, _place,
                         dequantize_fp8, map_key)
from m3_trt.model.config import M3Config

_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.")
# (in-memory name prefix, piece); layers are matched by _LAYER first
_PREFIXES = (("model.language_model.embed_tokens.", "embedding"), ("model.language_model.norm.", "head"),
             ("lm_head.", "head"), ("model.vision_tower.", "vision"), ("model.multi_modal_projector.", "projector"))


def piece_of(name: str) -> str:
    """The piece an in-memory parameter name belongs to."""
    m = _LAYER.match(name)
    if m:
        return f"layer.{int(m.group(1))}"
    for prefix, piece in _PREFIXES:
        if name.startswith(prefix):
            return piece
    raise CheckpointError(f"{name}: belongs to no piece of the model")


def piece_names(cfg: M3Config) -> list[str]:
    """Every piece in build order: embedding, layer.0 … layer.N-1, head, vision, projector."""
    return ["embedding", *(f"layer.{i}" for i in range(cfg.text.num_hidden_layers)), "head", "vision", "projector"]


@dataclass(frozen=True)
class Entry:
    """One checkpoint key: where it goes (``target``, ``place``, ``expert``) and its scale key if FP8."""

    key: str
    target: str
    place: str
    expert: int | None
    scale_key: str | None


class PieceReader:
    """Checkpoint keys grouped by piece; reads one piece's tensors at a time (memory-mapped shards)."""

    def __init__(self, ckpt: str | Path, cfg: M3Config, targets: dict[str, torch.Tensor]):
        """``targets``: the model's parameters and persistent buffers by name (meta tensors will do)."""
        self.path = Path(ckpt)
        self.cfg = cfg
        self.targets = targets
        keys = self._open().keys()
        scales = {k for k in keys if k.endswith(SCALE_SUFFIX)}
        self.entries: dict[str, list[Entry]] = {p: [] for p in piece_names(cfg)}
        unused, used_scales = [], set()
        for key in keys:
            if key in scales or any(rx.search(key) for rx in IGNORED):
                continue
            hit = map_key(key)
            if hit is None or hit[0] not in targets:
                unused.append(key)
                continue
            target, place, expert = hit
            sk = key + SCALE_SUFFIX if key + SCALE_SUFFIX in scales else None
            if sk:
                used_scales.add(sk)
            self.entries[piece_of(target)].append(Entry(key, target, place, expert, sk))
        # scales whose weight is not FP8 are reported when that weight is read (load_into's rule)
        unused += sorted(scales - used_scales)
        if unused:
            raise CheckpointError(f"checkpoint does not match the model; unused {len(unused)}: {', '.join(unused[:8])}")
        self.tied_head = cfg.tie_word_embeddings and not any(e.target == "lm_head.weight" for e in self.entries["head"])

    def _open(self) -> SafetensorsCheckpoint:
        """Fresh memory maps of the shards, for one piece. Mapped pages count in the process's RSS
        for as long as the map lives, so each piece opens its own and drops it when done: holding
        one map for the whole build would make RSS grow with every layer read."""
        return SafetensorsCheckpoint(self.path)

    def raw(self, piece: str) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` as stored: FP8 codes and their ``_scale_inv`` untouched, file dtype kept."""
        ck = self._open()
        for e in self.entries[piece]:
            yield e.key, ck.get(e.key)
            if e.scale_key:
                yield e.scale_key, ck.get(e.scale_key)

    def fill(self, piece: str, params: dict[str, torch.Tensor]) -> None:
        """Write the piece's checkpoint tensors into ``params`` (real fp32 tensors by in-memory name).

        Every element of every parameter of the piece must be written once: anything missing,
        misshapen or non-finite is a :class:`CheckpointError` naming the key.
        """
        coverage = {k: torch.zeros(v.shape[:-1] if v.dim() > 1 else (), dtype=torch.bool) for k, v in params.items()}
        ck = self._open()
        for e in self.entries[piece]:
            tensor = ck.get(e.key)
            if tensor.dtype in FP8_DTYPES:
                if e.scale_key is None:
                    raise CheckpointError(f"{e.key}: FP8 tensor without its {e.key + SCALE_SUFFIX}")
                tensor = dequantize_fp8(tensor, ck.get(e.scale_key), torch.float32, name=e.key)
            elif e.scale_key is not None:
                raise CheckpointError(f"{e.scale_key}: a scale for {e.key}, which is not FP8 ({tensor.dtype})")
            view, idx = _place(params[e.target], e.place, e.expert)
            if tuple(tensor.shape) != tuple(view.shape):
                raise CheckpointError(f"{e.key}: shape {tuple(tensor.shape)} does not fit {e.target} "
                                      f"(expects {tuple(view.shape)} for placement {e.place!r})")
            with torch.no_grad():
                view.copy_(tensor)
            # checked on the fp32 copy with one reduction (min/max propagate NaN; ±inf shows as itself):
            # an elementwise isfinite + all over bf16 costs ~10x the copy on CPU
            if tensor.is_floating_point() and view.numel() and not all(map(math.isfinite, map(float, view.detach().aminmax()))):
                raise CheckpointError(f"{e.key}: contains non-finite values (NaN or Inf)")
            del tensor
            cov = coverage[e.target]
            if cov.dim() == 0:
                cov.fill_(True)
            else:
                cov[idx] = True
        if piece == "head" and self.tied_head and "lm_head.weight" in params:
            # tie_word_embeddings: the head reads the embedding's rows
            emb = {"model.language_model.embed_tokens.weight": params["lm_head.weight"]}
            self.fill("embedding", emb)
            coverage["lm_head.weight"].fill_(True)
        missing = [k for k, c in coverage.items() if not bool(c.all())]
        if missing:
            raise CheckpointError(f"checkpoint does not match the model; missing {len(missing)}: "
                                  f"{', '.join(missing[:8])}")

    def block_scales(self, piece: str) -> dict[str, torch.Tensor]:
        """The piece's FP8 scale grids re-assembled onto in-memory names (fused gate‖up, experts)."""
        out: dict[str, torch.Tensor] = {}
        ck = self._open()
        for e in self.entries[piece]:
            if not e.scale_key:
                continue
            s = ck.get(e.scale_key)
            rows, cols = ck.shape(e.key)[-2:]
            br, bc = rows // s.shape[-2], cols // s.shape[-1]
            if e.target not in out:
                shape = self.targets[e.target].shape
                out[e.target] = torch.ones(*shape[:-2], shape[-2] // br, shape[-1] // bc, dtype=s.dtype)
            view, _ = _place(out[e.target], e.place, e.expert)
            view.copy_(s)
        return out


class PieceModel:
    """The model on ``meta``, materialized one piece at a time from the checkpoint."""

    def __init__(self, ckpt: str | Path, cfg: M3Config | None = None):
        from m3_trt.model.modeling import M3ForConditionalGeneration

        self.cfg = cfg or M3Config.from_pretrained(ckpt)
        with torch.device("meta"):
            self.model = M3ForConditionalGeneration(self.cfg)
        self.model.eval()
        self.reader = PieceReader(ckpt, self.cfg, self.meta_state())

    def meta_state(self) -> dict[str, torch.Tensor]:
        """Every parameter and persistent buffer by name, on ``meta`` (shapes and dtypes only)."""
        return dict(self.model.state_dict(keep_vars=True))

    def modules(self, piece: str) -> list[torch.nn.Module]:
        """The submodules whose parameters make up ``piece``."""
        m = self.model
        lm = m.model.language_model
        if piece.startswith("layer."):
            return [lm.layers[int(piece.split(".")[1])]]
        return {"embedding": [lm.embed_tokens], "head": [lm.norm, m.lm_head], "vision": [m.model.vision_tower],
                "projector": [m.model.multi_modal_projector]}[piece]

    @contextmanager
    def loaded(self, piece: str, dtype: torch.dtype = torch.float32) -> Iterator[dict[str, torch.Tensor]]:
        """Materialize ``piece`` in ``dtype`` (loaded in fp32, then cast: ``from_pretrained``'s rule);
        yields its tensors by full in-memory name; on exit they go back to ``meta``."""
        mods = self.modules(piece)
        try:
            for mod in mods:
                mod.to_empty(device="cpu")
                mod.to(torch.float32)
            state = self._piece_state(piece)
            self.reader.fill(piece, state)
            for mod in mods:
                mod.to(dtype)
            yield self._piece_state(piece)
        finally:
            for mod in mods:
                mod.to("meta")

    def _piece_state(self, piece: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict(keep_vars=True).items()
                if v.device.type != "meta" and piece_of(k) == piece}
