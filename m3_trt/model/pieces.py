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

The build's rank-weight writer does not materialize a piece: :meth:`PieceReader.parameters` lists
the piece's parameters with the checkpoint entries that fill each (shapes, dtypes and coverage
checked up front), and :meth:`PieceReader.read_rows` / :meth:`PieceReader.read_fp8_rows` read one
*chunk* of one parameter — a range of its dim-0 rows (whole experts of an expert stack, at most
:data:`CHUNK_ELEMS` values) — straight from the shard files with ``pread`` (:class:`ShardFiles`):
no memory map, so RSS holds that chunk and nothing of the rest of the checkpoint.
"""

from __future__ import annotations

import json
import math
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

from m3_trt.model.checkpoint import (FP8_DTYPES, IGNORED, SCALE_SUFFIX, CheckpointError, SafetensorsCheckpoint,
                                    check_dtype, dequantize_fp8, map_key, place)
from m3_trt.model.config import M3Config

_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.")
# (in-memory name prefix, piece); layers are matched by _LAYER first
_PREFIXES = (("model.language_model.embed_tokens.", "embedding"), ("model.language_model.norm.", "head"),
             ("lm_head.", "head"), ("model.vision_tower.", "vision"), ("model.multi_modal_projector.", "projector"))


# Values per chunk of a parameter read by the rank-weight writer (8 MiB in fp32): small against a
# full-width piece (a 128-expert stack is 4.8 G values; one expert, 38 M values, is then the chunk),
# large enough that per-read overheads vanish (the 200064-row embedding reads in ~590 chunks). The
# conversion's temporaries are a few times the chunk (fp32 copy, cast, FP8 encode).
CHUNK_ELEMS = 1 << 21
E4M3 = torch.float8_e4m3fn
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


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


class ShardFiles:
    """Where every tensor of the checkpoint's shards lies (each header read once), and reads of one
    tensor or a range of its dim-0 rows with plain file reads into a fresh buffer.

    ``loc[key] = (file, dtype, shape, begin, end)`` with absolute byte offsets. Reading, unlike a
    memory map, leaves nothing of the file in the process's RSS after the tensor is dropped.
    """

    def __init__(self, root: Path, key_to_file: dict[str, str]):
        self.loc: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for name in sorted(set(key_to_file.values())):
            path = root / name
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            size = path.stat().st_size
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                if v["dtype"] not in _TORCH_DTYPES:
                    raise CheckpointError(f"{k}: stored as {v['dtype']} in {path}, a dtype this reader does not know")
                a, b = v["data_offsets"]
                if 8 + n + b > size:
                    raise CheckpointError(f"{path}: {k} ends at byte {8 + n + b}, past the file's {size} bytes "
                                          f"(a truncated shard)")
                self.loc[k] = (path, _TORCH_DTYPES[v["dtype"]], tuple(v["shape"]), 8 + n + a, 8 + n + b)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.loc[key][2]

    def dtype(self, key: str) -> torch.dtype:
        return self.loc[key][1]

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``key`` in its stored dtype, or only its dim-0 rows ``[a, b)``."""
        path, dtype, shape, begin, end = self._range(key, rows)
        buf = bytearray(end - begin)
        self._fill(key, path, begin, memoryview(buf))
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)

    def read_into(self, key: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Read ``key`` (or its rows ``[a, b)``) straight into contiguous ``out`` of the same byte size
        (no intermediate buffer: the native FP8 path's codes)."""
        path, _, _, begin, end = self._range(key, rows)
        if not out.is_contiguous() or out.numel() * out.element_size() != end - begin:
            raise ValueError(f"{key}: cannot read {end - begin} bytes into a {tuple(out.shape)} {out.dtype} view")
        if end > begin:
            self._fill(key, path, begin, memoryview(out.view(torch.uint8).reshape(-1).numpy()))

    def _range(self, key: str, rows):
        path, dtype, shape, begin, end = self.loc[key]
        if rows is not None:
            a, b = rows
            row = (end - begin) // shape[0]
            begin, end, shape = begin + a * row, begin + b * row, (b - a, *shape[1:])
        return path, dtype, shape, begin, end

    @staticmethod
    def _fill(key: str, path: Path, begin: int, view: memoryview) -> None:
        got = 0
        with open(path, "rb", buffering=0) as f:
            f.seek(begin)
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{key}: {path} ends before the tensor's last byte (a truncated shard)")
                got += n


def _rows_of(e: "Entry", n0: int) -> tuple[int, int]:
    """The dim-0 rows ``[lo, hi)`` of its parameter (of ``n0`` rows) that entry ``e`` fills."""
    if e.place == "whole":
        return 0, n0
    if e.place in ("half0", "half1"):
        return (0, n0 // 2) if e.place == "half0" else (n0 // 2, n0)
    return e.expert, e.expert + 1


class PieceReader:
    """Checkpoint keys grouped by piece; reads one piece's tensors at a time (memory-mapped shards)."""

    def __init__(self, ckpt: str | Path, cfg: M3Config, targets: dict[str, torch.Tensor]):
        """``targets``: the model's parameters and persistent buffers by name (meta tensors will do)."""
        self.path = Path(ckpt)
        self.cfg = cfg
        self.targets = targets
        ck = self._open()
        keys = ck.keys()
        self.files = ShardFiles(self.path, ck.key_to_file)
        del ck  # its memory maps: the chunked reads below do not use them
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
            view, idx = place(params[e.target], e.place, e.expert)
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
            view, _ = place(out[e.target], e.place, e.expert)
            view.copy_(s)
        return out


    # -- the rank-weight writer's chunked reads --------------------------------------------------

    def parameters(self, piece: str) -> dict[str, list[Entry]]:
        """Every parameter of ``piece`` by in-memory name (sorted) with the checkpoint entries that
        fill it — the head's ``lm_head.weight`` from the embedding's when the embeddings are tied.

        Checked before anything is read, with :meth:`fill`'s messages: each entry's stored shape
        fits its placement, its dtype is a float (or FP8 with its scale, the scale F32 or U8), and
        every row of every parameter is filled.
        """
        out: dict[str, list[Entry]] = {k: [] for k in sorted(k for k in self.targets if piece_of(k) == piece)}
        for e in self.entries[piece]:
            out[e.target].append(e)
        if piece == "head" and self.tied_head and "lm_head.weight" in out:
            emb = "model.language_model.embed_tokens.weight"
            out["lm_head.weight"] = [replace(e, target="lm_head.weight") for e in self.entries["embedding"]
                                     if e.target == emb]
        missing = []
        for name, entries in out.items():
            meta = self.targets[name]
            cov = torch.zeros(meta.shape[:-1] if meta.dim() > 1 else (), dtype=torch.bool)
            for e in entries:
                view, idx = place(meta, e.place, e.expert)
                stored = self.files.shape(e.key)
                if stored != tuple(view.shape):
                    raise CheckpointError(f"{e.key}: shape {stored} does not fit {name} "
                                          f"(expects {tuple(view.shape)} for placement {e.place!r})")
                dt = self.files.dtype(e.key)
                check_dtype(e.key, dt, float_target=meta.is_floating_point())
                if dt in FP8_DTYPES:
                    if e.scale_key is None:
                        raise CheckpointError(f"{e.key}: FP8 tensor without its {e.key + SCALE_SUFFIX}")
                    check_dtype(e.scale_key, self.files.dtype(e.scale_key), float_target=True, scale=True)
                elif e.scale_key is not None:
                    raise CheckpointError(f"{e.scale_key}: a scale for {e.key}, which is not FP8 ({dt})")
                if cov.dim() == 0:
                    cov.fill_(True)
                else:
                    cov[idx] = True
            if not bool(cov.all()):
                missing.append(name)
        if missing:
            raise CheckpointError(f"checkpoint does not match the model; missing {len(missing)}: "
                                  f"{', '.join(missing[:8])}")
        return out

    def native_block(self, entries: list[Entry]) -> tuple[int, int] | None:
        """``(rows, cols)`` of the scale blocks when every entry is E4M3 with one block shape and
        one scale dtype (the codes can be kept as they are), else None."""
        blocks = set()
        for e in entries:
            shape = self.files.shape(e.key)
            if self.files.dtype(e.key) != E4M3 or e.scale_key is None or len(shape) < 2:
                return None
            s = self.files.shape(e.scale_key)
            s = (1,) * (2 - len(s)) + s
            if shape[-2] % s[-2] or shape[-1] % s[-1]:
                raise CheckpointError(f"{e.key}: weight shape {shape[-2:]} is not divisible by its scale grid "
                                      f"{s[-2:]}")
            blocks.add((shape[-2] // s[-2], shape[-1] // s[-1], self.files.dtype(e.scale_key)))
        return (next(iter(blocks))[0], next(iter(blocks))[1]) if len(blocks) == 1 else None

    def chunk_rows(self, name: str, entries: list[Entry]) -> int:
        """Dim-0 rows per chunk of parameter ``name`` (at most :data:`CHUNK_ELEMS` values, at least
        one row): whole experts of an expert stack, row blocks of a bf16/fp32 tensor; a 2-D FP8
        weight (whose scale rows would have to line up with the chunk) in one chunk."""
        shape = tuple(self.targets[name].shape)
        if not shape:
            return 1
        if len(shape) != 3 and any(self.files.dtype(e.key) in FP8_DTYPES for e in entries):
            return shape[0]
        return max(1, min(shape[0], CHUNK_ELEMS // max(math.prod(shape[1:]), 1)))

    def read_rows(self, name: str, entries: list[Entry], a: int, b: int) -> torch.Tensor:
        """Rows ``[a, b)`` of parameter ``name`` in fp32 (FP8 entries dequantized with their scales),
        with :meth:`fill`'s non-finite check naming the key."""
        shape = tuple(self.targets[name].shape)
        out = torch.empty((b - a, *shape[1:]) if shape else (), dtype=torch.float32)
        for e in entries:
            view, src = self._span(out, e, shape, a, b)
            if view is None:
                continue
            t = self.files.read(e.key, src)
            if t.dtype in FP8_DTYPES:
                t = dequantize_fp8(t, self.files.read(e.scale_key, src if t.dim() == 3 else None), torch.float32,
                                   name=e.key)
            view.copy_(t)
            del t
            if view.numel() and not all(map(math.isfinite, map(float, view.aminmax()))):
                raise CheckpointError(f"{e.key}: contains non-finite values (NaN or Inf)")
        return out

    def read_fp8_rows(self, name: str, entries: list[Entry], a: int, b: int,
                      block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[a, b)`` of a natively FP8 parameter as stored: ``(codes uint8 [b-a, ..., R, C],
        scales [b-a, ..., R/br, C/bc])`` (fused halves and experts assembled; nothing dequantized).
        NaN codes (E4M3 ``S.1111.111``) or scales (E8M0 byte 255, non-finite F32) are named errors."""
        shape = tuple(self.targets[name].shape)
        br, bc = block
        codes = torch.empty((b - a, *shape[1:]), dtype=torch.uint8)
        sdt = self.files.dtype(entries[0].scale_key)
        scales = torch.empty((b - a, *shape[1:-2], shape[-2] // br, shape[-1] // bc) if len(shape) == 3
                             else (shape[-2] // br, shape[-1] // bc), dtype=sdt)
        for e in entries:
            view, src = self._span(codes, e, shape, a, b)
            if view is None:
                continue
            self.files.read_into(e.key, view, src)
            c = view
            s = self.files.read(e.scale_key, src if c.dim() == 3 else None)
            if len(shape) == 3:  # dim 0 is experts in both
                sview, _ = self._span(scales, e, shape, a, b)
            else:  # read whole: the entry's rows in scale-grid rows
                lo, hi = _rows_of(e, shape[0])
                sview = scales[lo // br:hi // br]
            sview.copy_(s.reshape(sview.shape))
            # E4M3 NaN is S.1111.111: the largest value of the sign-cleared bytes (5x faster than == + any)
            bad = (c.numel() and int((c & 0x7F).max()) == 0x7F) or \
                (bool((s == 255).any()) if s.dtype == torch.uint8 else not bool(torch.isfinite(s).all()))
            if bad:
                raise CheckpointError(f"{e.key}: contains non-finite values (NaN or Inf)")
        return codes, scales

    @staticmethod
    def _span(out: torch.Tensor, e: Entry, shape: tuple[int, ...], a: int, b: int):
        """The view of chunk ``out`` (rows ``[a, b)`` of a parameter of ``shape``) entry ``e`` fills, and
        the entry's rows to read (None: all); ``(None, None)`` when the entry lies outside the chunk."""
        if not shape:
            return out, None
        lo, hi = _rows_of(e, shape[0])
        i, j = max(a, lo), min(b, hi)
        if i >= j:
            return None, None
        if e.place in ("whole", "half0", "half1"):
            return out[i - a:j - a], None if (i, j) == (lo, hi) else (i - lo, j - lo)
        view, _ = place(out, e.place, e.expert - a)
        return view, None


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
