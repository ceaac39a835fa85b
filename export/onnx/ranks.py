"""Per-rank ONNX of a sharded build: each rank's decoder layers split at their collective points.

A rank's decoder layer is two graphs with the collectives between them (done by the runtime —
``torch.distributed`` across processes, or numpy in :mod:`.onnx_ranks`):

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

The routed experts of a rank are written in standard ops (dense combine over the rank's experts,
the formulation of ``plugins/swiglu_moe/portable.py``) in both plugin modes: the ``m3`` MoE node
(``M3SwigluMoE``) takes all ``E`` experts' weights and has no expert-range attribute, so it cannot
express a rank's slice. Attention uses the ``m3`` indexer / block-sparse nodes when ``plugins="m3"``.

All ranks have the same local shapes, so each of the four graphs (``attn_full``, ``attn_sparse``,
``mlp_dense``, ``mlp_moe``) is exported once and every (rank, layer) gets its own weight file with
that graph's byte layout (``layer_<i>.attn.data`` / ``layer_<i>.mlp.data``), like the layers of a
variant in :mod:`m3_trt.export.onnx`. Embedding, head, vision encoder and projector are replicated:
exported once (``export_model``) into ``replicated/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from m3_trt.model.cache import LayerCache
from m3_trt.model.modeling import rope_cos_sin
from m3_trt.model.rank import RankModel, RankMoE

REPLICATED = ["embedding", "head", "vision_encoder", "projector"]
FORMAT = "m3-trt-onnx-rank/1"


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
    from m3_trt.plugins.swiglu_moe.portable import swiglu_moe_portable

    c = moe.cfg
    return swiglu_moe_portable(x_TD, moe.gate.weight, moe.gate.e_score_correction_bias, moe.experts.gate_up_proj,
                               moe.experts.down_proj, None, None, top_k=c.num_experts_per_tok,
                               routed_scaling=c.routed_scaling_factor, alpha=c.swiglu_alpha, limit=c.swiglu_limit,
                               expert_ids_E=expert_ids_El)


class MlpPart(nn.Module):
    """Residual after attention, post_attention_layernorm, the rank's MLP slice."""

    def __init__(self, rm: RankModel, i: int):
        super().__init__()
        layer = rm.model.language_model.layers[i]
        self.norm = layer.post_attention_layernorm
        self.mlp = layer.mlp
        self.moe = isinstance(self.mlp, RankMoE)
        self.tp = rm.layout.tp
        if self.moe:
            r = self.mlp.experts_range
            self.register_buffer("expert_ids", torch.arange(r.start, r.stop))

    def forward(self, hidden_BSH, attn_BSH):
        mid = hidden_BSH + attn_BSH
        x = self.norm(mid)
        if not self.moe:
            return mid, self.mlp(x)
        B, S, D = x.shape
        x_TD = x.reshape(-1, D)
        routed = rank_moe_static(self.mlp, x_TD, self.expert_ids)
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


def part_specs(rm: RankModel, i: int, B: int, T: int):
    """``[(graph name, module, Spec)]`` for layer ``i`` of ``rm`` (the exporter's Spec)."""
    from m3_trt.export.onnx.specs import Spec, attention_io
    from m3_trt.model.modeling import DTYPES

    t, lt = rm.config.text, rm.local_text
    dt = rm.lm_head.weight.dtype
    assert dt in DTYPES.values()
    H, G, D, S = t.hidden_size, lt.num_key_value_heads, t.head_dim, min(5, T)
    bs = {0: "batch", 1: "seq"}
    attn = AttnPart(rm, i)
    ins, cache_outs, dyn = attention_io(H, G, D, t.index_head_dim, B=B, S=S, T=T, dtype=dt, sparse=attn.sparse)
    outs = ["attn_out", *cache_outs]
    mlp = MlpPart(rm, i)
    mouts = ["hidden_mid", "mlp_out"] + (["mlp_local"] if mlp.moe and mlp.tp == 1 else [])
    return [("attn_sparse" if attn.sparse else "attn_full", Spec("attn", attn, ins, outs, dyn)),
            ("mlp_moe" if mlp.moe else "mlp_dense",
             Spec("mlp", mlp, [("hidden", (B, S, H), dt), ("attn", (B, S, H), dt)], mouts,
                  {"hidden": bs, "attn": bs}))]


