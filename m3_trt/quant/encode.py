"""Streaming FP8 conversion of safetensors shards (``m3-trt build-engine`` and the benchmark).

One shard and one tensor at a time: each output header is written first, then each tensor's rows
are read, quantized to E4M3 per output channel (the same codes as :func:`m3_trt.quant.fp8.quantize_weight`)
and written at their offset, by a reader, a quantizer and a writer thread per shard.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

import torch

from m3_trt.quant.fp8 import E4M3, E4M3_MAX

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
_DEPTH = 2  # input and codes buffers per shard: one is filled while the other is consumed


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
    * ``x / scale`` and the E4M3 rounding run fused in a small C kernel (:func:`_c_kernel`, ~4x the
      torch div + cast, which converts element by element) when a C compiler is there and the kernel
      passes its self-check; otherwise in torch.
    """

    def __init__(self, dtype: torch.dtype, cols: int, sub_rows: int, work: torch.Tensor | None = None):
        """``work``: optional uint8 scratch of at least ``sub_rows × cols × 8`` bytes to carve the
        temporaries from (one per shard, so tensors after the first allocate nothing)."""
        self.narrow = dtype.itemsize == 2  # bf16 / f16: read in place; f32 / f64 go through the fp32 buffer
        bits_dtype = torch.int16 if self.narrow else torch.int32
        n = sub_rows * cols
        if work is None:
            work = torch.empty(n * 8, dtype=torch.uint8)
        self.f32_RC = work[:n * 4].view(torch.float32).view(sub_rows, cols)
        self.bits_RC = work[n * 4:n * (4 + bits_dtype.itemsize)].view(bits_dtype).view(sub_rows, cols)
        self.amax_R1 = torch.empty(sub_rows, 1, dtype=bits_dtype)

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
        lib = _c_kernel() if self.narrow else None
        if lib is not None and x_RC.is_contiguous() and codes_RC.is_contiguous() and scale_R1.is_contiguous():
            fn = lib.m3_e4m3_rows_bf16 if x_RC.dtype == torch.bfloat16 else lib.m3_e4m3_rows_f16
            fn(x_RC.data_ptr(), scale_R1.data_ptr(), n, x_RC.shape[1], codes_RC.data_ptr())
            return
        torch.div(src, scale_R1, out=f32)
        codes_RC.copy_(f32)


# -- fused C kernel: q = x / scale, then E4M3 exactly as torch's cast of the clamped q -------------
#
# Reference (the spec): ``(x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)``. The encoder
# is c10's ``fp8e4m3fn_from_fp32_value`` made branch-free (so gcc vectorizes it): round to nearest
# even in the integer domain for normals, a float add of 2^14 for subnormals (the FPU rounds), a
# saturation to 448 (= the clamp; the torch cast itself saturates too) and NaN -> 0x7F | sign. The
# division is one IEEE fp32 division, as torch's. Checked against torch on every fp32 pattern
# (2^32: 0 mismatches, torch 2.14) offline; at load, on every bf16 and fp16 pattern × a few scales.
_C_SRC = r"""
#include <stdint.h>
#include <string.h>
static inline uint8_t enc(float f) {
  uint32_t b, sign; memcpy(&b, &f, 4); sign = b & 0x80000000u; b ^= sign;
  float a, m, d; uint32_t db, m_bits = 141u << 23;  /* 2^14: its fp32 ulp is E4M3's 2^-9 */
  memcpy(&a, &b, 4); memcpy(&m, &m_bits, 4); d = a + m; memcpy(&db, &d, 4);
  uint32_t sub = db - m_bits;
  uint32_t nrm = (b + ((uint32_t)(7 - 127) << 23) + 0x7FFFFu + ((b >> 20) & 1u)) >> 20;
  uint32_t r = b < (121u << 23) ? sub : (nrm > 0x7Eu ? 0x7Eu : nrm);
  r = b > 0x7F800000u ? 0x7Fu : r;
  return (uint8_t)(r | (sign >> 24));
}
static inline float bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
void m3_e4m3_rows_bf16(const uint16_t *x, const float *scale, int64_t rows, int64_t cols, uint8_t *out) {
  for (int64_t r = 0; r < rows; r++) {
    const float s = scale[r]; const uint16_t *xr = x + r * cols; uint8_t *o = out + r * cols;
    for (int64_t c = 0; c < cols; c++) o[c] = enc(bf16(xr[c]) / s);
  }
}
void m3_e4m3_rows_f16(const _Float16 *x, const float *scale, int64_t rows, int64_t cols, uint8_t *out) {
  for (int64_t r = 0; r < rows; r++) {
    const float s = scale[r]; const _Float16 *xr = x + r * cols; uint8_t *o = out + r * cols;
    for (int64_t c = 0; c < cols; c++) o[c] = enc((float)xr[c] / s);
  }
}
"""
_C_LIB: list = []  # [lib or None] once tried
_C_LOCK = threading.Lock()


def _c_kernel():
    """The fused kernel as a ``ctypes.CDLL`` (calls release the GIL), or ``None``.

    Built once per process on first use with ``cc -O3 -march=native`` (~0.2 s) in a fresh private
    temporary folder (``mkdtemp``: mode 0700, ours), loaded from there, and the folder removed at
    once (the mapping stays). Nothing is loaded from a shared or persistent cache: a library planted
    there would run its constructor at ``dlopen``, before any check. The kernel is kept only if it
    equals the torch reference on every bf16 and fp16 bit pattern at several scales (inf, NaN,
    saturation, subnormals, signed zeros included). ``None`` (torch path) without a compiler, on
    x86 without ``_Float16``, or with ``M3_TRT_NO_CKERNEL=1``.
    """
    with _C_LOCK:
        if not _C_LIB:
            _C_LIB.append(None if os.environ.get("M3_TRT_NO_CKERNEL") == "1" else _build_c_kernel())
        return _C_LIB[0]


