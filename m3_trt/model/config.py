"""MiniMax-M3-VL configuration: frozen dataclasses read from a checkpoint's ``config.json``.

The reading follows transformers 5.23's ``MiniMaxM3VLConfig`` (the specification), including the
legacy keys it accepts: ``sparse_attention_config`` (``sparse_num_index_heads`` … and
``sparse_attention_freq``), ``moe_layer_freq``, top-level ``rope_theta`` / ``partial_rotary_factor``
beside ``rope_parameters``. Every invalid value raises :class:`ConfigError` naming the key.

The rotated width of the text RoPE is ``int(head_dim * partial_rotary_factor)`` (what
transformers computes: ``MiniMaxM3VLRotaryEmbedding.compute_default_rope_parameters``; a missing
factor is 1.0). transformers declares a ``rotary_dim`` key (default 64, always written by
``save_pretrained``) but never reads it, so a ``rotary_dim`` that disagrees with the factor is
reported in :attr:`M3Config.notes` (and as a :class:`ConfigNote` warning), not an error.

Keys that set a tensor shape (:data:`REQUIRED_TEXT` …) must be present: transformers would fill a
missing one with the full-size default (hidden 6144 …), which silently describes another model;
``save_pretrained`` always writes them. Every other key takes transformers' default (a missing
``projector_hidden_size`` too, with a note: see :data:`PROJECTOR_DEFAULT`). Values are
type-checked before anything is sized from them (``num_hidden_layers`` at most
:data:`MAX_LAYERS`), so a bad value is a :class:`ConfigError`, never a ``TypeError``,
``ZeroDivisionError`` or ``MemoryError``.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

LAYER_TYPES = ("full_attention", "minimax_m3_sparse")
MLP_LAYER_TYPES = ("dense", "sparse")


# Keys that set tensor shapes: required (no silent full-size default). The MoE / dense / indexer
# groups are required only when some layer uses them (the legacy ``sparse_attention_config``
# names count for the indexer ones).
REQUIRED_TEXT = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim")
REQUIRED_MOE = ("intermediate_size", "shared_intermediate_size", "num_local_experts", "num_experts_per_tok")
REQUIRED_DENSE = ("dense_intermediate_size",)
REQUIRED_INDEXER = ("index_n_heads", "index_head_dim")
REQUIRED_VISION = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# projector_hidden_size is the one shape key that takes transformers' default (6144) when missing,
# with a note: the released checkpoint's remote-code config may not carry it, and the projector
# weights' shapes are checked against it at load anyway.
PROJECTOR_DEFAULT = 6144
# Checked before any per-layer list is built from num_hidden_layers (full size has 60 text and
# 32 vision layers): a bound, not a model limit, so that 10**9 is a named error, not a MemoryError.
MAX_LAYERS = 4096


class ConfigError(ValueError):
    """A config.json value that the model cannot use; the message names the key and the value."""


class ConfigNote(UserWarning):
    """A config.json value we read differently from its face value, as transformers does (e.g. an
    ignored ``rotary_dim``); the model still loads. Also kept in :attr:`M3Config.notes`."""


def _need(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"config key {key!r} = {value!r}: {why}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _need_pos_int(key: str, v: Any, hi: int | None = None) -> None:
    _need(_is_int(v) and v > 0, key, v, "must be a positive integer")
    if hi is not None:
        _need(v <= hi, key, v, f"must be at most {hi}")


def _need_pos_number(key: str, v: Any) -> None:
    _need(_is_number(v) and v > 0, key, v, "must be a finite number > 0")


def _need_token(key: str, v: Any, vocab_size: int, optional: bool = True) -> None:
    if v is None and optional:
        return
    _need(_is_int(v) and 0 <= v < vocab_size, key, v, f"must be an integer token id below vocab_size={vocab_size}")


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 200064
    hidden_size: int = 6144
    num_hidden_layers: int = 60
    num_attention_heads: int = 64
    num_key_value_heads: int = 4
    head_dim: int = 128
    rotary_dim: int = 64
    rope_theta: float = 5_000_000.0
    rms_norm_eps: float = 1e-6
    intermediate_size: int = 3072  # per routed expert
    dense_intermediate_size: int = 12288
    shared_intermediate_size: int = 3072
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    routed_scaling_factor: float = 2.0
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    layer_types: tuple[str, ...] = ()
    mlp_layer_types: tuple[str, ...] = ()
    index_n_heads: int = 4
    index_head_dim: int = 128
    index_block_size: int = 128
    index_topk_blocks: int = 16
    index_local_blocks: int = 1
    max_position_embeddings: int = 524288
    bos_token_id: int | None = 200034
    eos_token_id: tuple[int, ...] = (200020,)
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        _need_pos_int("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)  # before sizing lists by it
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        if not self.mlp_layer_types:
            object.__setattr__(self, "mlp_layer_types", ("sparse",) * self.num_hidden_layers)
        self.validate()

    def validate(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "intermediate_size", "dense_intermediate_size",
                    "shared_intermediate_size", "num_local_experts", "num_experts_per_tok", "index_n_heads",
                    "index_head_dim", "index_block_size", "index_topk_blocks", "max_position_embeddings"):
            _need_pos_int(key, getattr(self, key), MAX_LAYERS if key == "num_hidden_layers" else None)
        _need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
              self.num_key_value_heads, f"must divide num_attention_heads={self.num_attention_heads}")
        _need(_is_int(self.rotary_dim) and 0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
              "rotary_dim", self.rotary_dim, f"must be even and within 1..head_dim={self.head_dim}")
        for key in ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "swiglu_alpha", "swiglu_limit"):
            _need_pos_number(key, getattr(self, key))
        _need(isinstance(self.tie_word_embeddings, bool), "tie_word_embeddings", self.tie_word_embeddings,
              "must be true or false")
        _need(len(self.layer_types) == self.num_hidden_layers, "layer_types", list(self.layer_types),
              f"needs one entry per layer (num_hidden_layers={self.num_hidden_layers})")
        _need(len(self.mlp_layer_types) == self.num_hidden_layers, "mlp_layer_types", list(self.mlp_layer_types),
              f"needs one entry per layer (num_hidden_layers={self.num_hidden_layers})")
        for i, t in enumerate(self.layer_types):
            _need(t in LAYER_TYPES, f"layer_types[{i}]", t, f"unknown layer type (known: {', '.join(LAYER_TYPES)})")
        for i, t in enumerate(self.mlp_layer_types):
            _need(t in MLP_LAYER_TYPES, f"mlp_layer_types[{i}]", t,
                  f"unknown MLP type (known: {', '.join(MLP_LAYER_TYPES)})")
        _need(self.num_experts_per_tok <= self.num_local_experts, "num_experts_per_tok", self.num_experts_per_tok,
              f"cannot exceed num_local_experts={self.num_local_experts}")
        if self.has_sparse_layers:
            # transformers expands the indexer's per-head selection onto query heads by
            # num_attention_heads // index_n_heads: one selection per KV group.
            _need(self.index_n_heads == self.num_key_value_heads, "index_n_heads", self.index_n_heads,
                  f"must equal num_key_value_heads={self.num_key_value_heads} (one block selection per KV group)")
        _need(_is_int(self.index_local_blocks) and self.index_local_blocks >= 0, "index_local_blocks",
              self.index_local_blocks, "must be an integer >= 0")
        for key in ("bos_token_id", "pad_token_id"):
            _need_token(key, getattr(self, key), self.vocab_size)
        _need(isinstance(self.eos_token_id, tuple), "eos_token_id", self.eos_token_id, "must be a tuple of token ids")
        for v in self.eos_token_id:
            _need_token("eos_token_id", v, self.vocab_size, optional=False)

    @property
    def has_sparse_layers(self) -> bool:
        return "minimax_m3_sparse" in self.layer_types

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def layer_variant(self, i: int) -> str:
        """``full-dense``, ``full-moe``, ``sparse-dense`` or ``sparse-moe``."""
        attn = "sparse" if self.layer_types[i] == "minimax_m3_sparse" else "full"
        mlp = "moe" if self.mlp_layer_types[i] == "sparse" else "dense"
        return f"{attn}-{mlp}"


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_channels", "patch_size", "temporal_patch_size", "spatial_merge_size"):
            _need_pos_int(f"vision_config.{key}", getattr(self, key),
                          MAX_LAYERS if key == "num_hidden_layers" else None)
        _need(self.hidden_size % self.num_attention_heads == 0, "vision_config.num_attention_heads",
              self.num_attention_heads, f"must divide vision_config.hidden_size={self.hidden_size}")
        for key in ("layer_norm_eps", "rope_theta"):
            _need_pos_number(f"vision_config.{key}", getattr(self, key))
        _need(self.hidden_act in ("gelu",), "vision_config.hidden_act", self.hidden_act, "only 'gelu' is supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class M3Config:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 200025
    video_token_id: int = 200026
    projector_hidden_size: int = 6144
    tie_word_embeddings: bool = False
    # What was read differently from its face value (e.g. an ignored rotary_dim); not part of the model.
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for key, v in (("image_token_index", self.image_token_id), ("video_token_index", self.video_token_id)):
            _need_token(key, v, self.text.vocab_size, optional=False)
        _need_pos_int("projector_hidden_size", self.projector_hidden_size)
        _need(isinstance(self.tie_word_embeddings, bool), "tie_word_embeddings", self.tie_word_embeddings,
              "must be true or false")

    @property
    def merged_hidden_size(self) -> int:
        return self.text.hidden_size * self.vision.spatial_merge_size**2

    # -- reading / writing ------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> "M3Config":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no config.json at {file}")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "M3Config":
        if not isinstance(raw, dict):
            raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
        mt = raw.get("model_type")
        if mt is not None and mt != "minimax_m3_vl":
            raise ConfigError(f"config key 'model_type' = {mt!r}: expected 'minimax_m3_vl'")
        text_raw = raw.get("text_config")
        vision_raw = raw.get("vision_config")
        if not isinstance(text_raw, dict):
            raise ConfigError(f"config key 'text_config' = {text_raw!r}: must be an object")
        if not isinstance(vision_raw, dict):
            raise ConfigError(f"config key 'vision_config' = {vision_raw!r}: must be an object")
        notes: list[str] = []
        text = _text_from_dict(text_raw, notes)
        vision = _vision_from_dict(vision_raw)
        if "projector_hidden_size" not in raw:
            notes.append(f"config key 'projector_hidden_size' is missing: using transformers' default "
                         f"{PROJECTOR_DEFAULT} (the projector weights must have that width)")
        tie = raw.get("tie_word_embeddings", False)
        _need(isinstance(tie, bool), "tie_word_embeddings", tie, "must be true or false")
        for note in notes:
            warnings.warn(note, ConfigNote, stacklevel=2)
        return cls(
            text=text,
            vision=vision,
            image_token_id=raw.get("image_token_index", raw.get("image_token_id", 200025)),
            video_token_id=raw.get("video_token_index", raw.get("video_token_id", 200026)),
            projector_hidden_size=raw.get("projector_hidden_size", PROJECTOR_DEFAULT),
            tie_word_embeddings=tie or text.tie_word_embeddings,  # as transformers: either one ties
            notes=tuple(notes),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` that transformers 5.23 reads back into the same model."""
        t, v = self.text, self.vision
        text = {k: val for k, val in asdict(t).items() if k not in ("rope_theta", "eos_token_id")}
        text.update(
            model_type="minimax_m3_vl_text",
            layer_types=list(t.layer_types),
            mlp_layer_types=list(t.mlp_layer_types),
            eos_token_id=t.eos_token_id[0] if len(t.eos_token_id) == 1 else list(t.eos_token_id),
            rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                             "partial_rotary_factor": t.rotary_dim / t.head_dim},
            hidden_act="silu",
        )
        vision = {k: val for k, val in asdict(v).items() if k != "rope_theta"}
        vision.update(model_type="minimax_m3_vl_vision",
                      rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
        return {
            "architectures": ["MiniMaxM3SparseForConditionalGeneration"],
            "model_type": "minimax_m3_vl",
            "text_config": text,
            "vision_config": vision,
            "image_token_index": self.image_token_id,
            "video_token_index": self.video_token_id,
            "projector_hidden_size": self.projector_hidden_size,
            "tie_word_embeddings": self.tie_word_embeddings,
        }

    def with_text(self, **changes: Any) -> "M3Config":
        return replace(self, text=replace(self.text, **changes))


def _require(raw: dict, keys: tuple[str, ...], prefix: str) -> None:
    missing = [k for k in keys if k not in raw]
    if missing:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"config keys {', '.join(where + k for k in missing)} are missing: they set tensor shapes, "
                          f"and a default would describe the full-size model, not this checkpoint")


