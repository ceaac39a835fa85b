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
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from m3_trt.model import M3ForConditionalGeneration

from . import components as C

OPSET = 20
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PLUGIN_MODES = {"m3": "custom_op", "none": "portable"}


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"
    plugins: str = "m3"
    max_seq_len: int = 256
    max_batch: int = 8
    verify: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.plugins not in PLUGIN_MODES:
            raise ValueError(f"plugins={self.plugins!r}: choose one of {', '.join(PLUGIN_MODES)}")
        if self.max_seq_len < 2 or self.max_batch < 1:
            raise ValueError(f"max_seq_len={self.max_seq_len}, max_batch={self.max_batch}: must be >= 2 and >= 1")


# -- component specs -------------------------------------------------------------------------------

@dataclass
class Spec:
    name: str
    module: torch.nn.Module
    inputs: list[tuple[str, tuple, torch.dtype]]      # (name, example shape, dtype)
    outputs: list[str]
    dynamic: dict[str, dict[int, str]]                  # input name -> {axis: dim name}
    layers: list[int] | None = None


def component_specs(model: M3ForConditionalGeneration, opts: ExportOptions) -> list[Spec]:
    cfg = model.config
    t, v = cfg.text, cfg.vision
    dt = DTYPES[opts.dtype]
    T, G, D, H = opts.max_seq_len, t.num_key_value_heads, t.head_dim, t.hidden_size
    S, B = min(5, T), 2
    bs = {0: "batch", 1: "seq"}
    specs = [Spec("embedding", C.Embedding(model), [("input_ids", (B, S), torch.int64)], ["inputs_embeds"],
                  {"input_ids": bs})]
    by_variant: dict[str, list[int]] = {}
    for i in range(t.num_hidden_layers):
        by_variant.setdefault(t.layer_variant(i), []).append(i)
    for variant, layers in by_variant.items():
        comp = C.DecoderLayerComponent(model, layers[0])
        ins = [("hidden", (B, S, H), dt), ("position_ids", (B, S), torch.int64),
               ("k_cache", (B, G, T, D), dt), ("v_cache", (B, G, T, D), dt)]
        outs = ["hidden_out", "k_cache_out", "v_cache_out"]
        dyn = {"hidden": bs, "position_ids": bs, "k_cache": {0: "batch"}, "v_cache": {0: "batch"}}
        if comp.sparse:
            ins.append(("idx_cache", (B, T, t.index_head_dim), dt))
            outs += ["idx_cache_out", "block_idx"]
            dyn["idx_cache"] = {0: "batch"}
        specs.append(Spec(f"decoder_{variant.replace('-', '_')}", comp, ins, outs, dyn, layers))
    specs.append(Spec("head", C.Head(model), [("hidden", (B, S, H), dt)], ["logits"], {"hidden": bs}))
    n = 2 * 2 * 4  # two 2x4-patch images' worth of patches, a multiple of merge**2
    specs.append(Spec("vision_encoder", C.VisionEncoder(model),
                      [("pixel_values", (n, v.patch_dim), dt), ("vision_pos", (n, 3), torch.int64),
                       ("segment_ids", (n,), torch.int64)], ["vision_feats"],
                      {"pixel_values": {0: "patches"}, "vision_pos": {0: "patches"}, "segment_ids": {0: "patches"}}))
    specs.append(Spec("projector", C.Projector(model), [("vision_feats", (n, v.hidden_size), dt)],
                      ["image_embeds"], {"vision_feats": {0: "patches"}}))
    return specs


