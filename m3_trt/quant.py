"""FP8 (E4M3) quantization: weight scales, activation calibration, an emulated forward, error report.

* Weights (the tensors :func:`m3_trt.plan.is_fp8_weight` names: decoder-layer Linear weights and
  experts, not the router): the checkpoint's own block scales are kept where it has them (the
  weight is re-coded with exactly those scales, so a native FP8 checkpoint round-trips bit for
  bit); otherwise one fp32 scale per output channel, ``amax(row) / 448``. Scales are stored as
  ``[..., rows, 1]`` (per channel) or the block grid, so :func:`m3_trt.checkpoint.dequantize_fp8`
  reads both.
* Activations: per-tensor scales ``amax / 448`` of every quantized matmul's input, measured on a
  calibration set (a built-in text + image prompt set, or a ``--calib`` jsonl of
  ``{"text": ..., "image": path?}``). Expert inputs share one scale per layer for ``gate_up`` and
  one for ``down`` (what a grouped FP8 GEMM takes).
* :class:`Fp8Emulation` runs the torch reference with every quantized matmul's weight *and*
  input passed through quantize → dequantize (FP8 values, fp32 scales), in the model's dtype.
  Attention score/value products and the KV cache stay in the activation dtype (not emulated).
* :func:`layer_errors`: per decoder layer, the relative error the FP8 layer adds given the bf16
  reference's input to that layer (``isolated``), and the error of the hidden state after that
  layer when the whole model runs in FP8 (``cumulative``) — both against the bf16 reference.
"""

from __future__ import annotations

import json
import math
import os
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import dequantize_fp8
from .plan import is_fp8_weight

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


# -- weights ------------------------------------------------------------------------------------

