"""Layer-by-layer ONNX export of the M3-VL reference.

One ONNX file per component: ``embedding``, one ``decoder_<variant>`` graph per distinct decoder
layer variant (``full|sparse`` × ``dense|moe``), ``head`` (final norm + LM head),
``vision_encoder`` and ``projector``. Every parameter is external data; the layers of a variant
share their graph and each has its own weight file ``layer_<i>.data`` with the same byte layout
(see :func:`layer_model`). ``manifest.json`` names every file, its inputs/outputs (shapes with
named dynamic axes, dtypes), the opset, the layers using it, and (``verify=True``) the relative
error of ONNX Runtime against the torch component.

Graphs are exported unoptimised (``optimize=False``) on purpose: parameters then stay named
initializers (nothing constant-folded into a transposed or ``1 + w`` copy), which is what lets the
layers of one variant share a graph. ONNX Runtime and TensorRT fold those ops at load/build time.

``plugins="m3"`` exports the indexer selection, the block-sparse attention and the MoE as single
``m3``-domain nodes (TensorRT plugin attributes included); ``plugins="none"`` writes the same
computation in standard ONNX ops (static shapes; the MoE runs every expert with a dense combine).

A checkpoint streams: one piece (embedding, a decoder layer, head, vision tower, projector) in
memory at a time, ``quant="fp8"`` included — each decoder layer gets its E4M3 codes and scales
(:func:`m3_trt.export.onnx.fp8.fp8_layer`) while it is loaded, with activation scales calibrated
layer by layer or handed in by the build.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from m3_trt.model.modeling import DTYPES, M3ForConditionalGeneration
from m3_trt.outputs import ONNX_EXPORT, OutputError, check_output, swap_into_place
from m3_trt.model.pieces import PieceModel
from m3_trt.quant import fp8 as qfp8

from m3_trt.export.onnx import components as C
from m3_trt.export.onnx.fp8 import BLOCKED_OPSET, fp8_layer
from m3_trt.export.onnx.specs import OPSET, PLUGIN_MODES, ExportOptions, Spec, component_specs, example_inputs

_ONNX_DTYPE = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.int64: 7, torch.int32: 6,
               torch.bool: 9, torch.float64: 11, torch.float8_e4m3fn: 17}


def export_spec(spec: Spec, path: Path, model_cfg, plugins: str, data_name: str,
                quant: str = "none", opset: int = OPSET) -> dict[str, tuple[int, int]]:
    """Export ``spec`` to ``path`` with every parameter as external data in ``data_name``.

    Memory stays at the module's own weights: the exporter never serialises them (parameters are
    detached from its graph before saving), and our writer streams each tensor's buffer to disk.
    Returns the weight file's layout, ``name -> (offset, length)``.
    """
    import onnx
    from onnxscript import optimizer

    gen = torch.Generator().manual_seed(0)
    args = example_inputs(spec, model_cfg, gen)
    names = [n for n, _, _ in spec.inputs]
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = []
    for n in names:
        axes = spec.dynamic.get(n, {})
        dynamic_shapes.append({a: dims.setdefault(d, torch.export.Dim(d, min=1 if d != "patches" else 4))
                               for a, d in axes.items()} or None)
    with torch.no_grad(), warnings.catch_warnings():
        # the exporter's notes on renamed dynamic axes and deprecated flags are noise for users
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        # optimize=False keeps parameters as named initializers (nothing folded into a transposed
        # or `1 + w` copy), which is what lets the layers of a variant share one graph
        program = torch.onnx.export(spec.module, args, None, dynamo=True, dynamic_shapes=tuple(dynamic_shapes),
                                    input_names=names, output_names=spec.outputs, opset_version=opset,
                                    optimize=False,
                                    custom_translation_table=_translation_table(plugins, quant) or None,
                                    verbose=False)
    state = dict(spec.module.state_dict())
    graph = program.model.graph
    params = []
    for name in list(graph.initializers):
        if name in state:
            value = graph.initializers.pop(name)
            value.const_value = None
            graph.inputs.append(value)  # shown to the optimizer as an input, so never folded
            params.append(name)
    import onnx_ir

    proto = onnx_ir.serde.serialize_model(program.model)
    del program
    # constant folding + simplification TensorRT's parser needs (SplitToSequence → Split,
    # Reduce axes computed by Shape ops → constants)
    proto = optimizer.optimize(proto, onnx_shape_inference=True)
    kept = [i for i in proto.graph.input if i.name not in state]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    layout = _write_external(proto, path.parent / data_name, data_name, state, params)
    onnx.save(proto, str(path))
    return layout


def _translation_table(plugins: str, quant: str) -> dict:
    table = {}
    if plugins == "m3":
        from m3_trt.plugins import onnx_ops

        table.update(onnx_ops.translation_table())
    if quant == "fp8":
        from m3_trt.export.onnx import fp8

        table.update(fp8.translation_table())
    return table


def _write_external(proto, data_path: Path, data_name: str, state: dict[str, torch.Tensor],
                    names: list[str]) -> dict[str, tuple[int, int]]:
    """Append each named parameter as an external initializer, streaming its bytes (64-byte aligned)."""
    layout, offset = {}, 0
    with open(data_path, "wb") as f:
        for name in names:
            t = state[name]
            buf = _tensor_buffer(t)
            pad = (-offset) % 64
            f.write(b"\0" * pad)
            offset += pad
            f.write(buf)
            layout[name] = (offset, buf.nbytes)
            init = proto.graph.initializer.add()
            init.name, init.data_type = name, _ONNX_DTYPE[t.dtype]
            init.dims.extend(list(t.shape))
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(buf.nbytes))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
            init.data_location = 1  # TensorProto.EXTERNAL
            offset += buf.nbytes
    return layout


def _tensor_buffer(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (bf16 through an int16 view: numpy has no bfloat16)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    elif t.dtype == torch.float8_e4m3fn:
        t = t.view(torch.uint8)
    return memoryview(t.numpy()).cast("B")


def write_weights(path: Path, state: dict[str, torch.Tensor], layout: dict[str, tuple[int, int]],
                  what: str = "") -> None:
    """``state`` written in ``layout`` (a graph's weight-file layout): how the layers or ranks sharing
    one graph each get their own weight file."""
    with open(path, "wb") as f:
        for name, (offset, length) in sorted(layout.items(), key=lambda kv: kv[1][0]):
            if name not in state:
                raise RuntimeError(f"{what or path.name}: initializer {name} is not one of its parameters")
            raw = _tensor_buffer(state[name])
            if raw.nbytes != length:
                raise RuntimeError(f"{what or path.name}: {name} has {raw.nbytes} bytes, the graph has {length}")
            f.seek(offset)
            f.write(raw)


def _write_layer_data(spec: Spec, layer: int, model: M3ForConditionalGeneration, out: Path,
                      layout: dict[str, tuple[int, int]]) -> str:
    """Weights of ``layer`` in the byte layout of its variant's graph."""
    name = f"layer_{layer}.data"
    write_weights(out / name, dict(C.DecoderLayerComponent(model, layer).state_dict()), layout,
                  f"{spec.name} layer {layer}")
    return name


def _io_signature(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for vi in values:
            tt = vi.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in tt.shape.dim]
            out.append({"name": vi.name, "dtype": onnx.TensorProto.DataType.Name(tt.elem_type).lower(),
                        "shape": shape})
        return out

    domains = sorted({n.domain for n in model.graph.node if n.domain})
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output),
            "custom_ops": custom, "domains": domains, "nodes": len(model.graph.node)}


