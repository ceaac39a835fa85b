"""Tensor-at-a-time rank weights: range slices equal shard_tensor, chunking changes no byte, the
piece sink writes what safetensors reads, chunked reads refuse NaN weights and codes by key, and
at full width b200x8-fp8 keeps every scale block.

Negative controls: another rank's ranges differ from this rank's slice; a tiny-width TP split
cuts MXFP8 blocks (so the full-width check can fail); a chunk that does not continue its tensor is
refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import m3_trt.model.pieces as pieces
from m3_trt.build.builder import build
from m3_trt.build.slicing import block_ranges, check_selection, selection, take
from m3_trt.build.targets import load_target
from m3_trt.build.weights_file import StreamingSafetensors, header_room
from m3_trt.model import config as cfgmod
from m3_trt.model.checkpoint import CheckpointError
from m3_trt.model.modeling import M3ForConditionalGeneration
from m3_trt.model.pieces import PieceModel
from m3_trt.model.shard import Layout, shard_tensor
from m3_trt.quant.fp8 import is_fp8_weight
from test_native_fp8 import make_mxfp8  # tests/engines is on the path (rootdir-relative test modules)

LAYOUTS = [(1, 1), (2, 2), (1, 2), (4, 2), (4, 4)]  # (tp, ep)


def _meta(cfg) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return dict(M3ForConditionalGeneration(cfg).state_dict())


@pytest.mark.parametrize("tp,ep", LAYOUTS, ids=[f"tp{t}-ep{e}" for t, e in LAYOUTS])
def test_range_selection_cut_in_chunks_equals_shard_tensor(tp, ep):
    cfg = cfgmod.tiny()
    lay = Layout.of(tp, ep)
    g = torch.Generator().manual_seed(0)
    for name, m in _meta(cfg).items():
        t = torch.randn(m.shape, generator=g)
        for r in range(lay.world):
            sel = selection(name, tuple(t.shape), cfg.text, lay, r)
            check_selection(name, m, sel, cfg.text, lay, r)
            want = shard_tensor(name, t, cfg.text, lay, r)
            if t.dim() == 0:
                assert torch.equal(take(t, sel, 0, 1), want)
                continue
            for step in (1, 3, t.shape[0]):
                parts = [take(t[a:a + step], sel, a, min(a + step, t.shape[0])) for a in range(0, t.shape[0], step)]
                got = torch.cat([p for p in parts if p is not None])
                assert torch.equal(got, want), (name, r, step)
            # negative control: cut with the ranges of a rank that holds another part (KV heads replicate)
            others = [s for o in range(lay.world) if (s := selection(name, tuple(t.shape), cfg.text, lay, o)) != sel]
            if others:
                alt = take(t, others[0], 0, t.shape[0])
                assert alt.shape != want.shape or not torch.equal(alt, want), (name, r)


def test_full_width_b200x8_fp8_keeps_every_scale_block():
    """At the real widths, every TP/EP cut of every FP8 weight of b200x8-fp8 (TP8, EP8) falls on an
    MXFP8 [1, 32] and a 128x128 block boundary: a native build re-blocks nothing."""
    cfg = cfgmod.full_size()
    lay = Layout.of(8, 8)
    meta = _meta(cfg)
    names = [k for k, v in meta.items() if is_fp8_weight(k, v) and (".layers.0." in k or ".layers.3." in k)]
    checked = 0
    for name in names:
        shape = tuple(meta[name].shape)
        for r in range(lay.world):
            sel = selection(name, shape, cfg.text, lay, r)
            check_selection(name, meta[name], sel, cfg.text, lay, r)
            for block in ((1, 32), (128, 128)):
                for d, blk in zip((len(shape) - 2, len(shape) - 1), block):
                    assert block_ranges(sel[d], blk)[1] == blk, (name, r, block)
                    checked += 1
    assert checked > 500
    # negative control: at the tiny width TP2 cuts the dense down_proj's 96 columns into 48 (blocks of 16)
    tiny = cfgmod.tiny()
    sel = selection("model.language_model.layers.0.mlp.down_proj.weight", (64, 96), tiny.text, Layout.of(2, 2), 1)
    assert block_ranges(sel[1], 32) == ([(1, 2), (2, 3), (2, 3)], 16)


def test_piece_sink_writes_chunks_in_name_order_readable_by_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    # "a.w_scale_inv" sorts after "a.w2_scale_inv" while "a.w" sorts before "a.w2": the sink holds one
    tensors = {"a.w2_scale_inv": torch.randn(5, 3, generator=g), "a.w_scale_inv": torch.randn(4, 3, generator=g),
               "b": torch.randn(7, generator=g).to(torch.bfloat16), "c": torch.tensor(2.5)}
    names = list(tensors)
    f = StreamingSafetensors(tmp_path / "x.safetensors", header_room([(k, tuple(v.shape)) for k, v in tensors.items()]))
    f.start()
    sink = f.piece(names)
    for name in ("a.w_scale_inv", "a.w2_scale_inv", "b", "c"):  # production order != file order
        t = tensors[name]
        for a in range(0, max(t.shape[0], 1) if t.dim() else 1, 2):
            sink.write(name, t[a:a + 2] if t.dim() else t)
        sink.done(name)
    rec = f.commit(sink.close())
    f.finish()
    got = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(got[k], tensors[k]) for k in tensors) and set(got) == set(tensors)
    starts = sorted((v["data_offsets"][0], k) for k, v in rec["tensors"].items())
    assert [k for _, k in starts] == sorted(tensors)  # laid out in name order
    # negative control: a chunk that does not continue its tensor's trailing shape is refused
    f2 = StreamingSafetensors(tmp_path / "y.safetensors", 4096)
    f2.start()
    s2 = f2.piece(["m"])
    s2.write("m", torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="does not continue"):
        s2.write("m", torch.zeros(2, 4))


def _tree(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.rglob("*.safetensors")):
        h.update(str(f.relative_to(d)).encode() + f.read_bytes())
    return h.hexdigest()


def test_chunk_size_changes_no_byte(tiny_ckpt, tmp_path, monkeypatch):
    """Rows read 37 values at a time (fused halves and experts cut mid-way, many chunks per tensor)
    give the rank files of a default-chunk build (one chunk per tiny tensor): bf16 weights over TP4/EP2."""
    sets = {"onnx": False, "weight_dtype": "bf16", "dtype": "bf16", "tp": 4, "ep": 2}
    build(tiny_ckpt, load_target("cpu", sets), tmp_path / "whole", progress=False)
    monkeypatch.setattr(pieces, "CHUNK_ELEMS", 37)
    build(tiny_ckpt, load_target("cpu", sets), tmp_path / "chunked", progress=False)
    assert _tree(tmp_path / "chunked") == _tree(tmp_path / "whole")
    # negative control: the hash sees one changed byte
    f = tmp_path / "chunked" / "rank3" / "weights.safetensors"
    b = bytearray(f.read_bytes())
    b[-3] ^= 1
    f.write_bytes(bytes(b))
    assert _tree(tmp_path / "chunked") != _tree(tmp_path / "whole")


def test_chunked_reads_name_a_non_finite_weight_and_a_nan_code(tiny_ckpt, tmp_path):
    """The build's chunked reads keep the loader's rule: a NaN (bf16) or a NaN E4M3 code is a
    CheckpointError naming the key; the untouched checkpoint reads (negative control)."""
    key = "language_model.model.layers.1.block_sparse_moe.experts.3.w1.weight"
    target = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    for fmt in ("bf16", "mxfp8"):
        ck = tmp_path / fmt
        shutil.copytree(tiny_ckpt, ck) if fmt == "bf16" else make_mxfp8(tiny_ckpt, ck)
        pm = PieceModel(ck)
        entries = pm.reader.parameters("layer.1")[target]
        block = pm.reader.native_block(entries)
        assert (block is None) == (fmt == "bf16")
        read = (lambda: pm.reader.read_rows(target, entries, 0, 8)) if block is None else \
            (lambda: pm.reader.read_fp8_rows(target, entries, 0, 8, block))
        read()  # negative control: the clean checkpoint reads
        shard = ck / json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"][key]
        tensors = load_file(str(shard))
        if fmt == "bf16":
            tensors[key][2, 3] = float("nan")
        else:
            tensors[key].view(torch.uint8)[2, 3] = 0xFF  # E4M3 NaN
        save_file(tensors, str(shard), metadata={"format": "pt"})
        pm = PieceModel(ck)
        with pytest.raises(Exception, match=f"{key}: contains non-finite") as e:
            (pm.reader.read_rows(target, entries, 0, 8) if block is None
             else pm.reader.read_fp8_rows(target, entries, 0, 8, block))
        assert e.type is CheckpointError
