"""Checkpoint IO: lazy sharded safetensors, the key-mapping table, FP8 dequantization.

Two on-disk layouts load through one table (:data:`RULES`):

* the original MiniMax layout (what transformers' ``save_pretrained`` writes), e.g.
  ``language_model.model.layers.3.block_sparse_moe.experts.7.w1.weight``;
* transformers' in-memory layout (``model.language_model.layers.3.mlp.experts.gate_up_proj``),
  which is also our own module tree, so that layout maps onto itself.

Each rule maps a source key to a target parameter and a *placement* (the whole tensor, a half of
the fused gate/up rows, or one expert's slot). Loading fills a model built on the ``meta``
device one tensor at a time and returns a :class:`LoadReport`; anything missing, unused,
misshapen or non-finite is an error naming the key.

FP8 (E4M3) weights carry a sibling ``<name>_scale_inv``: float32 block scales (e.g. 128×128)
or MXFP8 E8M0 exponents stored as uint8 (``[1, 32]`` blocks, scale ``2**(e - 127)``). The block
shape is derived from the scale grid (``rows // scale_rows``, ``cols // scale_cols``), as
transformers' ``Fp8Dequantize`` does.

Stored dtypes are checked against the target, never cast blindly: a float parameter accepts a
float dtype, or an FP8 code with its ``_scale_inv`` sibling; a ``_scale_inv`` is float32 or uint8
(E8M0). Anything else (an I32 or U8 relabelling of a float tensor …) is a :class:`CheckpointError`
naming the key, the stored dtype and what was expected.

Shard names in ``model.safetensors.index.json`` must be plain file names in the checkpoint folder
(no ``/``, ``\\``, ``..``, absolute paths): they are checked as strings before anything is opened,
so a refused name says nothing about files outside the folder. (A shard may still be a symlink:
the Hugging Face cache keeps ``snapshots/<rev>/*.safetensors`` as links into ``blobs/``.)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
SCALE_DTYPES = (torch.float32, torch.uint8)  # block scales, MXFP8 E8M0 exponents


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file or the key."""


# -- the mapping table -------------------------------------------------------------------------
# (source regex, target template, placement). Placements: "whole"; "half0"/"half1" (first/second
# half of dim 0, for gate||up fused rows); "expert" (slot E of dim 0); "expert_half0/1" (slot E,
# first/second half of its rows). Group "E" of the regex names the expert.
_LM = r"^language_model\.model\.layers\.(?P<L>\d+)\."
_TM = r"model.language_model.layers.\g<L>."
RULES: tuple[tuple[str, str, str], ...] = (
    # original MiniMax layout
    (r"^language_model\.lm_head\.weight$", "lm_head.weight", "whole"),
    (r"^language_model\.model\.embed_tokens\.weight$", "model.language_model.embed_tokens.weight", "whole"),
    (r"^language_model\.model\.norm\.weight$", "model.language_model.norm.weight", "whole"),
    (_LM + r"block_sparse_moe\.experts\.(?P<E>\d+)\.w1\.weight$", _TM + "mlp.experts.gate_up_proj", "expert_half0"),
    (_LM + r"block_sparse_moe\.experts\.(?P<E>\d+)\.w3\.weight$", _TM + "mlp.experts.gate_up_proj", "expert_half1"),
    (_LM + r"block_sparse_moe\.experts\.(?P<E>\d+)\.w2\.weight$", _TM + "mlp.experts.down_proj", "expert"),
    (_LM + r"block_sparse_moe\.gate\.weight$", _TM + "mlp.gate.weight", "whole"),
    (_LM + r"block_sparse_moe\.e_score_correction_bias$", _TM + "mlp.gate.e_score_correction_bias", "whole"),
    (_LM + r"block_sparse_moe\.shared_experts\.gate_proj\.weight$", _TM + "mlp.shared_experts.gate_up_proj.weight", "half0"),
    (_LM + r"block_sparse_moe\.shared_experts\.up_proj\.weight$", _TM + "mlp.shared_experts.gate_up_proj.weight", "half1"),
    (_LM + r"block_sparse_moe\.shared_experts\.down_proj\.weight$", _TM + "mlp.shared_experts.down_proj.weight", "whole"),
    (_LM + r"mlp\.gate_proj\.weight$", _TM + "mlp.gate_up_proj.weight", "half0"),
    (_LM + r"mlp\.up_proj\.weight$", _TM + "mlp.gate_up_proj.weight", "half1"),
    (_LM + r"mlp\.down_proj\.weight$", _TM + "mlp.down_proj.weight", "whole"),
    (_LM + r"self_attn\.index_(?P<P>q_proj|k_proj|q_norm|k_norm)\.weight$", _TM + r"self_attn.indexer.\g<P>.weight", "whole"),
    (_LM + r"self_attn\.(?P<P>q_proj|k_proj|v_proj|o_proj|q_norm|k_norm)\.weight$", _TM + r"self_attn.\g<P>.weight", "whole"),
    (_LM + r"(?P<P>input_layernorm|post_attention_layernorm)\.weight$", _TM + r"\g<P>.weight", "whole"),
    (r"^vision_tower\.vision_model\.embeddings\.patch_embedding\.weight$", "model.vision_tower.embeddings.proj.weight", "whole"),
    (r"^vision_tower\.vision_model\.pre_layrnorm\.(?P<P>weight|bias)$", r"model.vision_tower.pre_layrnorm.\g<P>", "whole"),
    (r"^vision_tower\.vision_model\.encoder\.layers\.(?P<R>.+)$", r"model.vision_tower.layers.\g<R>", "whole"),
    (r"^multi_modal_projector\.(?P<P>linear_[12])\.(?P<W>weight|bias)$", r"model.multi_modal_projector.\g<P>.\g<W>", "whole"),
    (r"^patch_merge_mlp\.linear_(?P<N>[12])\.(?P<W>weight|bias)$", r"model.multi_modal_projector.merge_linear_\g<N>.\g<W>", "whole"),
    # transformers' in-memory layout == our module tree
    (r"^(?P<K>(model\.(language_model|vision_tower|multi_modal_projector)\.|lm_head\.).+)$", r"\g<K>", "whole"),
)
# Keys transformers itself skips on load (multi-token-prediction heads).
IGNORED = (re.compile(r"(^|\.)mtp\."),)
_COMPILED = tuple((re.compile(p), t, place) for p, t, place in RULES)


