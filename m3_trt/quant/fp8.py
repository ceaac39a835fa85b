"""FP8 (E4M3) quantization: weight scales, activation calibration, an emulated forward, error report.

* Weights (the tensors :func:`is_fp8_weight` names: decoder-layer Linear weights and
  experts, not the router): the checkpoint's own block scales are kept where it has them (the
  weight is re-coded with exactly those scales, so a native FP8 checkpoint round-trips bit for
  bit); otherwise one fp32 scale per output channel, ``amax(row) / 448``. Scales are stored as
  ``[..., rows, 1]`` (per channel) or the block grid, so :func:`m3_trt.model.checkpoint.dequantize_fp8`
  reads both.
* Activations: per-tensor scales ``amax / 448`` of every quantized matmul's input, measured on a
  calibration set (a built-in text + image prompt set, or a ``--calib`` jsonl of
  ``{"text": ..., "image": path?}``). Expert inputs share one scale per layer for ``gate_up`` and
  one for ``down`` (what a grouped FP8 GEMM takes).
* :class:`Fp8Emulation` runs the torch reference with every quantized matmul's weight *and*
  input passed through quantize → dequantize (FP8 values, fp32 scales), in the model's dtype.
  Attention score/value products and the KV cache stay in the activation dtype (not emulated).
* :func:`layer_errors`: per decoder layer, the relative error the FP8 layer adds given the bf16
  reference's input to that layer (``isolated``), and the error of the hidden state after that
  layer when the whole model runs in FP8 (``cumulative``) — both against the bf16 reference.
  :func:`calibrate_layerwise` gives both (and the scales) one decoder layer at a time;
  :func:`layer_output_errors` the same two errors between two checkpoints (a source and its FP8
  quantization, ``m3-trt quantize --calib``).
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from m3_trt.model.checkpoint import dequantize_fp8

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


# -- weights ------------------------------------------------------------------------------------


def is_fp8_weight(name: str, t: torch.Tensor) -> bool:
    """The tensors an FP8 build stores as E4M3 (decoder-layer Linear weights except the router)."""
    return name.startswith("model.language_model.layers.") and t.dim() >= 2 and not name.endswith("mlp.gate.weight")


def fp8_scale_shape(shape: tuple[int, ...], scale_block: tuple[int, int] | None) -> tuple[int, ...]:
    """Per output channel ``[..., rows, 1]``, or the block grid ``[..., rows/br, cols/bc]``."""
    *lead, rows, cols = shape
    if scale_block is None:
        return (*lead, rows, 1)
    br, bc = scale_block
    return (*lead, -(-rows // br), -(-cols // bc))


def quantize_weight(w: torch.Tensor, scale_inv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes E4M3, scale fp32)`` with ``w ≈ dequantize_fp8(codes, scale)``; keeps given block scales."""
    w = w.float()
    if scale_inv is None:
        scale = (w.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(1e-12)  # [..., rows, 1]
        return (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale
    rows, cols = w.shape[-2:]
    s = scale_inv.float() if scale_inv.dtype != torch.uint8 else (scale_inv.float() - 127).exp2()
    sr, sc = s.shape[-2:]
    full = s.repeat_interleave(rows // sr, dim=-2).repeat_interleave(cols // sc, dim=-1)
    return (w / full).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale_inv


def qdq_weight(w: torch.Tensor, scale_inv: torch.Tensor | None = None) -> torch.Tensor:
    q, s = quantize_weight(w, scale_inv)
    return dequantize_fp8(q, s, w.dtype)


def quantize_state(state: dict[str, torch.Tensor], block_scales: dict[str, torch.Tensor] | None = None,
                   progress=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """FP8 codes for the quantized tensors (others unchanged) and ``{name + "_scale_inv": scale}``."""
    out, scales = {}, {}
    for k, v in state.items():
        if is_fp8_weight(k, v):
            out[k], scales[k + "_scale_inv"] = quantize_weight(v, (block_scales or {}).get(k))
        else:
            out[k] = v
        if progress:
            progress(k)
    return out, scales


def dequantize_state(state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: dequantize_fp8(v, scales[k + "_scale_inv"], torch.float32, name=k) if k + "_scale_inv" in scales else v
            for k, v in state.items()}


# -- activations --------------------------------------------------------------------------------

def qdq_act(x: torch.Tensor, scale: float) -> torch.Tensor:
    return ((x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * scale).to(x.dtype)


def _emulated_moe_forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
    """The reference expert loop with FP8 QDQ on the expert inputs (``self._fp8`` holds the state)."""
    from m3_trt.plugins.swiglu_moe.reference import route, swiglu_oai

    emu, name = self._fp8
    B, S, D = x_BSD.shape
    c = self.cfg
    x = x_BSD.reshape(-1, D)
    weights, experts = route(x, self.gate.weight, self.gate.e_score_correction_bias, c.num_experts_per_tok)
    xq = emu.act(name + ".experts.gate_up_proj", x)
    out = torch.zeros_like(x)
    for e in range(self.experts.gate_up_proj.shape[0]):
        tok, slot = torch.where(experts == e)
        if tok.numel() == 0:
            continue
        h = swiglu_oai(F.linear(xq[tok], self.experts.gate_up_proj[e]), alpha=c.swiglu_alpha, limit=c.swiglu_limit)
        h = emu.act(name + ".experts.down_proj", h)
        out.index_add_(0, tok, (F.linear(h, self.experts.down_proj[e]) * weights[tok, slot, None]).to(out.dtype))
    out = out * c.routed_scaling_factor + self.shared_experts(x)
    return out.reshape(B, S, D)


class Fp8Emulation:
    """Calibrate (``observe``) then emulate (``quantize``) FP8 on a model's quantized matmuls in place.

    ``attach(model)`` replaces the quantized weights by their QDQ values and hooks every input;
    ``amax`` maps each weight name to the largest input magnitude seen while observing.
    """

    def __init__(self, block_scales: dict[str, torch.Tensor] | None = None):
        self.mode = "observe"
        self.amax: dict[str, float] = {}
        self.block_scales = block_scales or {}

    def act(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.amax[name] = max(self.amax.get(name, 0.0), float(x.detach().abs().max()) if x.numel() else 0.0)
            return x
        return qdq_act(x, self.scale(name))

    def scale(self, name: str) -> float:
        if name not in self.amax:
            raise RuntimeError(f"no calibration data for {name} (was it reached by the calibration prompts?)")
        return max(self.amax[name], 1e-12) / E4M3_MAX

    def attach(self, model: nn.Module, prefix: str = "") -> "Fp8Emulation":
        """``model``: the whole model, or one decoder layer with ``prefix`` = its full name
        (``model.language_model.layers.<i>``: the layer-by-layer calibration)."""
        from m3_trt.model.modeling import MoE

        with torch.no_grad():
            for name, p in model.named_parameters(prefix=prefix):
                if is_fp8_weight(name, p):
                    p.copy_(qdq_weight(p, self.block_scales.get(name)))
        for name, m in model.named_modules(prefix=prefix):
            if not name.startswith("model.language_model.layers."):
                continue
            if isinstance(m, MoE):
                m._fp8 = (self, name)
                m.forward = types.MethodType(_emulated_moe_forward, m)
            elif isinstance(m, nn.Linear) and not name.endswith(".mlp.gate"):  # the router stays high precision
                m.register_forward_pre_hook(lambda mod, args, _n=name + ".weight": (self.act(_n, args[0]),))
        return self

    def scales(self) -> dict[str, float]:
        return {k: self.scale(k) for k in sorted(self.amax)}


# -- calibration prompts ------------------------------------------------------------------------

BUILTIN_PROMPTS = (
    "Describe the picture in one sentence.",
    "What colours do you see, and where are they?",
    "Write a short poem about the sea.",
    "Explain how a transformer language model generates text.",
    "List three prime numbers larger than one hundred.",
    "Translate 'good morning' into French and German.",
)


def _builtin_image(seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    h, w = 56, 84
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    rgb = torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(6 * xx + 3 * yy)]) + 0.1 * torch.rand(3, h, w, generator=g)
    return Image.fromarray((rgb.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())


TOKEN_ID_PROMPTS = 6  # built-in prompts of a checkpoint without a tokenizer: seeded random ids
TOKEN_ID_LEN = 48
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def has_tokenizer(ckpt: str | Path) -> bool:
    return any((Path(ckpt) / f).is_file() for f in TOKENIZER_FILES)


def token_id_inputs(ckpt: str | Path, calib: str | Path | None = None) -> list[dict]:
    """Calibration inputs from token ids (a checkpoint without tokenizer files): ``calib`` lines
    ``{"input_ids": [int, ...]}``, or built-in seeded random ids below the image token (text only)."""
    from m3_trt.model.config import M3Config

    cfg = M3Config.from_pretrained(ckpt)
    V = min(cfg.text.vocab_size, min(t for t in (cfg.image_token_id, cfg.video_token_id) if t is not None)
            if cfg.image_token_id is not None else cfg.text.vocab_size)
    if calib is None:
        g = torch.Generator().manual_seed(0)
        return [{"input_ids": torch.randint(0, V, (1, TOKEN_ID_LEN), generator=g)} for _ in range(TOKEN_ID_PROMPTS)]
    out = []
    for n, line in enumerate(Path(calib).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            ids = json.loads(line)["input_ids"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{calib}:{n + 1}: the checkpoint has no tokenizer files ({', '.join(TOKENIZER_FILES)});"
                             f" calibration lines must be {{\"input_ids\": [int, ...]}}") from None
        if not (isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool)
                                                       and 0 <= i < cfg.text.vocab_size for i in ids)):
            raise ValueError(f"{calib}:{n + 1}: input_ids must be a non-empty list of ints in [0, "
                             f"{cfg.text.vocab_size})")
        out.append({"input_ids": torch.tensor([ids])})
    if not out:
        raise ValueError(f"{calib}: no calibration prompts")
    return out


def calibration_source(ckpt: str | Path, calib: str | Path | None) -> str:
    """What the calibration prompts are, in words (for the build report)."""
    if has_tokenizer(ckpt):
        return str(calib) if calib else "built-in"
    return (f"{calib} (token ids" if calib else f"built-in: {TOKEN_ID_PROMPTS} seeded random token-id prompts "
            f"of {TOKEN_ID_LEN} tokens, text only (") + "the checkpoint has no tokenizer files)"


def calibration_inputs(ckpt: str | Path, calib: str | Path | None = None) -> list[dict]:
    """Model inputs (``input_ids`` + optional ``pixel_values``/``image_grid_thw``) for calibration.

    Built-in: the text prompts above, every other one with a synthetic gradient image. ``calib``:
    a jsonl file, one ``{"text": str, "image": path (optional)}`` per line. A checkpoint without
    tokenizer files calibrates from token ids instead (:func:`token_id_inputs`).
    """
    from PIL import Image

    from m3_trt.processing import M3Processor

    if not has_tokenizer(ckpt):
        return token_id_inputs(ckpt, calib)
    proc = M3Processor.from_pretrained(ckpt)
    items: list[tuple[str, object]] = []
    if calib is None:
        items = [(t, _builtin_image(i) if i % 2 == 0 else None) for i, t in enumerate(BUILTIN_PROMPTS)]
    else:
        for n, line in enumerate(Path(calib).read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                text = rec["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{calib}:{n + 1}: expected a JSON object with a 'text' field") from None
            img = Image.open(Path(calib).parent / rec["image"]).convert("RGB") if rec.get("image") else None
            items.append((text, img))
        if not items:
            raise ValueError(f"{calib}: no calibration prompts")
    out = []
    for text, img in items:
        enc = proc.encode_chat(text, [img] if img is not None else [])
        out.append({k: enc[k] for k in ("input_ids", "pixel_values", "image_grid_thw") if k in enc})
    return out


@torch.no_grad()
def calibrate(model: nn.Module, inputs: list[dict], emu: Fp8Emulation | None = None) -> Fp8Emulation:
    """Attach an :class:`Fp8Emulation` to ``model`` and record input amax over ``inputs``."""
    emu = (emu or Fp8Emulation()).attach(model)
    emu.mode = "observe"
    for inp in inputs:
        model(**inp)
    emu.mode = "quantize"
    return emu


@torch.no_grad()
def layer_errors(ref: nn.Module, fp8: nn.Module, inputs: list[dict]) -> list[dict]:
    """Per decoder layer: ``isolated`` and ``cumulative`` relative error of FP8 vs the reference."""
    from m3_trt.model.modeling import rope_cos_sin

    n = ref.config.text.num_hidden_layers
    num_iso, num_cum, den = [0.0] * n, [0.0] * n, [0.0] * n
    for inp in inputs:
        _, _, h_ref = ref(**inp, return_hidden=True)
        _, _, h_q = fp8(**inp, return_hidden=True)
        S = h_ref[0].shape[1]
        pos = torch.arange(S)[None]
        cos, sin = rope_cos_sin(pos, ref.config.text, h_ref[0].dtype)
        for i in range(n):
            iso = fp8.model.language_model.layers[i](h_ref[i], cos, sin, pos, None)
            den[i] += float(h_ref[i + 1].double().norm() ** 2)
            num_iso[i] += float((iso.double() - h_ref[i + 1].double()).norm() ** 2)
            num_cum[i] += float((h_q[i + 1].double() - h_ref[i + 1].double()).norm() ** 2)
    return [{"layer": i, "variant": ref.config.text.layer_variant(i), "isolated": (num_iso[i] / den[i]) ** 0.5,
             "cumulative": (num_cum[i] / den[i]) ** 0.5} for i in range(n)]


@torch.no_grad()
def calibrate_layerwise(pm, inputs: list[dict], dtype: torch.dtype,
                        block_scales: Callable[[str], dict[str, torch.Tensor]] | None = None
                        ) -> tuple[Fp8Emulation, list[dict]]:
    """:func:`calibrate` + :func:`layer_errors` one decoder layer at a time (``pm``: a fresh
    :class:`m3_trt.model.pieces.PieceModel`; its modules get hooks).

    Per input three hidden states are carried from layer to layer: the reference (``dtype``), the
    calibration stream (QDQ weights, activations observed) and the FP8 stream (QDQ weights and
    activations). Layer ``i`` is loaded, run as the reference, then given QDQ weights: it observes
    every input's calibration stream (which fixes its activation scales), then runs the FP8 stream
    and the reference input (the ``isolated`` error). Only one layer's weights are in memory; the
    numbers equal the whole-model functions' (same modules, same order of accumulation).
    """
    from m3_trt.model.modeling import rope_cos_sin

    model = pm.model
    cfg = model.config
    emu = Fp8Emulation()
    with pm.loaded("embedding", dtype), pm.loaded("vision", dtype), pm.loaded("projector", dtype):
        h0 = [model.embed(inp["input_ids"], inp.get("pixel_values"), inp.get("image_grid_thw")) for inp in inputs]
    rope = []
    for h in h0:
        B, S, _ = h.shape
        pos = torch.arange(S)[None].expand(B, S)
        rope.append((*rope_cos_sin(pos, cfg.text, h.dtype), pos))
    h_ref, h_obs, h_q = list(h0), list(h0), list(h0)
    errors = []
    for i in range(cfg.text.num_hidden_layers):
        prefix = f"model.language_model.layers.{i}"
        with pm.loaded(f"layer.{i}", dtype):
            layer = model.model.language_model.layers[i]
            ref_out = [layer(h, c, s, p, None) for h, (c, s, p) in zip(h_ref, rope)]
            emu.block_scales = block_scales(f"layer.{i}") if block_scales else {}
            emu.attach(layer, prefix)
            emu.mode = "observe"
            h_obs = [layer(h, c, s, p, None) for h, (c, s, p) in zip(h_obs, rope)]
            emu.mode = "quantize"
            h_q = [layer(h, c, s, p, None) for h, (c, s, p) in zip(h_q, rope)]
            iso = [layer(h, c, s, p, None) for h, (c, s, p) in zip(h_ref, rope)]
        den = num_iso = num_cum = 0.0
        for r, a, q in zip(ref_out, iso, h_q):
            den += float(r.double().norm() ** 2)
            num_iso += float((a.double() - r.double()).norm() ** 2)
            num_cum += float((q.double() - r.double()).norm() ** 2)
        errors.append({"layer": i, "variant": cfg.text.layer_variant(i), "isolated": (num_iso / den) ** 0.5,
                       "cumulative": (num_cum / den) ** 0.5})
        h_ref = ref_out
    emu.block_scales = {}
    return emu, errors


@torch.no_grad()
def layer_output_errors(ref_pm, q_pm, inputs: list[dict], dtype: torch.dtype = torch.float32) -> list[dict]:
    """Per decoder layer, the relative L2 error of ``q_pm``'s layer output against ``ref_pm``'s on
    ``inputs`` (both :class:`m3_trt.model.pieces.PieceModel`: e.g. a bf16 checkpoint and its FP8
    quantization, read dequantized), in ``dtype``.

    ``isolated``: q's layer ``i`` on the reference's input to layer ``i`` (the error that layer
    adds); ``cumulative``: the hidden state after layer ``i`` when every layer so far is q's. Hidden
    states are carried from layer to layer, so one decoder layer's weights are in memory at a time
    (the reference's, then q's); embedding, vision tower and projector come from ``ref_pm``.
    """
    from m3_trt.model.modeling import rope_cos_sin

    ref, q = ref_pm.model, q_pm.model
    cfg = ref.config
    with ref_pm.loaded("embedding", dtype), ref_pm.loaded("vision", dtype), ref_pm.loaded("projector", dtype):
        h_ref = [ref.embed(inp["input_ids"], inp.get("pixel_values"), inp.get("image_grid_thw")) for inp in inputs]
    rope = []
    for h in h_ref:
        B, S, _ = h.shape
        pos = torch.arange(S)[None].expand(B, S)
        rope.append((*rope_cos_sin(pos, cfg.text, h.dtype), pos))
    h_q = list(h_ref)
    errors = []
    for i in range(cfg.text.num_hidden_layers):
        with ref_pm.loaded(f"layer.{i}", dtype):
            layer = ref.model.language_model.layers[i]
            ref_out = [layer(h, c, s, p, None) for h, (c, s, p) in zip(h_ref, rope)]
        with q_pm.loaded(f"layer.{i}", dtype):
            layer = q.model.language_model.layers[i]
            h_q = [layer(h, c, s, p, None) for h, (c, s, p) in zip(h_q, rope)]
            iso = [layer(h, c, s, p, None) for h, (c, s, p) in zip(h_ref, rope)]
        den = num_iso = num_cum = 0.0
        for r, a, b in zip(ref_out, iso, h_q):
            den += float(r.double().norm() ** 2)
            num_iso += float((a.double() - r.double()).norm() ** 2)
            num_cum += float((b.double() - r.double()).norm() ** 2)
        errors.append({"layer": i, "variant": cfg.text.layer_variant(i), "isolated": (num_iso / den) ** 0.5,
                       "cumulative": (num_cum / den) ** 0.5})
        h_ref = ref_out
    return errors