def example_inputs(spec: Spec, cfg, gen: torch.Generator, *, seq: int | None = None, start: int = 0,
                   batch: int | None = None) -> tuple[torch.Tensor, ...]:
    """Random inputs of a component (positions consistent with the cache length)."""
    out = []
    shapes = {}
    for name, shape, dtype in spec.inputs:
        shape = list(shape)
        if batch is not None and name not in ("pixel_values", "vision_pos", "segment_ids", "vision_feats"):
            shape[0] = batch
        if seq is not None and name in ("input_ids", "hidden", "position_ids"):
            shape[1] = seq
        shapes[name] = shape
        if name == "input_ids":
            x = torch.randint(0, cfg.text.vocab_size, shape, generator=gen)
        elif name == "position_ids":
            x = (torch.arange(shape[1]) + start)[None].expand(shape[0], shape[1]).contiguous()
        elif name == "vision_pos":
            x = torch.stack([torch.zeros(shape[0], dtype=torch.long),
                             torch.arange(shape[0]) // 4, torch.arange(shape[0]) % 4], -1)
        elif name == "segment_ids":
            x = torch.arange(shape[0]) * 2 // shape[0]
        else:
            x = torch.randn(shape, generator=gen).to(dtype)
            if "cache" in name and start == 0:
                x.zero_()
        out.append(x)
    return tuple(out)


# -- export ------------------------------------------------------------------------------------------

def _export_one(spec: Spec, path: Path, model_cfg, plugins: str) -> None:
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
        torch.onnx.export(spec.module, args, str(path), dynamo=True, dynamic_shapes=tuple(dynamic_shapes),
                          input_names=names, output_names=spec.outputs, opset_version=OPSET, optimize=False,
                          external_data=True, custom_translation_table=_translation_table() if plugins == "m3" else None,
                          verbose=False)


def _optimize_keep_params(path: Path) -> None:
    """Fold constants and simplify (e.g. SplitToSequence → Split, computed Reduce axes → constants, both
    of which TensorRT's parser needs) while every parameter stays a named, untouched initializer.

    The onnxscript optimizer would also fold parameters (transposes, ``1 + w``), so they are shown
    to it as graph inputs and put back as initializers afterwards.
    """
    import onnx
    from onnxscript import optimizer

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    params = list(g.initializer)
    n_inputs = len(g.input)
    for init in params:
        g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del g.initializer[:]
    model = optimizer.optimize(model, onnx_shape_inference=True)
    g = model.graph
    kept = [i for i in g.input[:n_inputs]]
    del g.input[:]
    g.input.extend(kept)
    g.initializer.extend(params)
    onnx.save(model, str(path))


def _translation_table() -> dict:
    from m3_trt.plugins import onnx_ops

    return onnx_ops.translation_table()


def _rewrite_external(path: Path, data_name: str, state: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Make every parameter initializer external in ``data_name`` (our 64-byte aligned layout).

    Streams one tensor at a time (parameters from ``state``, anything else from the exporter's
    own data file), so a full-size layer never sits in memory twice. Returns name -> (offset, length).
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    layout, offset = {}, 0
    torch_data = path.parent / (path.name + ".data")
    src = open(torch_data, "rb") if torch_data.exists() else None
    try:
        with open(path.parent / data_name, "wb") as f:
            for init in model.graph.initializer:
                ext = {e.key: e.value for e in init.external_data}
                if init.name in state:
                    raw = _tensor_bytes(state[init.name])
                elif init.data_location == onnx.TensorProto.EXTERNAL and src is not None:
                    src.seek(int(ext.get("offset", 0)))
                    raw = src.read(int(ext["length"]))
                else:
                    continue  # a small inline constant: stays in the graph
                pad = (-offset) % 64
                f.write(b"\0" * pad)
                offset += pad
                f.write(raw)
                layout[init.name] = (offset, len(raw))
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                              "external_data"):
                    init.ClearField(field)
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = init.external_data.add()
                    entry.key, entry.value = key, value
                init.data_location = onnx.TensorProto.EXTERNAL
                offset += len(raw)
    finally:
        if src is not None:
            src.close()
    if torch_data.exists():
        torch_data.unlink()
    onnx.save(model, str(path))
    return layout


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def _write_layer_data(spec: Spec, layer: int, model: M3ForConditionalGeneration, out: Path,
                      layout: dict[str, tuple[int, int]]) -> str:
    """Weights of ``layer`` in the byte layout of its variant's graph."""
    comp = C.DecoderLayerComponent(model, layer)
    state = dict(comp.state_dict())
    name = f"layer_{layer}.data"
    with open(out / name, "wb") as f:
        for init_name, (offset, length) in sorted(layout.items(), key=lambda kv: kv[1][0]):
            raw = _tensor_bytes(state[init_name]) if init_name in state else None
            if raw is None:
                raise RuntimeError(f"{spec.name}: initializer {init_name} is not a parameter of layer {layer}")
            if len(raw) != length:
                raise RuntimeError(f"{spec.name}: {init_name} of layer {layer} has {len(raw)} bytes, graph has {length}")
            f.seek(offset)
            f.write(raw)
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
                 components: list[str] | None = None, progress: Callable[[str], None] | None = print) -> Path:
    """Export every component into ``out`` (must not exist; written in a temp folder, then renamed)."""
    opts = ExportOptions(dtype=dtype, plugins=plugins, max_seq_len=max_seq_len, max_batch=max_batch, verify=verify)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new output folder")
    if isinstance(source, M3ForConditionalGeneration):
        model, source_desc = source, "in-memory model"
    else:
        model, source_desc = M3ForConditionalGeneration.from_pretrained(source), str(source)
    model = model.to(DTYPES[dtype]).eval().set_kernels(PLUGIN_MODES[plugins])
    if max_seq_len > model.config.text.max_position_embeddings:
        raise ValueError(f"max_seq_len={max_seq_len} exceeds max_position_embeddings="
                         f"{model.config.text.max_position_embeddings}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial.", dir=out.parent))
    try:
        manifest = _export_into(model, tmp, opts, components, progress)
        manifest["source"] = source_desc
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _export_into(model, out: Path, opts: ExportOptions, only: list[str] | None, progress) -> dict:
    import onnx
    import onnxruntime

    manifest = {
        "format": "m3-trt-onnx/1", "opset": OPSET, "dtype": opts.dtype, "plugins": opts.plugins,
        "max_seq_len": opts.max_seq_len, "max_batch": opts.max_batch, "config": model.config.to_hf_dict(),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "components": [],
    }
    for spec in component_specs(model, opts):
        if only and spec.name not in only:
            continue
        t0 = time.perf_counter()
        path = out / f"{spec.name}.onnx"
        _export_one(spec, path, model.config, opts.plugins)
        _optimize_keep_params(path)
        first = spec.layers[0] if spec.layers else None
        data_name = f"layer_{first}.data" if spec.layers else f"{spec.name}.data"
        layout = _rewrite_external(path, data_name, dict(spec.module.state_dict()))
        entry = {"name": spec.name, "file": path.name, **_io_signature(path), "seconds": None}
        if spec.layers:
            entry["layers"] = {str(i): _write_layer_data(spec, i, model, out, layout) for i in spec.layers}
        else:
            entry["data"] = data_name
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        manifest["components"].append(entry)
        if progress:
            progress(f"[export] {spec.name}: {entry['nodes']} nodes"
                     + (f", layers {spec.layers}" if spec.layers else "") + f" ({entry['seconds']}s)")
    if opts.verify:
        from .verify import verify_export

        manifest["verify"] = verify_export(model, out, manifest, opts, progress=progress)
    return manifest