def map_key(key: str) -> tuple[str, str, int | None] | None:
    """``(target, placement, expert)`` for a source key, or None if no rule matches."""
    for rx, target, place in _COMPILED:
        m = rx.match(key)
        if m:
            expert = int(m.group("E")) if "E" in rx.groupindex else None
            return m.expand(target), place, expert
    return None


# -- FP8 ----------------------------------------------------------------------------------------

def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                   name: str = "weight") -> torch.Tensor:
    """FP8 ``[..., rows, cols]`` times its block scales -> ``dtype``.

    ``scale_inv`` is float32 (e.g. ``[rows/128, cols/128]``) or uint8 E8M0 (MXFP8, ``[rows, cols/32]``).
    """
    rows, cols = weight.shape[-2:]
    if scale_inv.dim() < 2:
        scale_inv = scale_inv.reshape(1, 1)
    s_rows, s_cols = scale_inv.shape[-2:]
    if rows % s_rows or cols % s_cols:
        raise CheckpointError(
            f"{name}: weight shape ({rows}, {cols}) is not divisible by its scale grid ({s_rows}, {s_cols})")
    if scale_inv.dtype == torch.uint8:
        s = (scale_inv.to(torch.float32) - 127.0).exp2()
    else:
        s = scale_inv.to(torch.float32)
    q = weight.to(torch.float32).reshape(-1, s_rows, rows // s_rows, s_cols, cols // s_cols)
    s = s.reshape(-1, s_rows, s_cols)[:, :, None, :, None]
    return (q * s).reshape(weight.shape).to(dtype)


# -- reading ------------------------------------------------------------------------------------

class SafetensorsCheckpoint:
    """Lazy view over ``model.safetensors`` or a sharded ``model.safetensors.index.json``."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint folder {self.path} does not exist")
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_weight_map(index)
            files = sorted(set(weight_map.values()))
        elif (self.path / "model.safetensors").is_file():
            files, weight_map = ["model.safetensors"], None
        else:
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        self._handles = {}
        self.key_to_file: dict[str, str] = {}
        for f in files:
            fp = self.path / f
            if not fp.is_file():
                raise CheckpointError(f"{fp}: shard named in the index is missing")
            try:
                h = safe_open(str(fp), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{fp}: corrupt safetensors header ({e})") from None
            self._handles[f] = h
            for k in h.keys():
                self.key_to_file[k] = f
        if weight_map is not None:
            absent = sorted(k for k, f in weight_map.items() if self.key_to_file.get(k) != f)
            if absent:
                raise CheckpointError(f"{index}: {len(absent)} keys listed but not in their shard, e.g. {absent[:3]}")

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self.key_to_file[key]].get_tensor(key)
        except KeyError:
            raise CheckpointError(f"{key}: not in the checkpoint") from None
        except Exception as e:
            raise CheckpointError(f"{key}: cannot be read from {self.key_to_file[key]} ({e})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.key_to_file[key]].get_slice(key).get_shape())


def read_weight_map(index: Path) -> dict[str, str]:
    """``weight_map`` of a safetensors index, every value a plain shard file name (see module doc)."""
    try:
        raw = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    if not isinstance(raw, dict) or "weight_map" not in raw:
        raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map' object)")
    weight_map = raw["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' must be an object of tensor name -> shard file name, "
                              f"got {type(weight_map).__name__}")
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{index}: weight_map[{key!r}] must be a shard file name (a string), "
                                  f"got {type(name).__name__}")
        if not _plain_file_name(name):
            raise CheckpointError(f"{index}: weight_map[{key!r}] = {name!r} is not a plain file name in the "
                                  f"checkpoint folder (no '/', '\\', '..' or absolute paths); refusing it")
    return weight_map


def _plain_file_name(name: str) -> bool:
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def check_dtype(key: str, dtype: torch.dtype, *, float_target: bool, scale: bool = False) -> None:
    """Refuse a stored dtype the target cannot take as is (a relabelled tensor would load as garbage)."""
    if scale:
        if dtype not in SCALE_DTYPES:
            raise CheckpointError(f"{key}: stored as {_st_name(dtype)}; an FP8 scale must be F32 (block scales) "
                                  f"or U8 (E8M0 exponents)")
    elif float_target and dtype not in FLOAT_DTYPES and dtype not in FP8_DTYPES:
        raise CheckpointError(f"{key}: stored as {_st_name(dtype)}, but it is a float parameter; expected F32, F16, "
                              f"BF16 or F64, or F8_E4M3/F8_E5M2 with a {key + SCALE_SUFFIX} beside it")


_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL", **{d: n for d, n in zip(FP8_DTYPES, ("F8_E4M3", "F8_E5M2"))}}


def _st_name(dtype: torch.dtype) -> str:
    return _ST_NAMES.get(dtype, str(dtype).replace("torch.", ""))


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)     # source keys used
    missing: list[str] = field(default_factory=list)    # target parameters (or rows) never written
    unused: list[str] = field(default_factory=list)     # source keys no rule consumed
    dequantized: list[str] = field(default_factory=list)
    layout: str = ""

    def raise_for_problems(self) -> None:
        problems = []
        if self.missing:
            problems.append(f"missing {len(self.missing)}: {', '.join(self.missing[:8])}")
        if self.unused:
            problems.append(f"unused {len(self.unused)}: {', '.join(self.unused[:8])}")
        if problems:
            raise CheckpointError("checkpoint does not match the model; " + "; ".join(problems))


def place(param: torch.Tensor, placement: str, expert: int | None) -> tuple[torch.Tensor, tuple]:
    """The view of ``param`` a placement writes, and the coverage index it marks."""
    if placement == "whole":
        return param, (slice(None),)
    if placement in ("half0", "half1"):
        h = param.shape[0] // 2
        sl = slice(0, h) if placement == "half0" else slice(h, 2 * h)
        return param[sl], (sl,)
    if expert is None or expert >= param.shape[0]:
        raise CheckpointError(f"expert index {expert} out of range for a tensor of {param.shape[0]} experts")
    if placement == "expert":
        return param[expert], (expert,)
    h = param.shape[1] // 2
    sl = slice(0, h) if placement == "expert_half0" else slice(h, 2 * h)
    return param[expert, sl], (expert, sl)


def load_into(module: torch.nn.Module, ckpt: SafetensorsCheckpoint, *, progress=None) -> LoadReport:
    """Fill ``module``'s parameters and persistent buffers from ``ckpt``, one tensor at a time."""
    targets = dict(module.named_parameters())
    targets.update({k: v for k, v in module.named_buffers() if k.split(".")[-1] not in module_nonpersistent(module)})
    coverage = {k: torch.zeros(v.shape[:-1] if v.dim() > 1 else (), dtype=torch.bool) for k, v in targets.items()}
    report = LoadReport()
    keys = ckpt.keys()
    report.layout = "original" if any(k.startswith("language_model.model.") for k in keys) else "transformers"
    all_scales = frozenset(k for k in keys if k.endswith(SCALE_SUFFIX))
    scale_keys = set(all_scales)  # not yet consumed by their FP8 weight
    for key in keys:
        if key in all_scales:
            continue
        if any(rx.search(key) for rx in IGNORED):
            report.loaded.append(key)
            continue
        hit = map_key(key)
        if hit is None or hit[0] not in targets:
            report.unused.append(key)
            continue
        target, how, expert = hit
        param = targets[target]
        tensor = ckpt.get(key)
        scale_key = _scale_key(key)
        check_dtype(key, tensor.dtype, float_target=param.is_floating_point())
        if tensor.dtype in FP8_DTYPES:
            if scale_key not in all_scales:
                raise CheckpointError(f"{key}: FP8 tensor without its {scale_key}")
            scale = ckpt.get(scale_key)
            check_dtype(scale_key, scale.dtype, float_target=True, scale=True)
            tensor = dequantize_fp8(tensor, scale, torch.float32, name=key)
            report.dequantized.append(key)
            scale_keys.discard(scale_key)
            report.loaded.append(scale_key)
        view, cov_idx = place(param, how, expert)
        if tuple(tensor.shape) != tuple(view.shape):
            raise CheckpointError(f"{key}: shape {tuple(tensor.shape)} does not fit {target} "
                                  f"(expects {tuple(view.shape)} for placement {how!r})")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{key}: contains non-finite values (NaN or Inf)")
        with torch.no_grad():
            view.copy_(tensor)
        cov = coverage[target]
        if cov.dim() == 0:
            cov.fill_(True)
        else:
            cov[cov_idx] = True
        report.loaded.append(key)
        if progress is not None:
            progress(key)
    report.unused.extend(sorted(scale_keys))  # scales whose weight was not FP8 or not present
    report.missing = [k for k, c in coverage.items() if not bool(c.all())]
    return report


def _scale_key(key: str) -> str:
    return key + SCALE_SUFFIX


def module_nonpersistent(module: torch.nn.Module) -> set[str]:
    names = set()
    for m in module.modules():
        names |= set(getattr(m, "_non_persistent_buffers_set", ()))
    return names


# -- writing (the original on-disk layout) ------------------------------------------------------

def original_layout(state: dict[str, torch.Tensor], num_layers: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Our module tree -> the original MiniMax key layout (the inverse of :data:`RULES`)."""
    for key, t in state.items():
        m = re.match(r"^model\.language_model\.layers\.(\d+)\.(.+)$", key)
        if m:
            pre, rest = f"language_model.model.layers.{m.group(1)}.", m.group(2)
            if rest == "mlp.experts.gate_up_proj":
                f = t.shape[1] // 2
                for e in range(t.shape[0]):
                    yield pre + f"block_sparse_moe.experts.{e}.w1.weight", t[e, :f]
                    yield pre + f"block_sparse_moe.experts.{e}.w3.weight", t[e, f:]
            elif rest == "mlp.experts.down_proj":
                for e in range(t.shape[0]):
                    yield pre + f"block_sparse_moe.experts.{e}.w2.weight", t[e]
            elif rest == "mlp.gate.weight":
                yield pre + "block_sparse_moe.gate.weight", t
            elif rest == "mlp.gate.e_score_correction_bias":
                yield pre + "block_sparse_moe.e_score_correction_bias", t
            elif rest.startswith("mlp.shared_experts."):
                sub = rest[len("mlp.shared_experts."):]
                if sub == "gate_up_proj.weight":
                    h = t.shape[0] // 2
                    yield pre + "block_sparse_moe.shared_experts.gate_proj.weight", t[:h]
                    yield pre + "block_sparse_moe.shared_experts.up_proj.weight", t[h:]
                else:
                    yield pre + "block_sparse_moe.shared_experts." + sub, t
            elif rest == "mlp.gate_up_proj.weight":
                h = t.shape[0] // 2
                yield pre + "mlp.gate_proj.weight", t[:h]
                yield pre + "mlp.up_proj.weight", t[h:]
            elif rest.startswith("self_attn.indexer."):
                yield pre + "self_attn.index_" + rest[len("self_attn.indexer."):], t
            else:
                yield pre + rest, t
            continue
        for src, dst in (("lm_head.", "language_model.lm_head."),
                         ("model.language_model.", "language_model.model."),
                         ("model.vision_tower.embeddings.proj.", "vision_tower.vision_model.embeddings.patch_embedding."),
                         ("model.vision_tower.pre_layrnorm.", "vision_tower.vision_model.pre_layrnorm."),
                         ("model.vision_tower.layers.", "vision_tower.vision_model.encoder.layers."),
                         ("model.multi_modal_projector.merge_linear_", "patch_merge_mlp.linear_"),
                         ("model.multi_modal_projector.", "multi_modal_projector.")):
            if key.startswith(src):
                yield dst + key[len(src):], t
                break
        else:
            raise CheckpointError(f"{key}: no on-disk name for this parameter")


def write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int) -> list[str]:
    """Write ``model-0000i-of-0000n.safetensors`` + index; returns the shard names."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t.contiguous().clone()
        size += nbytes
    n = len(shards)
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        names.append(name)
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return names
