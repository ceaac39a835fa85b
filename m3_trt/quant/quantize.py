"""``m3-trt quantize``: a bf16 checkpoint becomes an FP8 checkpoint in the same Hugging Face layout.

Two formats, both E4M3 codes with a sibling ``<name>_scale_inv`` that *multiplies* the codes
(what transformers' ``Fp8Dequantize`` and :func:`m3_trt.model.checkpoint.dequantize_fp8` compute):

* ``mxfp8``: one E8M0 exponent per 32 consecutive values of a row, stored as uint8 ``[rows,
  cols/32]`` (scale ``2**(byte - 127)``) — the format the real M3 checkpoint ships. The exponent
  is ``ceil(log2(amax / 448))``: the largest value of the block lands at or below E4M3's 448, so
  nothing saturates (OCP's ``floor(log2 amax) - 8`` can clip the top of a block by up to 12%).
* ``fp8-block``: one float32 scale ``amax / 448`` per 128×128 block, ``[ceil(rows/128),
  ceil(cols/128)]`` (DeepSeek-V3 / MiniMax-M2 style). Loaders derive the block from the scale
  grid, so a dimension must be ≤ 128 (one block) or a multiple of 128; anything else is refused
  by name rather than written with a block the readers would disagree about.

Which tensors are quantized mirrors the real MiniMax checkpoints (and :func:`m3_trt.quant.fp8.is_fp8_weight`,
the rule the FP8 build uses): every 2-D weight of a decoder layer — attention and indexer
projections, dense MLP, shared and routed experts. The router (``block_sparse_moe.gate``), norms,
``e_score_correction_bias``, embeddings, LM head, vision tower and projector stay as they are,
and config.json's ``quantization_config.modules_to_not_convert`` says so (:data:`NOT_CONVERTED`).

``--calib FILE`` adds, per decoder layer, the FP8 layer's *output* error on those prompts
(:func:`output_errors`) to ``quantize_report.json``; it does not change a byte of the checkpoint.
That is all a calibration set can legitimately give these formats: block-scaled FP8 checkpoints
declare ``activation_scheme: "dynamic"`` (activations quantized per token-group at run time) —
vLLM's ``Fp8Config`` refuses ``"static"`` with ``weight_block_size`` ("The block-wise quantization
only supports dynamic activation scheme"), and transformers 5.23 on a CPU dequantizes the weights
and has no use for activation scales (on a GPU its static path wants ``activation_scale`` tensors,
not vLLM's ``input_scale``). So no static activation scales are written.

Writing streams: :class:`ShardedWriter` plans every shard's header from the tensor specs before a
byte is written, then each tensor (or row chunk of one) goes to its offset — memory holds one
tensor (or one chunk) at a time, never a shard.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from m3_trt.model.checkpoint import FP8_DTYPES, SCALE_SUFFIX, SafetensorsCheckpoint, dequantize_fp8, map_key
from m3_trt.model.config import M3Config
from m3_trt.options import add_command, opt
from m3_trt.outputs import QUANTIZED, check_output, swap_into_place
from m3_trt.model.pieces import PieceModel
from m3_trt.quant.fp8 import calibration_inputs, calibration_source, is_fp8_weight, layer_output_errors
from m3_trt.quant.encode import ST_DTYPES, read_safetensors_header

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MX_BLOCK = 32
FP8_BLOCK = (128, 128)
FORMATS = ("mxfp8", "fp8-block")
MARKER = "m3_trt_quantize.json"
MARKER_FORMAT = "m3-trt-quantize/1"
# Modules kept in high precision, as transformers' skip-list patterns (matched from the start of its
# module names, regex allowed). Written in its in-memory names: they pass its original->in-memory
# renaming unchanged, whereas bare original prefixes ("vision_tower", "multi_modal_projector")
# match no renaming rule and then no module, and a GPU load would swap those Linears for FP8 ones.
NOT_CONVERTED = ("lm_head", "model.language_model.embed_tokens", "model.vision_tower", "model.multi_modal_projector",
                 r"model.language_model.layers.*.mlp.gate")
DEFAULT_SHARD_BYTES = 5 * 1024**3  # what save_pretrained uses ("5GB")

ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
            E4M3: "F8_E4M3", torch.uint8: "U8", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}


class QuantizeError(ValueError):
    """A checkpoint or tensor this command cannot quantize; the message names it."""


# -- the two formats ----------------------------------------------------------------------------

def quantize_mxfp8(w: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., R, C]`` -> ``(codes E4M3 [..., R, C], scale_inv uint8 E8M0 [..., R, C/32])``."""
    *lead, R, C = w.shape
    if C % MX_BLOCK:
        raise QuantizeError(f"{name}: {C} columns is not a multiple of the MXFP8 block ({MX_BLOCK})")
    blocks = w.float().reshape(*lead, R, C // MX_BLOCK, MX_BLOCK)
    amax = blocks.abs().amax(-1)
    # all-zero blocks get the smallest exponent (byte 0): the codes are 0 whatever it is
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / E4M3_MAX)), torch.full_like(amax, -127.0))
    e = e.clamp(-127, 127)  # byte 255 is E8M0's NaN
    codes = (blocks / torch.exp2(e)[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return codes.reshape(w.shape), (e + 127).to(torch.uint8)


def fp8_block_grid(shape: tuple[int, ...], name: str = "weight") -> tuple[int, int]:
    """Scale grid ``(rows/128, cols/128)`` of a 2-D weight; refuses dims the readers disagree on."""
    grid = []
    for dim, block in zip(shape[-2:], FP8_BLOCK):
        if dim > block and dim % block:
            raise QuantizeError(f"{name}: dimension {dim} of shape {tuple(shape)} is neither <= {block} nor a "
                                f"multiple of {block}; fp8-block readers derive the block from the scale grid "
                                f"and would disagree with a partial last block (use --format mxfp8)")
        grid.append(-(-dim // block))
    return grid[0], grid[1]


def quantize_fp8_block(w: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``w [R, C]`` -> ``(codes E4M3 [R, C], scale_inv float32 [ceil(R/128), ceil(C/128)])``."""
    R, C = w.shape
    gr, gc = fp8_block_grid(w.shape, name)
    blocks = w.float().reshape(gr, R // gr, gc, C // gc)
    scale = (blocks.abs().amax(dim=(1, 3)) / E4M3_MAX).clamp_min(1e-12)
    codes = (blocks / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return codes.reshape(R, C), scale


QUANTIZERS: dict[str, Callable] = {"mxfp8": quantize_mxfp8, "fp8-block": quantize_fp8_block}


def scale_spec(fmt: str, shape: tuple[int, ...], name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """dtype and shape of the ``_scale_inv`` of a ``shape`` weight in ``fmt``."""
    if fmt == "mxfp8":
        if shape[-1] % MX_BLOCK:
            raise QuantizeError(f"{name}: {shape[-1]} columns is not a multiple of the MXFP8 block ({MX_BLOCK})")
        return torch.uint8, (*shape[:-1], shape[-1] // MX_BLOCK)
    return torch.float32, fp8_block_grid(shape, name)


def quantization_config(fmt: str) -> dict:
    """The ``quantization_config`` transformers' fine-grained FP8 loader reads for ``fmt``.

    ``mxfp8`` is transformers' ``quant_method`` alias for fine-grained FP8 with ``[1, 32]`` E8M0
    blocks; ``scale_fmt: ue8m0`` makes a GPU load view the uint8 bytes as ``float8_e8m0fnu``.
    """
    base = {"activation_scheme": "dynamic", "fmt": "e4m3", "modules_to_not_convert": list(NOT_CONVERTED)}
    if fmt == "mxfp8":
        return {"quant_method": "mxfp8", "weight_block_size": [1, MX_BLOCK], "scale_fmt": "ue8m0", **base}
    if fmt == "fp8-block":
        return {"quant_method": "fp8", "weight_block_size": list(FP8_BLOCK), "scale_fmt": "float", **base}
    raise QuantizeError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def is_quantized_key(key: str, shape: tuple[int, ...]) -> bool:
    """Whether the real checkpoints store ``key`` (original layout) as FP8: decoder-layer 2-D weights
    except the router — the same rule as the FP8 build (:func:`m3_trt.quant.fp8.is_fp8_weight`)."""
    hit = map_key(key)
    if hit is None or not key.endswith(".weight"):
        return False
    return is_fp8_weight(hit[0], torch.empty(shape, device="meta"))


# -- streaming sharded writer -------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


class ShardedWriter:
    """``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, headers planned up front.

    ``write(name, tensor, row=0)`` puts ``tensor`` (the whole tensor, or rows ``row..`` of dim 0)
    at its offset; :meth:`close` checks every byte of every tensor was written exactly once.
    """

    def __init__(self, out: Path, specs: Iterable[TensorSpec], max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out = Path(out)
        specs = list(specs)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the shard plan")
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for s in specs:
            if s.dtype not in ST_DTYPE:
                raise ValueError(f"{s.name}: dtype {s.dtype} has no safetensors name")
            if shards[-1] and size + s.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(s)
            size += s.nbytes
        n = len(shards)
        self.where: dict[str, tuple[str, int, TensorSpec]] = {}  # name -> (file, absolute offset, spec)
        self.files: list[str] = []
        self._headers: dict[str, bytes] = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header, off = {"__metadata__": {"format": "pt"}}, 0
            for s in shard:
                header[s.name] = {"dtype": ST_DTYPE[s.dtype], "shape": list(s.shape),
                                  "data_offsets": [off, off + s.nbytes]}
                off += s.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
            base = 8 + len(raw)
            for s in shard:
                self.where[s.name] = (fname, base + header[s.name]["data_offsets"][0], s)
            self._headers[fname] = struct.pack("<Q", len(raw)) + raw
            self.files.append(fname)
        self.written: dict[str, int] = {k: 0 for k in self.where}
        self._fh: dict[str, object] = {}

    def _handle(self, fname: str):
        if fname not in self._fh:
            f = open(self.out / fname, "wb")
            f.write(self._headers[fname])
            self._fh[fname] = f
        return self._fh[fname]

    def write(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        if name not in self.where:
            raise KeyError(f"{name}: not in the shard plan")
        fname, offset, spec = self.where[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape[1:]) != spec.shape[1:] or \
                (tensor.dim() == 0) != (len(spec.shape) == 0) or row + (tensor.shape[0] if tensor.dim() else 1) > \
                (spec.shape[0] if spec.shape else 1):
            raise ValueError(f"{name}: {tensor.dtype} {tuple(tensor.shape)} at row {row} does not fit the planned "
                             f"{spec.dtype} {spec.shape}")
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else 0
        f = self._handle(fname)
        f.seek(offset + row * row_bytes)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        f.write(data)
        self.written[name] += data.nbytes

    def close(self) -> dict:
        for f in self._fh.values():
            f.close()
        bad = [k for k, n in self.written.items() if n != self.where[k][2].nbytes]
        if bad:
            raise RuntimeError(f"{len(bad)} tensors not completely written, e.g. {bad[:3]}")
        total = sum(s.nbytes for _, _, s in self.where.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: self.where[k][0] for k in sorted(self.where)}}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return index


def new_work_dir(out: Path) -> Path:
    """A sibling temp folder for ``out`` (renamed into place when complete)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def finish(work: Path, out: Path) -> None:
    """Make a finished work folder readable like any checkpoint, then swap it into place."""
    work.chmod(0o755)  # mkdtemp creates 0700
    for f in work.iterdir():
        f.chmod(0o644)
    swap_into_place(work, out)


# -- the command --------------------------------------------------------------------------------

def _layer_of(key: str) -> str:
    parts = key.split(".")
    if key.startswith("language_model.model.layers."):
        return f"layer.{parts[3]}"
    return "other"


def quantize_checkpoint(ckpt: str | Path, out: str | Path, *, fmt: str, overwrite: bool = False,
                        max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress=None,
                        calib: str | Path | None = None) -> dict:
    """Quantize ``ckpt`` into ``out`` (written beside it, then renamed); returns the error report.

    Streams: one source tensor (memory-mapped) and its codes + scales are in memory at a time.
    ``calib`` (a calibration jsonl, :func:`m3_trt.quant.fp8.calibration_inputs`; ``"builtin"``: the
    built-in prompts) adds the per-layer *output* error on those prompts (:func:`output_errors`);
    the checkpoint's bytes do not depend on it.
    """
    if fmt not in FORMATS:
        raise QuantizeError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    ckpt, out = Path(ckpt), Path(out)
    calib_file = None if calib in (None, "builtin") else Path(calib)
    out = check_output(out, stage=QUANTIZED, inputs=[ckpt, calib_file], overwrite=overwrite)
    if calib_file is not None and not calib_file.is_file():
        raise QuantizeError(f"--calib {calib_file}: no such file")
    cfg_raw = json.loads((ckpt / "config.json").read_text()) if (ckpt / "config.json").is_file() else None
    if cfg_raw is None:
        raise QuantizeError(f"{ckpt}: no config.json")
    if cfg_raw.get("quantization_config"):
        raise QuantizeError(f"{ckpt}/config.json already has a quantization_config "
                            f"({cfg_raw['quantization_config'].get('quant_method')}); quantize reads bf16 checkpoints")
    M3Config.from_dict(cfg_raw)  # validates the model config, naming any bad key
    # the prompts are read (and a bad line named) before any work, not after the conversion
    cal_inputs = calibration_inputs(ckpt, calib_file) if calib is not None else None
    src = SafetensorsCheckpoint(ckpt)
    keys = src.keys()
    if not any(k.startswith("language_model.model.") for k in keys):
        raise QuantizeError(f"{ckpt}: not in the original MiniMax layout (language_model.model.…) that "
                            f"save_pretrained writes; quantize writes that layout and reads only it")
    headers = {f: read_safetensors_header(ckpt / f)[0] for f in sorted(set(src.key_to_file.values()))}
    specs, plan = [], {}
    for k in keys:
        if k.endswith(SCALE_SUFFIX):
            raise QuantizeError(f"{k}: the checkpoint is already FP8 (it has scale tensors)")
        entry = headers[src.key_to_file[k]][k]
        shape, dtype = tuple(entry["shape"]), ST_DTYPES[entry["dtype"]]
        quant = is_quantized_key(k, shape)
        if quant and len(shape) != 2:
            raise QuantizeError(f"{k}: expected a 2-D weight, got shape {shape}")
        plan[k] = quant
        if quant:
            sdt, sshape = scale_spec(fmt, shape, k)
            specs += [TensorSpec(k, E4M3, shape), TensorSpec(k + SCALE_SUFFIX, sdt, sshape)]
        else:
            specs.append(TensorSpec(k, dtype, shape))
    work = new_work_dir(out)
    t0 = time.perf_counter()
    try:
        writer = ShardedWriter(work, specs, max_shard_bytes)
        per_layer: dict[str, dict] = {}
        worst: list[dict] = []
        piece = None
        for n, k in enumerate(keys):
            if _layer_of(k) != piece:
                # fresh memory maps per layer: pages of a live map count in RSS, so one map held for
                # the whole run would grow with every tensor read (see m3_trt.model.pieces)
                piece, src = _layer_of(k), SafetensorsCheckpoint(ckpt)
            t = src.get(k)
            if t.dtype in FP8_DTYPES:
                raise QuantizeError(f"{k}: already FP8 ({t.dtype})")
            if not plan[k]:
                writer.write(k, t)
                continue
            if not t.is_floating_point():
                raise QuantizeError(f"{k}: {t.dtype} weight cannot be quantized")
            codes, scale = QUANTIZERS[fmt](t, k)
            writer.write(k, codes)
            writer.write(k + SCALE_SUFFIX, scale)
            back = dequantize_fp8(codes, scale, torch.float32, name=k)
            ref = t.double()
            err2, ref2 = float((back.double() - ref).pow(2).sum()), float(ref.pow(2).sum())
            row = per_layer.setdefault(_layer_of(k), {"tensors": 0, "err2": 0.0, "ref2": 0.0, "max_rel": 0.0,
                                                      "max_rel_tensor": None})
            rel = (err2 / max(ref2, 1e-300)) ** 0.5
            row["tensors"] += 1
            row["err2"] += err2
            row["ref2"] += ref2
            if rel > row["max_rel"]:
                row["max_rel"], row["max_rel_tensor"] = rel, k
            if progress and (n % 200 == 0):
                progress(f"[{n + 1}/{len(keys)}] {k}")
            del t, codes, scale, back, ref
        index = writer.close()
        layers = [{"layer": name, "tensors": r["tensors"], "rel_err": (r["err2"] / max(r["ref2"], 1e-300)) ** 0.5,
                   "max_tensor_rel_err": r["max_rel"], "worst_tensor": r["max_rel_tensor"]}
                  for name, r in sorted(per_layer.items(), key=lambda kv: (len(kv[0]), kv[0]))]
        worst = max(layers, key=lambda r: r["max_tensor_rel_err"]) if layers else None
        cfg_out = dict(cfg_raw)
        cfg_out["quantization_config"] = quantization_config(fmt)
        (work / "config.json").write_text(json.dumps(cfg_out, indent=2) + "\n")
        for f in sorted(ckpt.iterdir()):  # tokenizer, processor and generation configs travel unchanged
            if f.is_file() and f.name not in index["weight_map"].values() and f.name not in (
                    "config.json", "model.safetensors.index.json", "model.safetensors", MARKER,
                    "quantize_report.json") and not f.name.endswith(".safetensors"):
                shutil.copy2(f, work / f.name)
        report = {"format": fmt, "source": str(ckpt), "quantization_config": cfg_out["quantization_config"],
                  "quantized_tensors": sum(plan.values()), "kept_tensors": len(plan) - sum(plan.values()),
                  "metric": "relative L2 error of the dequantized weights vs the bf16 source, per decoder layer",
                  "layers": layers, "worst": worst}
        if calib is not None:
            report["output_errors"] = output_errors(ckpt, work, calib_file, progress, cal_inputs)
        report["seconds"] = round(time.perf_counter() - t0, 2)
        (work / "quantize_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (work / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "weights": fmt, "source": str(ckpt),
                                                "report": "quantize_report.json"}, indent=2) + "\n")
        finish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def output_errors(ckpt: Path, quantized: Path, calib: Path | None, progress=None,
                  inputs: list[dict] | None = None) -> dict:
    """Per decoder layer, the output error of the FP8 layer (``quantized``, read dequantized: what
    transformers computes on a CPU) against the source layer on the calibration prompts (``calib``,
    or the built-in set; ``inputs``: those prompts already rendered), in fp32, hidden states carried
    layer by layer (:func:`m3_trt.quant.fp8.layer_output_errors`: one layer in memory at a time)."""
    inputs = calibration_inputs(ckpt, calib) if inputs is None else inputs
    if progress:
        progress(f"output error on {len(inputs)} calibration prompts, layer by layer")
    layers = layer_output_errors(PieceModel(ckpt), PieceModel(quantized), inputs)
    return {"calib": calibration_source(ckpt, calib), "prompts": len(inputs), "dtype": "fp32",
            "metric": "relative L2 error of each decoder layer's output, FP8 weights (dequantized) vs the source "
                      "weights; isolated: the FP8 layer on the source model's input to it; cumulative: every "
                      "layer so far FP8. Activations unquantized (activation_scheme: dynamic, done by the "
                      "serving kernel)",
            "layers": layers, "worst_isolated": max(layers, key=lambda r: r["isolated"]) if layers else None}


@dataclass(frozen=True, kw_only=True)
class QuantizeOptions:
    ckpt: Path = field(metadata=opt())
    out: Path = field(metadata=opt())
    fmt: str = field(metadata=opt("--format", choices=FORMATS))
    overwrite: bool = field(default=False, metadata=opt(
        "--overwrite", help="replace an existing folder that is not ours"))
    calib: Path | None = field(default=None, metadata=opt(
        "--calib", help="calibration prompts (jsonl of {text, image?}, or {input_ids} without a tokenizer): "
                        "adds each decoder layer's FP8 output error on them to the report"))


def cmd_quantize(o: QuantizeOptions) -> int:
    ckpt, out = o.ckpt, o.out
    print(f"quantize: ckpt={ckpt} out={out} format={o.fmt} overwrite={o.overwrite} calib={o.calib}", flush=True)
    rep = quantize_checkpoint(ckpt, out, fmt=o.fmt, overwrite=o.overwrite, progress=lambda m: print(m, flush=True),
                              calib=o.calib)
    for r in rep["layers"]:
        print(f"  {r['layer']:10s} {r['tensors']:5d} tensors  rel err {r['rel_err']:.3e}  "
              f"worst tensor {r['max_tensor_rel_err']:.3e}")
    for r in rep.get("output_errors", {}).get("layers", []):
        print(f"  layer.{r['layer']:<4d} output error on the calibration prompts: isolated {r['isolated']:.3e}  "
              f"cumulative {r['cumulative']:.3e}")
    print(f"wrote {out} ({rep['quantized_tensors']} tensors quantized, {rep['kept_tensors']} kept; "
          f"report {out}/quantize_report.json)")
    return 0


def register(sub) -> None:
    """Add ``quantize`` to the ``m3-trt`` command line."""
    add_command(sub, "quantize", QuantizeOptions, cmd_quantize,
                help="bf16 checkpoint -> FP8 checkpoint (MXFP8 or 128x128 blocks), same layout")
