"""A rank's ``weights.safetensors`` written piece by piece, resumable after a kill.

The file is a standard safetensors file (8-byte header length, JSON header, data). While it is
being written it is ``<name>.partial``: the header's room is reserved up front (zeros), each piece's
tensors are appended to the data in order, and :meth:`StreamingSafetensors.finish` writes the
header into the room, padded with spaces (which the format allows), and renames the file. Each
appended piece is recorded by the caller with its byte range and sha256 (:meth:`append` returns
them), so a resumed build keeps every verified piece and truncates the file after the last one.

A piece is written through a :class:`PieceSink` (:meth:`StreamingSafetensors.piece`, or
:func:`spool_sink` for a worker's spool file): tensors arrive chunk by chunk (dim-0 rows, in
order) and go to the file as they come, so the writer never holds a whole tensor. Inside a piece
tensors are laid out in name order; a tensor whose turn has not come yet (its name sorts after
one still to come) waits in memory until it has.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_DIGITS = 20  # room for any byte offset in the header estimate


def header_room(names_shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    """Bytes to reserve for the JSON header of these tensors (any dtype, any offsets), 8-aligned."""
    n = len(json.dumps({"__metadata__": {"format": "pt"}})) + 16
    for name, shape in names_shapes:
        n += len(json.dumps({name: {"dtype": "F8_E4M3", "shape": list(shape),
                                    "data_offsets": [10 ** _DIGITS, 10 ** _DIGITS]}}))
    return -(-n // 8) * 8


def _raw(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    t = t.detach().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bool):
        t = t.view(torch.uint8)
    return memoryview(t.numpy()).cast("B")


def range_sha256(path: Path, begin: int, end: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(begin)
        left = end - begin
        while left:
            chunk = f.read(min(left, 1 << 22))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


class StreamingSafetensors:
    """``path`` (written as ``path.partial``) with ``room`` header bytes reserved."""

    def __init__(self, path: Path, room: int):
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.room = room
        self.entries: dict[str, dict] = {}
        self.end = 8 + room  # absolute file offset where the next piece's data starts
        path.parent.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        """A fresh file: the header room zeroed."""
        with open(self.partial, "wb") as f:
            f.write(b"\0" * (8 + self.room))
        self.entries, self.end = {}, 8 + self.room

    def keep(self, records: list[dict]) -> int:
        """Resume: keep the longest run of ``records`` (in order) whose bytes verify; truncate after it.
        Returns how many were kept."""
        if not self.partial.is_file():
            self.start()
            return 0
        kept = 0
        self.entries, self.end = {}, 8 + self.room
        for rec in records:
            if rec["begin"] != self.end or rec["end"] > self.partial.stat().st_size \
                    or range_sha256(self.partial, rec["begin"], rec["end"]) != rec["sha256"]:
                break
            self.entries.update(rec["tensors"])
            self.end = rec["end"]
            kept += 1
        with open(self.partial, "r+b") as f:
            f.truncate(self.end)
        return kept

    def piece(self, names: list[str]) -> "PieceSink":
        """A sink for the next piece's tensors ``names``, appended after the last piece;
        :meth:`commit` its :meth:`PieceSink.close` record."""
        for name in names:
            if name in self.entries:
                raise RuntimeError(f"{self.path}: tensor {name} written twice")
        return PieceSink(open(self.partial, "r+b"), self.end, 8 + self.room, names)

    def commit(self, rec: dict) -> dict:
        """Take a finished piece's record (its bytes are in the file from ``begin`` to ``end``)."""
        self.entries.update(rec["tensors"])
        self.end = rec["end"]
        return rec

    def append(self, tensors: dict[str, torch.Tensor]) -> dict:
        """Append ``tensors`` (sorted by name); returns the record ``{begin, end, sha256, tensors}``."""
        sink = self.piece(list(tensors))
        for name, t in tensors.items():
            sink.write(name, t)
            sink.done(name)
        return self.commit(sink.close())

    def append_spooled(self, spool: str | Path, entries: dict[str, dict]) -> dict:
        """Append a spool file's bytes (:func:`spool_tensors`); same record as :meth:`append`."""
        h = hashlib.sha256()
        begin = self.end
        base = 8 + self.room
        with open(spool, "rb") as src, open(self.partial, "r+b") as f:
            f.seek(begin)
            while chunk := src.read(1 << 22):
                f.write(chunk)
                h.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        out = {}
        for name, e in entries.items():
            if name in self.entries:
                raise RuntimeError(f"{self.path}: tensor {name} written twice")
            a, b = e["data_offsets"]
            out[name] = {**e, "data_offsets": [begin - base + a, begin - base + b]}
        end = begin + sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values())
        if end - begin != Path(spool).stat().st_size:
            raise RuntimeError(f"{spool}: its size does not match its tensors")
        self.entries.update(out)
        self.end = end
        return {"begin": begin, "end": end, "sha256": h.hexdigest(), "tensors": out}

    def finish(self) -> Path:
        """Write the header into its room and rename the file into place."""
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        if len(header) > self.room:
            raise RuntimeError(f"{self.path}: header of {len(header)} bytes exceeds its reserved {self.room}")
        with open(self.partial, "r+b") as f:
            f.write(struct.pack("<Q", self.room) + header + b" " * (self.room - len(header)))
            f.flush()
            os.fsync(f.fileno())
        self.partial.rename(self.path)
        return self.path