def _export_spec(spec, path: Path, cfg, plugins: str, data_name: str) -> dict[str, tuple[int, int]]:
    """The component exporter's own per-graph step, so the split graphs get exactly the treatment of
    ``export_model``'s (unoptimised export, parameters as external data in our layout)."""
    from m3_trt.export.onnx import export_spec

    return export_spec(spec, path, cfg, plugins, data_name)

def _write_data(module: nn.Module, layout: dict[str, tuple[int, int]], path: Path) -> None:
    from m3_trt.export.onnx.exporter import write_weights

    write_weights(path, dict(module.state_dict()), layout)


def export_graphs(rm0: RankModel, out: Path, *, plugins: str, max_seq_len: int, max_batch: int,
                  progress=None) -> dict:
    """The four split graphs from rank 0's first layer of each kind; returns their layouts/signatures."""
    from m3_trt.export.onnx.exporter import _io_signature

    out.mkdir(parents=True, exist_ok=True)
    graphs: dict[str, dict] = {}
    for i in range(rm0.config.text.num_hidden_layers):
        for gname, spec in part_specs(rm0, i, 2, max_seq_len):
            if gname in graphs:
                continue
            path = out / f"{gname}.onnx"
            layout = _export_spec(spec, path, rm0.config, plugins, f"{gname}.data")
            graphs[gname] = {"file": path.name, "layout": {k: list(v) for k, v in layout.items()},
                             **_io_signature(path)}
            if progress:
                progress(f"[onnx] graph {gname}: {graphs[gname]['nodes']} nodes")
    (out / "graphs.json").write_text(json.dumps(graphs, indent=2) + "\n")
    return graphs


def write_rank(rm: RankModel, graphs_dir: Path, out: Path, *, dtype: str, plugins: str, max_seq_len: int,
               max_batch: int, replicated: str) -> Path:
    """``out/``: the graphs, this rank's per-layer weight files and ``manifest.json``."""
    graphs = json.loads((graphs_dir / "graphs.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for g in graphs.values():
        shutil.copyfile(graphs_dir / g["file"], out / g["file"])
    layers = []
    for i in range(rm.config.text.num_hidden_layers):
        entry = {"index": i, "variant": rm.config.text.layer_variant(i), "collectives": collectives(rm, i)}
        for gname, spec in part_specs(rm, i, 1, max_seq_len):
            data = f"layer_{i}.{spec.name}.data"
            _write_data(spec.module, {k: tuple(v) for k, v in graphs[gname]["layout"].items()}, out / data)
            entry[spec.name] = {"graph": gname, "file": graphs[gname]["file"], "data": data}
        layers.append(entry)
    manifest = {
        "format": FORMAT, "rank": rm.rank, "layout": {"world": rm.layout.world, "tp": rm.layout.tp,
                                                      "ep": rm.layout.ep},
        "dtype": dtype, "plugins": plugins, "max_seq_len": max_seq_len, "max_batch": max_batch,
        "config": rm.config.to_hf_dict(), "local_text": {"num_attention_heads": rm.local_text.num_attention_heads,
                                                          "num_key_value_heads": rm.local_text.num_key_value_heads},
        "replicated": replicated, "graphs": {k: {kk: v[kk] for kk in ("file", "inputs", "outputs", "custom_ops")}
                                             for k, v in graphs.items()},
        "layers": layers,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def verify_rank(rm: RankModel, rank_dir: Path, seed: int = 0) -> dict:
    """Each of the rank's layer graphs in ONNX Runtime vs its torch part (prefill + decode inputs)."""
    import onnxruntime as ort

    from m3_trt.export.onnx.specs import example_inputs
    from m3_trt.export.onnx.runtime import layer_model, session_options
    from m3_trt.export.onnx.verify import TOLERANCE, _rel

    manifest = json.loads((rank_dir / "manifest.json").read_text())
    if manifest["dtype"] == "bf16":
        return {"skipped": "ONNX Runtime's CPU provider has no bf16 kernels; bf16 graphs are checked by TensorRT"}
    so = session_options(manifest["plugins"] == "m3")
    gen = torch.Generator().manual_seed(seed)
    results = {}
    for entry in manifest["layers"]:
        i = entry["index"]
        for gname, spec in part_specs(rm, i, 1, manifest["max_seq_len"]):
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
                worst = max(errs.values())
                results[f"layer_{i}.{spec.name}/{case}"] = {"rel_err": errs,
                                                             "ok": bool(worst <= TOLERANCE[manifest["dtype"]])}
    return {"tolerance": TOLERANCE[manifest["dtype"]], "components": results,
            "ok": all(r["ok"] for r in results.values())}