def _list(key: str, flags: Any, n_layers: int) -> tuple:
    _need(isinstance(flags, (list, tuple)), key, flags, "must be a list")
    _need(len(flags) == n_layers, key, list(flags), f"needs one entry per layer (num_hidden_layers={n_layers})")
    return tuple(flags)


def _text_from_dict(raw: dict[str, Any], notes: list[str]) -> TextConfig:
    _require(raw, REQUIRED_TEXT, "text_config")
    n_layers = raw["num_hidden_layers"]
    _need_pos_int("num_hidden_layers", n_layers, MAX_LAYERS)  # before any list is sized by it
    known = {f for f in TextConfig.__dataclass_fields__}
    kw: dict[str, Any] = {k: raw[k] for k in known if k in raw and k not in ("layer_types", "mlp_layer_types",
                                                                               "eos_token_id", "rotary_dim",
                                                                               "rope_theta")}
    # legacy sparse attention block
    sparse = raw.get("sparse_attention_config") or {}
    if not isinstance(sparse, dict):
        raise ConfigError(f"config key 'sparse_attention_config' = {sparse!r}: must be an object")
    for flat, legacy in (("index_n_heads", "sparse_num_index_heads"), ("index_head_dim", "sparse_index_dim"),
                         ("index_block_size", "sparse_block_size"), ("index_topk_blocks", "sparse_topk_blocks"),
                         ("index_local_blocks", "sparse_local_block")):
        if legacy in sparse:
            kw[flat] = sparse[legacy]

    layer_types = raw.get("layer_types")
    if layer_types is None and "sparse_attention_freq" in sparse:
        freq = _list("sparse_attention_config.sparse_attention_freq", sparse["sparse_attention_freq"], n_layers)
        layer_types = ["minimax_m3_sparse" if f else "full_attention" for f in freq]
    mlp_types = raw.get("mlp_layer_types")
    if mlp_types is None and raw.get("moe_layer_freq") is not None:
        freq = _list("moe_layer_freq", raw["moe_layer_freq"], n_layers)
        mlp_types = ["sparse" if f else "dense" for f in freq]
    kw["layer_types"] = (_list("layer_types", layer_types, n_layers) if layer_types is not None
                         else ("full_attention",) * n_layers)
    kw["mlp_layer_types"] = (_list("mlp_layer_types", mlp_types, n_layers) if mlp_types is not None
                             else ("sparse",) * n_layers)
    # kw holds the flat keys and the legacy names mapped onto them
    if "sparse" in kw["mlp_layer_types"]:
        _require(kw, REQUIRED_MOE, "text_config")
    if "dense" in kw["mlp_layer_types"]:
        _require(kw, REQUIRED_DENSE, "text_config")
    if "minimax_m3_sparse" in kw["layer_types"]:
        _require(kw, REQUIRED_INDEXER, "text_config")

    # RoPE: rope_parameters wins, legacy top-level keys fill in (transformers' standardisation).
    rope = raw.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"config key 'rope_parameters' = {rope!r}: must be an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _need(rope_type == "default", "text_config.rope_parameters.rope_type", rope_type, "only 'default' RoPE is supported")
    theta = rope.get("rope_theta", raw.get("rope_theta", 5_000_000.0))
    _need_pos_number("text_config.rope_parameters.rope_theta", theta)
    prf = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    _need(_is_number(prf) and 0 < prf <= 1, "partial_rotary_factor", prf, "must be in (0, 1]")
    head_dim = raw["head_dim"]
    _need_pos_int("head_dim", head_dim)
    # transformers: dim = int(head_dim * partial_rotary_factor), inv_freq over arange(0, dim, 2) / dim
    rot = int(head_dim * prf)
    _need(rot >= 2 and rot % 2 == 0, "partial_rotary_factor", prf,
          f"rotates int(head_dim {head_dim} x {prf}) = {rot} channels; a positive even count is needed "
          f"(an odd one has no rotate-half pairing in the exported RoPE)")
    if "rotary_dim" in raw:
        rd = raw["rotary_dim"]
        _need(_is_int(rd), "rotary_dim", rd, "must be an integer (transformers refuses other types)")
        if rd != rot:
            notes.append(f"text_config.rotary_dim = {rd} is ignored, as transformers ignores it: RoPE rotates "
                         f"head_dim {head_dim} x partial_rotary_factor {prf} = {rot} channels")
    kw["rotary_dim"] = rot
    kw["rope_theta"] = float(theta)

    eos = raw.get("eos_token_id", 200020)
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    for v in eos:
        _need(_is_int(v), "eos_token_id", raw.get("eos_token_id"), "must be an integer token id or a list of them")
    kw["eos_token_id"] = eos
    return TextConfig(**kw)