def export_model(source: str | Path | M3ForConditionalGeneration, out: str | Path, *, dtype: str = "fp32",
                 plugins: str = "m3", max_seq_len: int = 256, max_batch: int = 8, verify: bool = False,
                 components: list[str] | None = None, progress: Callable[[str], None] | None = print,
                 quant: str = "none", calib: str | Path | None = None, calib_ckpt: str | Path | None = None,
                 act_scales: dict[str, float] | None = None, overwrite: bool = False) -> Path:
    """Export every component into ``out`` (written in a temp folder beside it, then renamed).

    ``out`` follows :func:`m3_trt.outputs.check_output`: never equal to, inside or containing the
    checkpoint (or ``calib``); an existing ``out`` is replaced only when it is a previous export
    (``manifest.json`` of ours) or ``overwrite`` is set.

    A checkpoint path (or :class:`PieceModel`) streams: one piece of the checkpoint in memory at a
    time. ``quant="fp8"``: E4M3 weights and per-tensor activation scales as Q/DQ pairs (``fp8.py``),
    each decoder layer quantized while it is loaded (the checkpoint's block scales kept where it
    has them: a blocked DequantizeLinear, opset 21). ``act_scales`` (weight name → input scale, a
    build's ``calibration.json``) or else calibration layer by layer
    (:func:`m3_trt.quant.fp8.calibrate_layerwise`, in ``dtype``) on ``calib`` (jsonl) or the
    built-in set, rendered with the checkpoint's processor (``calib_ckpt``'s, when given). An
    in-memory model is not quantized (``quant="fp8"`` needs a checkpoint).
    """
    opts = ExportOptions(dtype=dtype, plugins=plugins, max_seq_len=max_seq_len, max_batch=max_batch, verify=verify,
                         quant=quant)
    out = Path(out)
    inputs = [calib, calib_ckpt] + ([] if isinstance(source, M3ForConditionalGeneration) else
                                    [source.reader.path if isinstance(source, PieceModel) else source])
    out = check_output(out, stage=ONNX_EXPORT, inputs=inputs, overwrite=overwrite)
    if out.exists() and not overwrite and not ONNX_EXPORT.owns(out):
        # an empty folder: check_output lets it through, but nothing says it is ours to replace
        raise OutputError(f"export: {out} already exists and is not a previous export (no manifest.json of "
                          f"ours); choose a new output folder, or pass --overwrite to replace it")
    dt = DTYPES[dtype]
    load, pm = _whole, None
    if isinstance(source, M3ForConditionalGeneration):
        model, source_desc = source.to(dt), "in-memory model"
    else:  # stream: one piece of the checkpoint in memory at a time
        pm = source if isinstance(source, PieceModel) else PieceModel(source)
        model, source_desc = pm.model, str(pm.reader.path)
        load = lambda piece: pm.loaded(piece, dt)  # noqa: E731
    model = model.eval().set_kernels(PLUGIN_MODES[plugins])
    if max_seq_len > model.config.text.max_position_embeddings:
        raise ValueError(f"max_seq_len={max_seq_len} exceeds max_position_embeddings="
                         f"{model.config.text.max_position_embeddings}")
    quant_info, opset = None, OPSET
    if quant == "fp8":
        if pm is None:
            raise ValueError("quant='fp8' streams from a checkpoint (its path or a PieceModel), layer by layer; "
                             "an in-memory model cannot be quantized by the export")
        act_scales, calib_desc = _fp8_act_scales(pm, dt, act_scales, calib, calib_ckpt)
        native = _has_block_scales(pm)
        load = _fp8_load(model, pm, dt, act_scales)
        opset = BLOCKED_OPSET if native else OPSET
        quant_info = {
            "scheme": "fp8-e4m3",
            "weights": ("the checkpoint's own codes and block scales (blocked DequantizeLinear, fp32 scales)"
                        if native else "per output channel, fp32 scales") + " (decoder layers, not the router)",
            "activations": "per tensor, static, amax/448 from calibration (linear inputs)",
            "calibration": calib_desc, "activation_scales": dict(sorted(act_scales.items()))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial.", dir=out.parent))
    try:
        manifest = _export_into(model, tmp, opts, components, progress, load, opset)
        manifest["source"] = source_desc
        if quant_info is not None:
            manifest["quantization"] = quant_info
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _fp8_act_scales(pm, dt: torch.dtype, act_scales, calib, calib_ckpt) -> tuple[dict[str, float], str]:
    """The activation scales of an FP8 export and where they came from."""
    if act_scales is not None:
        return dict(act_scales), "given (a build's calibration.json)"
    ckpt = calib_ckpt or pm.reader.path
    cpm = PieceModel(pm.reader.path, pm.cfg)  # calibration hooks its modules: a model of its own
    emu, _ = qfp8.calibrate_layerwise(cpm, qfp8.calibration_inputs(ckpt, calib), dt,
                                       cpm.reader.block_scales if _has_block_scales(pm) else None)
    return emu.scales(), qfp8.calibration_source(ckpt, calib) + " (layer by layer)"


def _has_block_scales(pm: PieceModel) -> bool:
    return any(e.scale_key for p, es in pm.reader.entries.items() if p.startswith("layer.") for e in es)


def _fp8_load(model, pm: PieceModel, dt: torch.dtype, act_scales: dict[str, float]):
    """``load(piece)`` of an FP8 export: a decoder layer comes in (fp32 from a checkpoint, so block-scaled
    weights re-code to the checkpoint's codes), gets its Fp8 modules (:func:`fp8.fp8_layer`) and
    leaves with its originals back; other pieces load as usual."""

    @contextlib.contextmanager
    def load(piece: str):
        if not piece.startswith("layer."):
            with pm.loaded(piece, dt):
                yield
            return
        i = int(piece.split(".")[1])
        layer = model.model.language_model.layers[i]
        with pm.loaded(piece, torch.float32):
            with fp8_layer(layer, f"model.language_model.layers.{i}", dt, act_scales, pm.reader.block_scales(piece)):
                yield
    return load


def _whole(piece: str):
    """The ``load`` of an in-memory model: every piece is already there."""
    return contextlib.nullcontext()


# the checkpoint piece (m3_trt.model.pieces) each non-decoder component reads
_COMPONENT_PIECE = {"embedding": "embedding", "head": "head", "vision_encoder": "vision", "projector": "projector"}


def _export_into(model, out: Path, opts: ExportOptions, only: list[str] | None, progress, load=_whole,
                 opset: int = OPSET) -> dict:
    """Export (and verify) component by component; ``load(piece)`` holds that piece's weights in
    memory while it is exported, written and verified (a decoder layer at a time)."""
    import onnx
    import onnxruntime

    manifest = {
        "format": "m3-trt-onnx/1", "opset": opset, "dtype": opts.dtype, "plugins": opts.plugins, "quant": opts.quant,
        "max_seq_len": opts.max_seq_len, "max_batch": opts.max_batch, "config": model.config.to_hf_dict(),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "components": [],
    }
    checker = None
    if opts.verify:
        from m3_trt.export.onnx.verify import Verifier

        checker = Verifier(model, out, opts, progress)
    for spec in component_specs(model, opts):
        if only and spec.name not in only:
            continue
        t0 = time.perf_counter()
        path = out / f"{spec.name}.onnx"
        first = spec.layers[0] if spec.layers else None
        data_name = f"layer_{first}.data" if spec.layers else f"{spec.name}.data"
        with load(f"layer.{first}" if spec.layers else _COMPONENT_PIECE[spec.name]):
            layout = export_spec(spec, path, model.config, opts.plugins, data_name, opts.quant, opset=opset)
            entry = {"name": spec.name, "file": path.name, **_io_signature(path), "seconds": None}
            if not spec.layers:
                entry["data"] = data_name
                if checker:
                    checker.check(spec, entry)
        if spec.layers:
            entry["layers"] = {}
            for i in spec.layers:
                with load(f"layer.{i}"):
                    entry["layers"][str(i)] = _write_layer_data(spec, i, model, out, layout)
                    if checker:
                        checker.check(spec, entry, layers=[i])
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        manifest["components"].append(entry)
        if progress:
            progress(f"[export] {spec.name}: {entry['nodes']} nodes"
                     + (f", layers {spec.layers}" if spec.layers else "") + f" ({entry['seconds']}s)")
    if checker:
        manifest["verify"] = checker.summary()
    return manifest
