"""A rank's ``weights.safetensors`` written piece by piece, resumable after a kill.

The file is a standard safetensors file (8-byte header length, JSON header, data). While it is
being written it is ``<name>.partial``: the header's room is reserved up front (zeros), each piece's
tensors are appended to the data in order, and :meth:`StreamingSafetensors.finish` writes the
header into the room, padded with spaces (which the format allows), and renames the file. Each
appended piece is recorded by the caller with its byte range and sha256 (:meth:`append` returns
them), so a resumed build keeps every verified piece and truncates the file after the last one.
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

    def append(self, tensors: dict[str, torch.Tensor]) -> dict:
        """Append ``tensors`` (sorted by name); returns the record ``{begin, end, sha256, tensors}``."""
        h = hashlib.sha256()
        begin = self.end
        entries = {}
        with open(self.partial, "r+b") as f:
            f.seek(begin)
            pos = begin
            for name in sorted(tensors):
                t = tensors[name]
                if name in self.entries:
                    raise RuntimeError(f"{self.path}: tensor {name} written twice")
                raw = _raw(t)
                f.write(raw)
                h.update(raw)
                base = 8 + self.room
                entries[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                                 "data_offsets": [pos - base, pos - base + raw.nbytes]}
                pos += raw.nbytes
            f.flush()
            os.fsync(f.fileno())
        self.entries.update(entries)
        self.end = pos
        return {"begin": begin, "end": pos, "sha256": h.hexdigest(), "tensors": entries}

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


def spool_tensors(tensors: dict[str, torch.Tensor], path: Path) -> tuple[str, dict[str, dict]]:
    """``tensors`` (sorted by name) as raw bytes in ``path``; returns ``(path, entries)`` with offsets
    relative to the file (what :meth:`StreamingSafetensors.append_spooled` takes)."""
    entries, pos = {}, 0
    with open(path, "wb") as f:
        for name in sorted(tensors):
            raw = _raw(tensors[name])
            f.write(raw)
            entries[name] = {"dtype": ST_DTYPES[tensors[name].dtype], "shape": list(tensors[name].shape),
                             "data_offsets": [pos, pos + raw.nbytes]}
            pos += raw.nbytes
    return str(path), entries