def _vision_from_dict(raw: dict[str, Any]) -> VisionConfig:
    _require(raw, REQUIRED_VISION, "vision_config")
    known = {f for f in VisionConfig.__dataclass_fields__} - {"rope_theta"}
    kw: dict[str, Any] = {k: raw[k] for k in known if k in raw}
    rope = raw.get("rope_parameters") or {}
    _need(isinstance(rope, dict), "vision_config.rope_parameters", rope, "must be an object")
    rope_type = rope.get("rope_type", "axial")
    _need(rope_type == "axial", "vision_config.rope_parameters.rope_type", rope_type, "only 'axial' RoPE is supported")
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    _need_pos_number("vision_config.rope_parameters.rope_theta", theta)
    kw["rope_theta"] = float(theta)
    return VisionConfig(**kw)


# -- named presets ------------------------------------------------------------------------------

def full_size() -> M3Config:
    """The full-size MiniMax-M3-VL dimensions (hidden 6144, 60 layers, 64/4 heads, 128 experts top-4,
    vision 1280 × 32). The per-layer pattern here (3 dense layers then MoE; every 4th layer full
    attention) is illustrative, for plans and export tests: real checkpoints carry their own
    ``layer_types`` / ``mlp_layer_types`` in config.json, which is what every command reads."""
    n = 60
    layer_types = tuple("minimax_m3_sparse" if i % 4 != 0 else "full_attention" for i in range(n))
    mlp_types = tuple("dense" if i < 3 else "sparse" for i in range(n))
    return M3Config(text=TextConfig(layer_types=layer_types, mlp_layer_types=mlp_types), vision=VisionConfig())


def tiny(vocab_size: int = 1024, image_token_id: int = 1000, video_token_id: int = 1001,
         bos_token_id: int | None = None, eos_token_id: tuple[int, ...] = (1,)) -> M3Config:
    """Every branch on a CPU budget: 4 layers covering all four variants, GQA 2, 8 experts top-2,
    blocks of 16 so a 100-token prompt spans 7 blocks with top-3 selection."""
    text = TextConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rotary_dim=8, intermediate_size=32, dense_intermediate_size=96,
        shared_intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
        layer_types=("full_attention", "minimax_m3_sparse", "minimax_m3_sparse", "full_attention"),
        mlp_layer_types=("dense", "sparse", "dense", "sparse"),
        index_n_heads=2, index_head_dim=16, index_block_size=16, index_topk_blocks=3, index_local_blocks=1,
        max_position_embeddings=4096, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )
    vision = VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    return M3Config(text=text, vision=vision, image_token_id=image_token_id, video_token_id=video_token_id,
                    projector_hidden_size=64)


PRESETS = {"full": full_size, "tiny": tiny}