def quantize_weight(w: torch.Tensor, scale_inv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes E4M3, scale fp32)`` with ``w ≈ dequantize_fp8(codes, scale)``; keeps given block scales."""
    w = w.float()
    if scale_inv is None:
        scale = (w.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(1e-12)  # [..., rows, 1]
        return (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale
    rows, cols = w.shape[-2:]
    s = scale_inv.float() if scale_inv.dtype != torch.uint8 else (scale_inv.float() - 127).exp2()
    sr, sc = s.shape[-2:]
    full = s.repeat_interleave(rows // sr, dim=-2).repeat_interleave(cols // sc, dim=-1)
    return (w / full).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale_inv


def qdq_weight(w: torch.Tensor, scale_inv: torch.Tensor | None = None) -> torch.Tensor:
    q, s = quantize_weight(w, scale_inv)
    return dequantize_fp8(q, s, w.dtype)


def quantize_state(state: dict[str, torch.Tensor], block_scales: dict[str, torch.Tensor] | None = None,
                   progress=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """FP8 codes for the quantized tensors (others unchanged) and ``{name + "_scale_inv": scale}``."""
    out, scales = {}, {}
    for k, v in state.items():
        if is_fp8_weight(k, v):
            out[k], scales[k + "_scale_inv"] = quantize_weight(v, (block_scales or {}).get(k))
        else:
            out[k] = v
        if progress:
            progress(k)
    return out, scales


def dequantize_state(state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: dequantize_fp8(v, scales[k + "_scale_inv"], torch.float32, name=k) if k + "_scale_inv" in scales else v
            for k, v in state.items()}


# -- activations --------------------------------------------------------------------------------

def qdq_act(x: torch.Tensor, scale: float) -> torch.Tensor:
    return ((x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * scale).to(x.dtype)


def _emulated_moe_forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
    """The reference expert loop with FP8 QDQ on the expert inputs (``self._fp8`` holds the state)."""
    from m3_trt.plugins.swiglu_moe.reference import route, swiglu_oai

    emu, name = self._fp8
    B, S, D = x_BSD.shape
    c = self.cfg
    x = x_BSD.reshape(-1, D)
    weights, experts = route(x, self.gate.weight, self.gate.e_score_correction_bias, c.num_experts_per_tok)
    xq = emu.act(name + ".experts.gate_up_proj", x)
    out = torch.zeros_like(x)
    for e in range(self.experts.gate_up_proj.shape[0]):
        tok, slot = torch.where(experts == e)
        if tok.numel() == 0:
            continue
        h = swiglu_oai(F.linear(xq[tok], self.experts.gate_up_proj[e]), alpha=c.swiglu_alpha, limit=c.swiglu_limit)
        h = emu.act(name + ".experts.down_proj", h)
        out.index_add_(0, tok, (F.linear(h, self.experts.down_proj[e]) * weights[tok, slot, None]).to(out.dtype))
    out = out * c.routed_scaling_factor + self.shared_experts(x)
    return out.reshape(B, S, D)


class Fp8Emulation:
    """Calibrate (``observe``) then emulate (``quantize``) FP8 on a model's quantized matmuls in place.

    ``attach(model)`` replaces the quantized weights by their QDQ values and hooks every input;
    ``amax`` maps each weight name to the largest input magnitude seen while observing.
    """

    def __init__(self, block_scales: dict[str, torch.Tensor] | None = None):
        self.mode = "observe"
        self.amax: dict[str, float] = {}
        self.block_scales = block_scales or {}

    def act(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.amax[name] = max(self.amax.get(name, 0.0), float(x.detach().abs().max()) if x.numel() else 0.0)
            return x
        return qdq_act(x, self.scale(name))

    def scale(self, name: str) -> float:
        if name not in self.amax:
            raise RuntimeError(f"no calibration data for {name} (was it reached by the calibration prompts?)")
        return max(self.amax[name], 1e-12) / E4M3_MAX

    def attach(self, model: nn.Module) -> "Fp8Emulation":
        from .model import MoE

        with torch.no_grad():
            for name, p in model.named_parameters():
                if is_fp8_weight(name, p):
                    p.copy_(qdq_weight(p, self.block_scales.get(name)))
        for name, m in model.named_modules():
            if not name.startswith("model.language_model.layers."):
                continue
            if isinstance(m, MoE):
                m._fp8 = (self, name)
                m.forward = types.MethodType(_emulated_moe_forward, m)
            elif isinstance(m, nn.Linear) and not name.endswith(".mlp.gate"):  # the router stays high precision
                m.register_forward_pre_hook(lambda mod, args, _n=name + ".weight": (self.act(_n, args[0]),))
        return self

    def scales(self) -> dict[str, float]:
        return {k: self.scale(k) for k in sorted(self.amax)}


# -- calibration prompts ------------------------------------------------------------------------

BUILTIN_PROMPTS = (
    "Describe the picture in one sentence.",
    "What colours do you see, and where are they?",
    "Write a short poem about the sea.",
    "Explain how a transformer language model generates text.",
    "List three prime numbers larger than one hundred.",
    "Translate 'good morning' into French and German.",
)


def _builtin_image(seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    h, w = 56, 84
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    rgb = torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(6 * xx + 3 * yy)]) + 0.1 * torch.rand(3, h, w, generator=g)
    return Image.fromarray((rgb.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())


def calibration_inputs(ckpt: str | Path, calib: str | Path | None = None) -> list[dict]:
    """Model inputs (``input_ids`` + optional ``pixel_values``/``image_grid_thw``) for calibration.

    Built-in: the text prompts above, every other one with a synthetic gradient image. ``calib``:
    a jsonl file, one ``{"text": str, "image": path (optional)}`` per line.
    """
    from PIL import Image

    from .processing import M3Processor

    proc = M3Processor.from_pretrained(ckpt)
    items: list[tuple[str, object]] = []
    if calib is None:
        items = [(t, _builtin_image(i) if i % 2 == 0 else None) for i, t in enumerate(BUILTIN_PROMPTS)]
    else:
        for n, line in enumerate(Path(calib).read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                text = rec["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{calib}:{n + 1}: expected a JSON object with a 'text' field") from None
            img = Image.open(Path(calib).parent / rec["image"]).convert("RGB") if rec.get("image") else None
            items.append((text, img))
        if not items:
            raise ValueError(f"{calib}: no calibration prompts")
    out = []
    for text, img in items:
        content = ([{"type": "image"}] if img is not None else []) + [{"type": "text", "text": text}]
        chat = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        enc = proc(chat, images=[img] if img is not None else None)
        out.append({k: enc[k] for k in ("input_ids", "pixel_values", "image_grid_thw") if k in enc})
    return out


@torch.no_grad()
def calibrate(model: nn.Module, inputs: list[dict], emu: Fp8Emulation | None = None) -> Fp8Emulation:
    """Attach an :class:`Fp8Emulation` to ``model`` and record input amax over ``inputs``."""
    emu = (emu or Fp8Emulation()).attach(model)
    emu.mode = "observe"
    for inp in inputs:
        model(**inp)
    emu.mode = "quantize"
    return emu


@torch.no_grad()
def layer_errors(ref: nn.Module, fp8: nn.Module, inputs: list[dict]) -> list[dict]:
    """Per decoder layer: ``isolated`` and ``cumulative`` relative error of FP8 vs the reference."""
    from .model import rope_cos_sin

    n = ref.config.text.num_hidden_layers
    num_iso, num_cum, den = [0.0] * n, [0.0] * n, [0.0] * n
    for inp in inputs:
        _, _, h_ref = ref(**inp, return_hidden=True)
        _, _, h_q = fp8(**inp, return_hidden=True)
        S = h_ref[0].shape[1]
        pos = torch.arange(S)[None]
        cos, sin = rope_cos_sin(pos, ref.config.text, h_ref[0].dtype)
        for i in range(n):
            iso = fp8.model.language_model.layers[i](h_ref[i], cos, sin, pos, None)
            den[i] += float(h_ref[i + 1].double().norm() ** 2)
            num_iso[i] += float((iso.double() - h_ref[i + 1].double()).norm() ** 2)
            num_cum[i] += float((h_q[i + 1].double() - h_ref[i + 1].double()).norm() ** 2)
    return [{"layer": i, "variant": ref.config.text.layer_variant(i), "isolated": (num_iso[i] / den[i]) ** 0.5,
             "cumulative": (num_cum[i] / den[i]) ** 0.5} for i in range(n)]


# -- streaming conversion -----------------------------------------------------------------------
#
# A safetensors file is ``u64 header length | JSON header {name: {dtype, shape, data_offsets}} |
# raw bytes``. The output header is known from the input header alone (codes keep the shape, the
# scales are ``[..., rows, 1]`` fp32), so it is written first and every tensor's bytes are then
# streamed to its offset: no output dict, no whole-tensor copy, no second pass.

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
             "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_FLOATS = ("F64", "F32", "F16", "BF16")
_ITEMSIZE = {k: torch.empty(0, dtype=v).element_size() for k, v in ST_DTYPES.items()}


def read_safetensors_header(path: str | Path) -> tuple[dict, int]:
    """``(header without __metadata__, byte offset where the data starts)``."""
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


_MASK = {torch.int16: 0x7FFF, torch.int32: 0x7FFFFFFF}
_SUB_BYTES = 1 << 20  # input rows per torch op: ops on L2-sized blocks run ~3x faster than on 64 MiB ones
_DEPTH = 2  # read buffers per shard: one being filled by the reader while the other is quantized


class _RowQuantizer:
    """Per-row E4M3 of blocks of rows of one ``[rows, cols]`` tensor, bit-identical to
    :func:`quantize_weight` (no scale given); temporaries for ``sub_rows`` rows are allocated once.

    * ``amax |x|`` is the integer max of the sign-cleared bit patterns: non-negative IEEE floats order
      like their bits, so it is exact (inf and NaN patterns sort above every finite value), and it
      reads bf16/f16 as 2 bytes instead of widening to fp32 first (5x faster than abs + amax).
      f64 rounds to fp32 first, as the reference's ``w.float()`` does (rounding is monotone).
    * ``x / scale`` divides in fp32: a bf16/f16 input promotes exactly, so it is ``w.float() / scale``.
    * The ``clamp(±448)`` of the reference is left out: with ``scale = amax / 448`` every
      ``|x / scale|`` is at most 448 plus one fp32 rounding, and E4M3 rounds anything below 480 to 448.
    * The fp32 → E4M3 cast is the cost that is left (torch converts it element by element:
      ~65% of the time).
    """

    def __init__(self, dtype: torch.dtype, cols: int, sub_rows: int):
        self.narrow = dtype.itemsize == 2  # bf16 / f16: read in place; f32 / f64 go through the fp32 buffer
        self.f32_RC = torch.empty(sub_rows, cols)
        self.bits_RC = torch.empty(sub_rows, cols, dtype=torch.int16 if self.narrow else torch.int32)
        self.amax_R1 = torch.empty(sub_rows, 1, dtype=self.bits_RC.dtype)

    def __call__(self, x_RC: torch.Tensor, codes_RC: torch.Tensor, scale_R1: torch.Tensor) -> None:
        n = x_RC.shape[0]
        f32, bits, amax = self.f32_RC[:n], self.bits_RC[:n], self.amax_R1[:n]
        if self.narrow:
            src = x_RC
        else:
            src = f32.copy_(x_RC)
        torch.bitwise_and(src.view(bits.dtype), _MASK[bits.dtype], out=bits)
        torch.amax(bits, dim=-1, keepdim=True, out=amax)
        scale_R1.copy_(amax.view(src.dtype)).div_(E4M3_MAX).clamp_min_(1e-12)
        torch.div(src, scale_R1, out=f32)
        codes_RC.copy_(f32)


def convert_shards_fp8(src: str | Path, dst: str | Path, *, min_dims: int = 2, progress=None,
                       chunk_bytes: int = 16 << 20, workers: int = 2) -> dict:
    """Quantize every ``>= min_dims``-D floating tensor of each ``*.safetensors`` in ``src`` to E4M3
    (per output channel, ``name_scale_inv`` fp32 ``[..., rows, 1]`` beside it) into ``dst``; other
    tensors are copied byte for byte. Codes equal :func:`quantize_weight`'s bit for bit.

    Streaming, per shard: the output header is written first; a reader thread ``preadv``\\ s the
    tensors in file order, ``B = min(chunk_bytes, largest tensor)`` bytes of whole rows at a time,
    into one of two reused buffers (the file is read sequentially, ``POSIX_FADV_SEQUENTIAL``), while
    the shard's own thread quantizes the other buffer 1 MiB of rows per torch op and ``pwrite``\\ s
    its codes at their offset; each tensor's scales follow its last block. Nothing is memory-mapped
    or kept, so extra memory per shard in flight is ``2 B`` (read buffers) ``+ B / 2`` (codes)
    ``+ ~3 MiB`` (fp32/bit temporaries) ``+ rows × 4`` (one tensor's scales): under 2× the largest
    tensor for ``workers=1`` (``2.5 B + 3 MiB``, B ≤ the largest tensor; the 16 MiB default keeps it
    at ~43 MiB for any checkpoint with tensors ≥ 22 MiB). ``workers`` shards are converted at once
    (threads: torch ops and file IO release the GIL), each torch op single-threaded (L2-sized blocks
    are faster without intra-op hand-offs); torch's thread count is restored afterwards. Files are
    written as ``<name>.tmp``, fsynced and renamed when complete. Returns byte counts.
    """
    from concurrent.futures import ThreadPoolExecutor

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shards = sorted(src.glob("*.safetensors"))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max(1, min(workers, len(shards) or 1))) as pool:
            stats = list(pool.map(lambda sh: _convert_shard(sh, dst, min_dims, chunk_bytes, progress), shards))
    finally:
        torch.set_num_threads(old_threads)
    return {"bytes_in": sum(x[0] for x in stats), "bytes_out": sum(x[1] for x in stats),
            "largest_tensor_bytes": max((x[2] for x in stats), default=0)}


def _convert_shard(shard: Path, dst: Path, min_dims: int, chunk_bytes: int, progress) -> tuple[int, int, int]:
    header, base = read_safetensors_header(shard)
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    # output entries: (name, dtype, shape, source key, role); widest dtypes first keeps every
    # tensor naturally aligned (all sizes are multiples of their itemsize)
    outs = []
    for k, h in entries:
        if h["dtype"] in _FLOATS and len(h["shape"]) >= min_dims and 0 not in h["shape"]:
            outs.append((k, "F8_E4M3", h["shape"], k, "codes"))
            outs.append((k + "_scale_inv", "F32", [*h["shape"][:-1], 1], k, "scale"))
        else:
            outs.append((k, h["dtype"], h["shape"], k, "copy"))
    outs.sort(key=lambda o: -_ITEMSIZE[o[1]])
    out_header, off, where = {"__metadata__": {"format": "pt"}}, 0, {}
    for name, dt, shape, key, role in outs:
        size = _ITEMSIZE[dt] * math.prod(shape)
        out_header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + size]}
        where[(key, role)] = off
        off += size
    hbytes = json.dumps(out_header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    out_base = 8 + len(hbytes)
    # the reader's unit per tensor: whole rows for a converted tensor, any bytes for a copied one
    unit = [h["shape"][-1] * _ITEMSIZE[h["dtype"]] if (k, "codes") in where else 1 for k, h in entries]
    sizes = [h["data_offsets"][1] - h["data_offsets"][0] for _, h in entries]
    bufsize = max([1, *unit, min(chunk_bytes, max(sizes, default=1))])
    tmp = dst / (shard.name + ".tmp")
    fin = os.open(shard, os.O_RDONLY)
    try:
        fout = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except BaseException:
        os.close(fin)
        raise
    try:
        os.posix_fadvise(fin, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        os.pwrite(fout, len(hbytes).to_bytes(8, "little") + hbytes, 0)
        n_out = _stream_tensors(fin, fout, base, out_base, entries, where, unit, bufsize, progress)
        os.fsync(fout)
    except BaseException:
        os.close(fout)
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fin)
    os.close(fout)
    os.replace(tmp, dst / shard.name)
    return sum(sizes), n_out, max(sizes, default=0)


def _stream_tensors(fin: int, fout: int, base: int, out_base: int, entries: list, where: dict, unit: list,
                    bufsize: int, progress) -> int:
    """Three threads, two bounded pools: reader → ``_DEPTH`` input buffers → this thread (quantizes)
    → ``_DEPTH`` codes buffers → writer. Copied tensors go from the reader straight to the writer."""
    import queue
    import threading

    free_in, full, free_codes, pending = queue.Queue(), queue.Queue(), queue.Queue(), queue.Queue()
    for _ in range(_DEPTH):
        free_in.put(bytearray(bufsize))
        free_codes.put(bytearray(bufsize // 2))  # every quantized dtype is at least 2 bytes wide
    stop, write_error = threading.Event(), []

    def read() -> None:
        try:
            for i, (_, h) in enumerate(entries):
                a, b = h["data_offsets"]
                step = bufsize // unit[i] * unit[i]
                for pos in range(0, max(b - a, 1), step):  # one (empty) block for an empty tensor
                    buf = free_in.get()
                    if stop.is_set():
                        return
                    n = min(step, b - a - pos)
                    _pread_exact(fin, memoryview(buf)[:n], base + a + pos)
                    full.put((i, pos, n, buf))
        except BaseException as e:  # handed to the consumer, which re-raises it
            full.put(e)

    def write() -> None:
        while (item := pending.get()) is not None:
            buf, n, off, home = item
            try:
                if n and not write_error:
                    os.pwrite(fout, memoryview(buf)[:n], off)
                    # start writeback now: the kernel would otherwise hold up to dirty_background_ratio
                    # of RAM (GBs) dirty and the final fsync would write it all while nothing else runs
                    os.posix_fadvise(fout, off, n, os.POSIX_FADV_DONTNEED)
            except BaseException as e:  # noqa: BLE001 - re-raised by the consumer; buffers keep flowing
                write_error.append(e)
            home.put(buf)

    threads = [threading.Thread(target=read, name="convert-read", daemon=True),
               threading.Thread(target=write, name="convert-write", daemon=True)]
    for t in threads:
        t.start()
    n_out, quantizer, scales = 0, None, None
    n_blocks = sum(max(1, -(-(h["data_offsets"][1] - h["data_offsets"][0]) // (bufsize // u * u)))
                   for (_, h), u in zip(entries, unit))
    try:
        for _ in range(n_blocks):
            item = full.get()
            if isinstance(item, BaseException):
                raise item
            if write_error:
                raise write_error[0]
            i, pos, n, buf = item
            k, h = entries[i]
            nbytes = h["data_offsets"][1] - h["data_offsets"][0]
            if (k, "copy") in where:
                pending.put((buf, n, out_base + where[(k, "copy")] + pos, free_in))
                n_out += n
            else:
                dtype, cols, isz = ST_DTYPES[h["dtype"]], h["shape"][-1], _ITEMSIZE[h["dtype"]]
                if pos == 0:
                    rows = nbytes // (cols * isz)
                    quantizer = _RowQuantizer(dtype, cols, min(rows, max(1, _SUB_BYTES // (cols * isz))))
                    scales = torch.empty(rows, 1)
                r0, nr = pos // (cols * isz), n // (cols * isz)
                codes = free_codes.get()
                x_RC = torch.frombuffer(buf, dtype=dtype, count=nr * cols).view(nr, cols)
                codes_RC = torch.frombuffer(codes, dtype=torch.uint8, count=nr * cols).view(nr, cols).view(E4M3)
                sub = quantizer.f32_RC.shape[0]
                for s0 in range(0, nr, sub):
                    s1 = min(s0 + sub, nr)
                    quantizer(x_RC[s0:s1], codes_RC[s0:s1], scales[r0 + s0:r0 + s1])
                del x_RC, codes_RC  # no tensor views left on buffers handed on
                free_in.put(buf)
                pending.put((codes, nr * cols, out_base + where[(k, "codes")] + r0 * cols, free_codes))
                if pos + n >= nbytes:  # the tensor's last block: its scales
                    os.pwrite(fout, memoryview(scales.numpy()).cast("B"), out_base + where[(k, "scale")])
                    n_out += nbytes // isz + scales.numel() * 4
                    quantizer = scales = None
            if progress and pos + n >= nbytes:
                progress(k)
    finally:
        stop.set()
        free_in.put(bytearray(0))  # wakes a reader waiting for a buffer
        pending.put(None)
        for t in threads:
            t.join()
    if write_error:
        raise write_error[0]
    return n_out


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise ValueError(f"unexpected end of file at byte {offset + got}")
        got += n
