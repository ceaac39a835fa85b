"""Per-rank ONNX of a sharded build: each rank's decoder layers split at their collective points.

A rank's decoder layer is two graphs with the collectives between them (done by the runtime —
``torch.distributed`` across processes, or numpy in :mod:`m3_trt.runtime.onnx_ranks`):

    attn  (hidden, position_ids, k_cache, v_cache[, idx_cache])
          -> (attn_out, k_cache_out, v_cache_out[, idx_cache_out, block_idx])
          input_layernorm -> the rank's q/KV heads -> o_proj on the rank's columns
    [collective 1]  attn_sum = all_reduce(attn_out)            (tp > 1; else attn_sum = attn_out)
    mlp   (hidden, attn_sum) -> (hidden_mid, mlp_out[, mlp_local])
          hidden_mid = hidden + attn_sum; post_attention_layernorm -> the rank's MLP slice:
          dense: gate‖up rows / down columns; MoE: replicated router over all experts, the rank's
          contiguous expert range (and intermediate slice), plus the shared-expert slice when tp > 1
    [collective 2]  hidden_out = hidden_mid + (all_reduce(mlp_out) + mlp_local)
          (all_reduce only where the MLP is sharded; ``mlp_local`` = the replicated shared expert
          of a tp = 1 MoE layer, added after the reduction exactly like :class:`RankMoE`)

Routed experts: with ``plugins="m3"`` one ``M3SwigluMoE`` node holding only the rank's experts,
``expert_offset`` / ``expert_count`` = the rank's range (:func:`m3_trt.model.shard.local_experts`;
routing still over all experts, the output the rank's partial sum); with ``plugins="none"`` the
standard-op dense combine over the rank's experts (``plugins/swiglu_moe/portable.py``). The shared
expert is computed beside the node (its zero-width shared-expert inputs stay empty), so it is a
plain (FP8) linear pair in both modes. Attention uses the ``m3`` indexer / block-sparse nodes when
``plugins="m3"``.

FP8 targets (``weight_dtype = "fp8"``): the graphs carry the E4M3 codes and scales the build wrote
in ``rank<r>/weights.safetensors`` + ``fp8_scales.safetensors`` — read back, never re-quantized —
as Q/DQ pairs (:class:`m3_trt.export.onnx.fp8.Fp8Linear` / :class:`~m3_trt.export.onnx.fp8.Fp8Experts`,
the one-rank export's scheme): every quantized linear's input gets the calibrated per-tensor scale
of the build's ``calibration.json``; routed experts are weight-only FP8 like the one-rank export.

Streaming: the rank's :class:`RankModel` lives on ``meta`` and one decoder layer at a time is filled
from the rank's weight files (:func:`rank_layer`), exported / written / verified, then dropped —
the graphs carry exactly what the build wrote, and no step holds more than one layer.

All ranks have the same local shapes, so each of the four graphs (``attn_full``, ``attn_sparse``,
``mlp_dense``, ``mlp_moe``) is exported once (from rank 0) and every (rank, layer) gets its own
weight file with that graph's byte layout (``layer_<i>.attn.data`` / ``layer_<i>.mlp.data``);
the only per-rank graph difference, the MoE node's ``expert_offset`` attribute, is set in each
rank's copy of ``mlp_moe.onnx``. Embedding, head, vision encoder and projector are replicated:
exported once (``export_model``) into ``replicated/``.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from safetensors import safe_open

from m3_trt.model.cache import LayerCache
from m3_trt.model.modeling import DTYPES, rope_cos_sin
from m3_trt.model.rank import RankDecoderLayer, RankModel, RankMoE
from m3_trt.plugins.swiglu_moe import swiglu_moe
from m3_trt.plugins.swiglu_moe.portable import swiglu_moe_portable

from m3_trt.export.onnx.exporter import _io_signature, export_spec, write_weights
from m3_trt.export.onnx.fp8 import BLOCKED_OPSET, Fp8Experts, Fp8Linear
from m3_trt.export.onnx.runtime import layer_model, session_options
from m3_trt.export.onnx.specs import OPSET, Spec, attention_io, example_inputs
from m3_trt.export.onnx.verify import TOLERANCE, _rel

REPLICATED = ["embedding", "head", "vision_encoder", "projector"]
FORMAT = "m3-trt-onnx-rank/1"
MOE_OP = "M3SwigluMoE"
SCALE = "_scale_inv"  # suffix of a weight's scale in fp8_scales.safetensors (quant.fp8.quantize_state)


class RankWeights:
    """One rank's weight files as the build wrote them (``rank<r>/weights.safetensors`` and, for an
    FP8 build, ``fp8_scales.safetensors``), read one decoder layer at a time (memory-mapped)."""
    def __init__(self, rank_dir: str | Path):
        self.dir = Path(rank_dir)
        self.weights = self.dir / "weights.safetensors"
        self.scales = self.dir / "fp8_scales.safetensors"
        if not self.weights.is_file():
            raise FileNotFoundError(f"{self.weights}: no rank weight file (the build writes it before the ONNX step)")
        self.fp8 = self.scales.is_file()

    def layer(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(tensors as stored, {weight name: its stored scale})`` of decoder layer ``i``."""
        prefix = f"model.language_model.layers.{i}."
        with safe_open(str(self.weights), "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        scales = {}
        if self.fp8:
            with safe_open(str(self.scales), "pt") as f:
                scales = {k[:-len(SCALE)]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        if not state:
            raise KeyError(f"{self.weights}: no tensors of layer {i}")
        return state, scales


def read_act_scales(calibration: str | Path) -> dict[str, float]:
    """``activation_scales`` (weight name → ``amax / 448``) of a build's ``calibration.json``."""
    return {k: float(v) for k, v in json.loads(Path(calibration).read_text())["activation_scales"].items()}


@contextmanager
def rank_layer(rm: RankModel, i: int, weights: RankWeights, dtype: torch.dtype,
               act_scales: dict[str, float] | None = None) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Decoder layer ``i`` of ``rm`` (a :meth:`RankModel.on_meta` model) filled from ``weights``
    for the ``with``; yields ``{weight name: (E4M3 codes, stored scale)}`` of its FP8 weights.

    Activation-dtype tensors are cast to ``dtype``. FP8 weights become :class:`Fp8Linear` /
    :class:`Fp8Experts` holding the file's codes and scales unchanged, with the input scales of
    ``act_scales`` (``calibration.json``; a missing one is a ``KeyError`` naming the weight).
    """
    stored, scales = weights.layer(i)
    if scales and act_scales is None:
        raise ValueError(f"{weights.dir}: an FP8 rank (fp8_scales.safetensors) needs the calibration's activation scales")
    # FP8 weights only pass through the layer's Linear / experts parameters, which are swapped for
    # their FP8 modules right after: a broadcast zero of the right shape (no memory) stands in
    state = {k: torch.zeros((), dtype=dtype).expand(v.shape) if k in scales else v for k, v in stored.items()}
    quantized = {k: (stored[k], scales[k]) for k in scales}
    with rm.loaded_layer(i, state, dtype) as layer:
        del state
        _swap_fp8(layer, f"model.language_model.layers.{i}", quantized, act_scales or {}, dtype)
        yield quantized


def _swap_fp8(layer: RankDecoderLayer, prefix: str, quantized: dict, act_scales: dict[str, float],
              dtype: torch.dtype) -> None:
    """In place: each Linear / RankExperts whose weights are in ``quantized`` becomes its FP8 module."""
    if not quantized:
        return
    used = set()
    for name, module in list(layer.named_modules(prefix=prefix)):
        for child_name, child in list(module.named_children()):
            key = f"{name}.{child_name}.weight"
            if isinstance(child, nn.Linear) and key in quantized:
                if key not in act_scales:
                    raise KeyError(f"{key}: no activation scale in the calibration (was it reached by its prompts?)")
                setattr(module, child_name, Fp8Linear(*quantized[key], act_scales[key], dtype, key))
                used.add(key)
        if isinstance(module, RankMoE):
            ex = f"{name}.experts"
            q = {n: quantized[f"{ex}.{n}"] for n in ("gate_up_proj", "down_proj")}
            module.experts = Fp8Experts(q, dtype, ex)
            used |= {f"{ex}.gate_up_proj", f"{ex}.down_proj"}
    if used != set(quantized):
        raise ValueError(f"{prefix}: FP8 weights with no module to hold them: {sorted(set(quantized) - used)[:5]}")


class AttnPart(nn.Module):
    """input_layernorm + the rank's attention; ``attn_out`` is a partial sum when tp > 1."""
    def __init__(self, rm: RankModel, i: int):
        super().__init__()
        layer = rm.model.language_model.layers[i]
        self.text_cfg = rm.local_text
        self.norm = layer.input_layernorm
        self.attn = layer.self_attn
        self.sparse = self.attn.indexer is not None

    def forward(self, hidden_BSH, position_ids_BS, k_cache_BGTD, v_cache_BGTD, idx_cache_BTD=None):
        cos, sin = rope_cos_sin(position_ids_BS, self.text_cfg, hidden_BSH.dtype)
        cache = LayerCache(k_cache_BGTD, v_cache_BGTD, idx_cache_BTD)
        a, block_idx = self.attn(self.norm(hidden_BSH), cos, sin, position_ids_BS, cache, return_block_idx=True)
        if self.sparse:
            return a, cache.k_BGTD, cache.v_BGTD, cache.idx_k_BTD, block_idx
        return a, cache.k_BGTD, cache.v_BGTD


def rank_moe_static(moe: RankMoE, x_TD: torch.Tensor, expert_ids_El: torch.Tensor) -> torch.Tensor:
    """The rank's routed experts in static shapes: ``routed_scaling · Σ_e∈rank c_te · expert_e(x)``.

    ``expert_ids_El`` (the rank's global expert ids) is a tensor, not a Python range, so it becomes
    an initializer in the rank's weight file and one graph serves every rank.
    """
    c = moe.cfg
    return swiglu_moe_portable(x_TD, moe.gate.weight, moe.gate.e_score_correction_bias, moe.experts.gate_up_proj,
                               moe.experts.down_proj, None, None, top_k=c.num_experts_per_tok,
                               routed_scaling=c.routed_scaling_factor, alpha=c.swiglu_alpha, limit=c.swiglu_limit,
                               expert_ids_E=expert_ids_El)


def rank_moe_plugin(moe: RankMoE, x_TD: torch.Tensor) -> torch.Tensor:
    """The rank's routed experts as one ``m3::swiglu_moe`` node with the rank's expert range.

    The shared expert is left out (zero-width ``w13s [0, D]`` / ``w2s [D, 0]``: ONNX Runtime's
    Python custom ops take no absent inputs) and computed beside the node by the caller.
    """
    c, r = moe.cfg, moe.experts_range
    D = x_TD.shape[1]
    return swiglu_moe(x_TD, moe.gate.weight, moe.gate.e_score_correction_bias, moe.experts.gate_up_proj,
                      moe.experts.down_proj, x_TD.new_zeros(0, D), x_TD.new_zeros(D, 0), top_k=c.num_experts_per_tok,
                      routed_scaling=c.routed_scaling_factor, alpha=c.swiglu_alpha, limit=c.swiglu_limit,
                      expert_offset=r.start, expert_count=len(r), impl="torch")


class MlpPart(nn.Module):
    """Residual after attention, post_attention_layernorm, the rank's MLP slice."""
    def __init__(self, rm: RankModel, i: int, plugins: str):
        super().__init__()
        layer = rm.model.language_model.layers[i]
        self.norm = layer.post_attention_layernorm
        self.mlp = layer.mlp
        self.moe = isinstance(self.mlp, RankMoE)
        self.tp = rm.layout.tp
        self.plugin = plugins == "m3"
        if self.moe and not self.plugin:
            r = self.mlp.experts_range
            self.register_buffer("expert_ids", torch.arange(r.start, r.stop))

    def forward(self, hidden_BSH, attn_BSH):
        mid = hidden_BSH + attn_BSH
        x = self.norm(mid)
        if not self.moe:
            return mid, self.mlp(x)
        B, S, D = x.shape
        x_TD = x.reshape(-1, D)
        routed = rank_moe_plugin(self.mlp, x_TD) if self.plugin else rank_moe_static(self.mlp, x_TD, self.expert_ids)
        if self.tp > 1:  # the shared expert is sharded too: its partial rides on the same all-reduce
            return mid, (routed + self.mlp.shared_experts(x_TD)).reshape(B, S, D)
        return mid, routed.reshape(B, S, D), self.mlp.shared_experts(x_TD).reshape(B, S, D)


def collectives(rm: RankModel, i: int) -> dict:
    """What the runtime does between layer ``i``'s graphs on this layout (the manifest's record)."""
    lay, t = rm.layout, rm.config.text
    moe = t.mlp_layer_types[i] == "sparse"
    mlp_sharded = lay.tp > 1 or (moe and lay.world > 1)
    return {"attn_out": "all_reduce" if lay.tp > 1 else "none",
            "mlp_out": "all_reduce" if mlp_sharded else "none",
            "mlp_local": moe and lay.tp == 1 and lay.world > 1,
            "residual": "hidden_out = hidden_mid + (reduce(mlp_out) + mlp_local)"}


def part_specs(rm: RankModel, i: int, B: int, T: int, plugins: str):
    """``[(graph name, module, Spec)]`` for layer ``i`` of ``rm`` (loaded: :func:`rank_layer`)."""
    t, lt = rm.config.text, rm.local_text
    layer = rm.model.language_model.layers[i]
    dt = layer.input_layernorm.weight.dtype
    if dt not in DTYPES.values() or layer.input_layernorm.weight.is_meta:
        raise ValueError(f"rank {rm.rank} layer {i} is not loaded (use rank_layer)")
    H, G, D, S = t.hidden_size, lt.num_key_value_heads, t.head_dim, min(5, T)
    bs = {0: "batch", 1: "seq"}
    attn = AttnPart(rm, i)
    ins, cache_outs, dyn = attention_io(H, G, D, t.index_head_dim, B=B, S=S, T=T, dtype=dt, sparse=attn.sparse)
    outs = ["attn_out", *cache_outs]
    mlp = MlpPart(rm, i, plugins)
    mouts = ["hidden_mid", "mlp_out"] + (["mlp_local"] if mlp.moe and mlp.tp == 1 else [])
    return [("attn_sparse" if attn.sparse else "attn_full", Spec("attn", attn, ins, outs, dyn)),
            ("mlp_moe" if mlp.moe else "mlp_dense",
             Spec("mlp", mlp, [("hidden", (B, S, H), dt), ("attn", (B, S, H), dt)], mouts,
                  {"hidden": bs, "attn": bs}))]


def _write_data(module: nn.Module, layout: dict[str, tuple[int, int]], path: Path) -> None:

    write_weights(path, dict(module.state_dict()), layout)


def export_graphs(rm0: RankModel, weights0: RankWeights, out: Path, *, dtype: str, plugins: str, max_seq_len: int,
                  max_batch: int, act_scales: dict[str, float] | None = None, progress=None) -> dict:
    """The four split graphs from rank 0's first layer of each kind (one layer loaded at a time,
    from rank 0's weight files); returns their layouts/signatures (also ``out/graphs.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    quant = "fp8" if weights0.fp8 else "none"
    t = rm0.config.text
    first: dict[str, int] = {}  # graph name -> first layer using it
    for i in range(t.num_hidden_layers):
        first.setdefault("attn_sparse" if t.layer_types[i] == "minimax_m3_sparse" else "attn_full", i)
        first.setdefault("mlp_moe" if t.mlp_layer_types[i] == "sparse" else "mlp_dense", i)
    graphs: dict[str, dict] = {}
    for i in sorted(set(first.values())):
        with rank_layer(rm0, i, weights0, DTYPES[dtype], act_scales) as quantized:
            # block scales (a native FP8 checkpoint's, kept by the build) need the blocked
            # DequantizeLinear of opset 21; per-channel scales are [..., rows, 1]
            blocked = any(s.shape[-2:] != (c.shape[-2], 1) for c, s in quantized.values())
            for gname, spec in part_specs(rm0, i, 2, max_seq_len, plugins):
                if first[gname] != i:
                    continue
                path = out / f"{gname}.onnx"
                layout = export_spec(spec, path, rm0.config, plugins, f"{gname}.data", quant,
                                     BLOCKED_OPSET if blocked else OPSET)
                graphs[gname] = {"file": path.name, "layout": {k: list(v) for k, v in layout.items()},
                                 **_io_signature(path)}
                if progress:
                    progress(f"[onnx] graph {gname}: {graphs[gname]['nodes']} nodes")
    (out / "graphs.json").write_text(json.dumps(graphs, indent=2) + "\n")
    return graphs


def set_expert_range(graph: Path, offset: int, count: int) -> int:
    """Set every ``M3SwigluMoE`` node's ``expert_offset`` / ``expert_count`` in ``graph`` (in place,
    external data untouched); returns how many nodes were set."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    n = 0
    for node in model.graph.node:
        if node.op_type != MOE_OP:
            continue
        for a in node.attribute:
            if a.name in ("expert_offset", "expert_count"):
                a.i = offset if a.name == "expert_offset" else count
        n += 1
    onnx.save(model, str(graph))
    return n


def write_rank(rm: RankModel, weights: RankWeights, graphs_dir: Path, out: Path, *, dtype: str, plugins: str,
               max_seq_len: int, max_batch: int, replicated: str, act_scales: dict[str, float] | None = None,
               verify: bool = True, seed: int = 0) -> dict | None:
    """``out/``: the graphs, this rank's per-layer weight files and ``manifest.json``, one layer in
    memory at a time; with ``verify`` the verdict of :func:`verify_rank` on them is returned."""
    graphs = json.loads((graphs_dir / "graphs.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for g in graphs.values():
        shutil.copyfile(graphs_dir / g["file"], out / g["file"])
    t = rm.config.text
    expert_range = None
    if "mlp_moe" in graphs and plugins == "m3":
        i = t.mlp_layer_types.index("sparse")
        r = rm.model.language_model.layers[i].mlp.experts_range
        if set_expert_range(out / graphs["mlp_moe"]["file"], r.start, len(r)) == 0:
            raise RuntimeError(f"{graphs['mlp_moe']['file']}: plugins='m3' but no {MOE_OP} node to give the range")
        expert_range = [r.start, len(r)]
    layers = []
    for i in range(t.num_hidden_layers):
        entry = {"index": i, "variant": t.layer_variant(i), "collectives": collectives(rm, i)}
        with rank_layer(rm, i, weights, DTYPES[dtype], act_scales):
            for gname, spec in part_specs(rm, i, 1, max_seq_len, plugins):
                data = f"layer_{i}.{spec.name}.data"
                _write_data(spec.module, {k: tuple(v) for k, v in graphs[gname]["layout"].items()}, out / data)
                entry[spec.name] = {"graph": gname, "file": graphs[gname]["file"], "data": data}
        layers.append(entry)
    manifest = {
        "format": FORMAT, "rank": rm.rank, "layout": {"world": rm.layout.world, "tp": rm.layout.tp,
                                                      "ep": rm.layout.ep},
        "dtype": dtype, "plugins": plugins, "max_seq_len": max_seq_len, "max_batch": max_batch,
        "quant": "fp8" if weights.fp8 else "none", "expert_range": expert_range,
        "config": rm.config.to_hf_dict(), "local_text": {"num_attention_heads": rm.local_text.num_attention_heads,
                                                          "num_key_value_heads": rm.local_text.num_key_value_heads},
        "replicated": replicated, "graphs": {k: {kk: v[kk] for kk in ("file", "inputs", "outputs", "custom_ops")}
                                             for k, v in graphs.items()},
        "layers": layers,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return verify_rank(rm, out, weights, act_scales, seed) if verify else None


def verify_rank(rm: RankModel, rank_dir: Path, weights: RankWeights, act_scales: dict[str, float] | None = None,
                seed: int = 0) -> dict:
    """Each of the rank's layer graphs in ONNX Runtime vs its torch part (prefill + decode inputs),
    the torch part filled from the rank's weight files (FP8: the same codes, scales and Q/DQ
    arithmetic), one layer in memory at a time. Tolerance: ``onnx_component`` of the dtype."""
    import onnxruntime as ort

    manifest = json.loads((rank_dir / "manifest.json").read_text())
    if manifest["dtype"] == "bf16":
        return {"skipped": "ONNX Runtime's CPU provider has no bf16 kernels; bf16 graphs are checked by TensorRT"}
    so = session_options(manifest["plugins"] == "m3")
    gen = torch.Generator().manual_seed(seed)
    tol = TOLERANCE[manifest["dtype"]]
    results = {}
    for entry in manifest["layers"]:
        i = entry["index"]
        with rank_layer(rm, i, weights, DTYPES[manifest["dtype"]], act_scales):
            for gname, spec in part_specs(rm, i, 1, manifest["max_seq_len"], manifest["plugins"]):
                part = entry[spec.name]
                sess = ort.InferenceSession(layer_model(rank_dir, part["file"], part["data"]).SerializeToString(), so)
                for case, kw in {"prefill": dict(seq=7, start=0), "decode": dict(seq=1, start=9)}.items():
                    args = list(example_inputs(spec, rm.config, gen, **kw))
                    if spec.name == "mlp":  # example_inputs only sizes 'hidden' by seq
                        args[1] = torch.randn(args[0].shape, generator=gen).to(args[0].dtype)
                    with torch.no_grad():
                        ref = spec.module(*args)
                    outs = sess.run(None, {n: a.numpy() for (n, _, _), a in zip(spec.inputs, args)})
                    errs = {n: _rel(o, r.float().numpy()) for n, o, r in zip(spec.outputs, outs, ref)}
                    results[f"layer_{i}.{spec.name}/{case}"] = {"rel_err": errs, "ok": bool(max(errs.values()) <= tol)}
    return {"tolerance": tol, "components": results, "ok": all(r["ok"] for r in results.values()),
            "reference": "the rank's torch parts on its weight files" + (
                " (E4M3 codes + scales, calibrated Q/DQ)" if weights.fp8 else "")}
