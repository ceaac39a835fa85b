"""What the ONNX export writes: options, one ``Spec`` per component (embedding, decoder-layer
groups, head, vision encoder, projector), their input/output names and seeded example inputs.

Read by the exporter (to trace), the verifier (to feed ONNX Runtime the same inputs) and the
per-rank exporter (``ranks``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from m3_trt.export.onnx import components as C
from m3_trt.model.modeling import DTYPES, M3ForConditionalGeneration

OPSET = 20
PLUGIN_MODES = {"m3": "custom_op", "none": "portable"}


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"
    plugins: str = "m3"
    max_seq_len: int = 256
    max_batch: int = 8
    verify: bool = False
    quant: str = "none"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.plugins not in PLUGIN_MODES:
            raise ValueError(f"plugins={self.plugins!r}: choose one of {', '.join(PLUGIN_MODES)}")
        if self.quant not in ("none", "fp8"):
            raise ValueError(f"quant={self.quant!r}: choose none or fp8")
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


def attention_io(H: int, G: int, D: int, Di: int, *, B: int, S: int, T: int, dtype: torch.dtype, sparse: bool):
    """Inputs, cache outputs and dynamic axes of a graph holding a layer's attention and its caches:
    ``(hidden, position_ids, k_cache, v_cache[, idx_cache]) -> (…, k_cache_out, v_cache_out[,
    idx_cache_out, block_idx])``; the caller names the first output."""
    bs = {0: "batch", 1: "seq"}
    ins = [("hidden", (B, S, H), dtype), ("position_ids", (B, S), torch.int64),
           ("k_cache", (B, G, T, D), dtype), ("v_cache", (B, G, T, D), dtype)]
    outs = ["k_cache_out", "v_cache_out"]
    dyn = {"hidden": bs, "position_ids": bs, "k_cache": {0: "batch"}, "v_cache": {0: "batch"}}
    if sparse:
        ins.append(("idx_cache", (B, T, Di), dtype))
        outs += ["idx_cache_out", "block_idx"]
        dyn["idx_cache"] = {0: "batch"}
    return ins, outs, dyn


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
        ins, cache_outs, dyn = attention_io(H, G, D, t.index_head_dim, B=B, S=S, T=T, dtype=dt, sparse=comp.sparse)
        specs.append(Spec(f"decoder_{variant.replace('-', '_')}", comp, ins, ["hidden_out", *cache_outs], dyn,
                          layers))
    specs.append(Spec("head", C.Head(model), [("hidden", (B, S, H), dt)], ["logits", "final_norm"], {"hidden": bs}))
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