def spool_sink(path: Path, names: list[str]) -> "PieceSink":
    """A sink writing a piece's tensors to spool file ``path``; its record's tensors (offsets relative
    to the spool file) are what :meth:`StreamingSafetensors.append_spooled` takes."""
    return PieceSink(open(path, "wb"), 0, 0, names, fsync=False)


def spool_tensors(tensors: dict[str, torch.Tensor], path: Path) -> tuple[str, dict[str, dict]]:
    """``tensors`` (sorted by name) as raw bytes in ``path``; returns ``(path, entries)``."""
    sink = spool_sink(path, list(tensors))
    for name, t in tensors.items():
        sink.write(name, t)
        sink.done(name)
    return str(path), sink.close()["tensors"]


class PieceSink:
    """One piece's tensors ``names`` written to open file ``f`` from byte ``begin``, in name order.

    :meth:`write` takes a tensor's next chunk of dim-0 rows (all chunks of one tensor share their
    trailing shape and dtype), :meth:`done` ends it. The tensor whose turn it is goes straight to
    the file; one whose turn has not come is held until it has. Offsets are relative to ``base``
    (the start of the safetensors data section). :meth:`close` flushes (and fsyncs) the file and
    returns the record ``{begin, end, sha256, tensors}``.
    """

    def __init__(self, f, begin: int, base: int, names: list[str], fsync: bool = True):
        self.f, self.begin, self.base, self.fsync = f, begin, base, fsync
        self.order = sorted(names)
        self.next = 0  # index in order of the tensor whose bytes go to the file now
        self.pos = begin
        self.h = hashlib.sha256()
        self.entries: dict[str, dict] = {}
        self.meta: dict[str, list] = {}  # name -> [dtype, trailing shape (None: 0-dim), rows, start offset]
        self.held: dict[str, list[bytes]] = {}
        self.finished: set[str] = set()
        f.seek(begin)

    def write(self, name: str, chunk: torch.Tensor) -> None:
        if name not in self.order or name in self.finished:
            raise RuntimeError(f"tensor {name}: not expected in this piece (or written after it was done)")
        trail = tuple(chunk.shape[1:]) if chunk.dim() else None  # None: a 0-dim tensor
        m = self.meta.get(name)
        if m is None:
            m = self.meta[name] = [chunk.dtype, trail, 0, None]
        elif (chunk.dtype, trail) != (m[0], m[1]) or trail is None:
            raise RuntimeError(f"tensor {name}: chunk {chunk.dtype} {tuple(chunk.shape)} does not continue "
                               f"{m[0]} [..., {m[1]}]")
        m[2] += chunk.shape[0] if chunk.dim() else 1
        raw = _raw(chunk)
        if self.order[self.next] == name:
            self._emit(name, raw)
        else:
            self.held.setdefault(name, []).append(bytes(raw))

    def _emit(self, name: str, raw) -> None:
        if self.meta[name][3] is None:
            self.meta[name][3] = self.pos
        self.f.write(raw)
        self.h.update(raw)
        self.pos += raw.nbytes if isinstance(raw, memoryview) else len(raw)

    def done(self, name: str) -> None:
        self.finished.add(name)
        while self.next < len(self.order) and self.order[self.next] in self.finished:
            cur = self.order[self.next]
            for raw in self.held.pop(cur, []):
                self._emit(cur, raw)
            dtype, trail, rows, start = self.meta[cur]
            start = self.pos if start is None else start
            shape = [] if trail is None else [rows, *trail]
            self.entries[cur] = {"dtype": ST_DTYPES[dtype], "shape": shape,
                                 "data_offsets": [start - self.base, self.pos - self.base]}
            self.next += 1
            if self.next < len(self.order) and self.order[self.next] in self.held:
                for raw in self.held.pop(self.order[self.next]):
                    self._emit(self.order[self.next], raw)

    def close(self) -> dict:
        missing = [n for n in self.order if n not in self.entries]
        try:
            if missing:
                raise RuntimeError(f"piece closed before its tensors {missing[:4]} were written")
            self.f.flush()
            if self.fsync:
                os.fsync(self.f.fileno())
        finally:
            self.f.close()
        return {"begin": self.begin, "end": self.pos, "sha256": self.h.hexdigest(), "tensors": self.entries}