def _build_c_kernel():
    import ctypes
    import shutil
    import subprocess
    import tempfile

    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="m3_trt-e4m3-") as d:  # mkdtemp: 0700, owned by us
            src, so = Path(d) / "k.c", Path(d) / "k.so"
            src.write_text(_C_SRC)
            subprocess.run([cc, "-O3", "-march=native", "-fPIC", "-shared", "-o", str(so), str(src)],
                           check=True, capture_output=True, timeout=120)
            lib = ctypes.CDLL(str(so))
    except (OSError, subprocess.SubprocessError):
        return None
    for fn in (lib.m3_e4m3_rows_bf16, lib.m3_e4m3_rows_f16):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        fn.restype = None
    return lib if _c_kernel_matches_torch(lib) else None


def _c_kernel_matches_torch(lib) -> bool:
    """Every bf16 and every fp16 bit pattern (one row each) × scales, against the reference."""
    scales = torch.tensor([1.0, 1 / 448, 3.0e38 / 448, 1e-12, 2.0**-20, 0.3071, 7.5e4, float("inf"), float("nan")])
    pats = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    for dtype, fn in ((torch.bfloat16, lib.m3_e4m3_rows_bf16), (torch.float16, lib.m3_e4m3_rows_f16)):
        x_RC = pats.view(dtype).expand(len(scales), -1).contiguous()
        scale_R1 = scales.view(-1, 1).contiguous()
        ref = (x_RC.float() / scale_R1).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).view(torch.uint8)
        got = torch.empty_like(ref)
        fn(x_RC.data_ptr(), scale_R1.data_ptr(), x_RC.shape[0], x_RC.shape[1], got.data_ptr())
        if not torch.equal(got, ref):
            return False
    return True


def convert_shards_fp8(src: str | Path, dst: str | Path, *, min_dims: int = 2, progress=None,
                       chunk_bytes: int = 1 << 20, workers: int = 4) -> dict:
    """Quantize every ``>= min_dims``-D floating tensor of each ``*.safetensors`` in ``src`` to E4M3
    (per output channel, ``name_scale_inv`` fp32 ``[..., rows, 1]`` beside it) into ``dst``; other
    tensors are copied byte for byte. Codes equal :func:`quantize_weight`'s bit for bit.

    Streaming, per shard, three threads: the output header is written first; a reader ``preadv``\\ s
    the tensors in file order (``POSIX_FADV_SEQUENTIAL``), ``B`` bytes of whole rows at a time, into
    one of two input buffers; the shard's thread quantizes a filled buffer 1 MiB of rows per torch
    op into one of two codes buffers (``B / 2``); a writer ``pwrite``\\ s the codes at their offset
    and starts their writeback at once, so the closing ``fsync`` finds little left to write. Each
    tensor's scales follow its last block. Nothing is memory-mapped or kept.

    ``B = min(chunk_bytes, L / (2 × workers))`` for the shard's largest tensor ``L`` (at least one
    row). The 1 MiB default is the fastest measured (2-core VM, cold): a block just read is still in
    L2 when it is quantized; 16 MiB blocks were ~30% slower end to end, not faster.
    With the fused C quantizer the conversion is IO-bound cold; 4 workers (4 shards' reads and
    writes in flight) measured 0.56 of the cold plain-read speed, 2 workers 0.44 (2-core VM).
    Memory bound: the buffers of all shards in flight take ``workers × 3 B ≤ 1.5 L``, plus per shard
    the fp32/bit temporaries (8 bytes per element of a 1 MiB block of rows: ≤ 4 MiB) and one tensor's
    scales (``rows × 4`` bytes) — with the defaults, ~30 MiB for 4 workers whatever the checkpoint.

    ``workers`` shards are converted at once; torch ops and file IO release the GIL, each torch op
    runs single-threaded (L2-sized blocks are faster without intra-op hand-offs); torch's thread
    count is restored afterwards. Files are written as ``<name>.tmp``, fsynced and renamed when
    complete. Returns byte counts.
    """
    from concurrent.futures import ThreadPoolExecutor

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shards = sorted(src.glob("*.safetensors"))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max(1, min(workers, len(shards) or 1))) as pool:
            stats = list(pool.map(lambda sh: _convert_shard(sh, dst, min_dims, chunk_bytes, workers, progress),
                                   shards))
    finally:
        torch.set_num_threads(old_threads)
    return {"bytes_in": sum(x[0] for x in stats), "bytes_out": sum(x[1] for x in stats),
            "largest_tensor_bytes": max((x[2] for x in stats), default=0)}


def _convert_shard(shard: Path, dst: Path, min_dims: int, chunk_bytes: int, workers: int,
                   progress) -> tuple[int, int, int]:
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
    bufsize = max([1, *unit, min(chunk_bytes, max(sizes, default=1) // (2 * max(1, workers)))])
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
    sub_rows = [min(math.prod(h["shape"][:-1]), max(1, _SUB_BYTES // u)) if (k, "codes") in where else 0
                for (k, h), u in zip(entries, unit)]
    work = torch.empty(max((r * h["shape"][-1] for r, (_, h) in zip(sub_rows, entries)), default=0) * 8,
                       dtype=torch.uint8)  # fp32 + bit temporaries, shared by the shard's tensors
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
                    quantizer = _RowQuantizer(dtype, cols, sub_rows[i], work)
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
