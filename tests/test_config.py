"""Config reading: transformers' keys, legacy keys, and errors that name the key."""

from __future__ import annotations

import json

import pytest
from hf_twins import hf_config

from m3_trt.model.config import ConfigError, ConfigNote, M3Config, full_size, tiny


def test_reads_transformers_config_dict():
    cfg = M3Config.from_dict(hf_config().to_dict())
    assert cfg.text.num_key_value_heads == 2 and cfg.text.rotary_dim == 8
    assert cfg.text.layer_types[1] == "minimax_m3_sparse" and cfg.text.mlp_layer_types[1] == "sparse"
    assert cfg.image_token_id == 500 and cfg.vision.hidden_size == 48


def test_legacy_keys_as_transformers_reads_them():
    from transformers import MiniMaxM3VLConfig

    raw = hf_config().to_dict()
    t = raw["text_config"]
    for k in ("layer_types", "mlp_layer_types", "index_n_heads", "index_block_size", "index_topk_blocks",
              "index_local_blocks", "index_head_dim", "rope_parameters"):
        t.pop(k)
    t["sparse_attention_config"] = {"sparse_attention_freq": [0, 1, 1, 0], "sparse_num_index_heads": 2,
                                    "sparse_block_size": 8, "sparse_topk_blocks": 3, "sparse_local_block": 2,
                                    "sparse_index_dim": 16}
    t["moe_layer_freq"] = [0, 1, 0, 1]
    t["rope_theta"] = 1e6
    t["partial_rotary_factor"] = 0.5
    ours = M3Config.from_dict(json.loads(json.dumps(raw))).text
    theirs = MiniMaxM3VLConfig(**json.loads(json.dumps(raw))).text_config
    assert list(ours.layer_types) == theirs.layer_types
    assert list(ours.mlp_layer_types) == theirs.mlp_layer_types
    assert (ours.index_block_size, ours.index_topk_blocks, ours.index_local_blocks) == (
        theirs.index_block_size, theirs.index_topk_blocks, theirs.index_local_blocks)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 1e6
    assert ours.rotary_dim == int(theirs.head_dim * theirs.rope_parameters["partial_rotary_factor"])


def test_presets_are_valid_and_roundtrip():
    for cfg in (full_size(), tiny()):
        assert M3Config.from_dict(cfg.to_hf_dict()) == cfg
    assert full_size().text.hidden_size == 6144 and full_size().text.num_local_experts == 128


BAD = {
    "heads-not-dividing": (("text_config", "num_key_value_heads"), 3, "num_key_value_heads"),
    "unknown-layer-type": (("text_config", "layer_types"), ["full_attention", "linear", "full_attention",
                                                            "full_attention"], "layer_types[1]", "'linear'"),
    "unknown-mlp-type": (("text_config", "mlp_layer_types"), ["dense", "dense", "moe", "dense"], "mlp_layer_types[2]",
                         "'moe'"),
    # rotary_dim's value is ignored (test_rotary_dim_is_a_note), but transformers refuses a non-integer
    "rotary-dim-not-an-integer": (("text_config", "rotary_dim"), "64", "rotary_dim"),
    "partial-factor-odd-width": (("text_config", "rope_parameters", "partial_rotary_factor"), 0.3125,
                                 "partial_rotary_factor", "= 5 channels"),
    "partial-factor-over-one": (("text_config", "rope_parameters", "partial_rotary_factor"), 1.5,
                                "partial_rotary_factor"),
    "layer-types-wrong-length": (("text_config", "layer_types"), ["full_attention"], "layer_types"),
    "topk-over-experts": (("text_config", "num_experts_per_tok"), 9, "num_experts_per_tok"),
    "index-heads-not-kv-heads": (("text_config", "index_n_heads"), 1, "index_n_heads"),
    "negative-hidden": (("text_config", "hidden_size"), -64, "hidden_size"),
    "vision-heads": (("vision_config", "num_attention_heads"), 5, "vision_config.num_attention_heads"),
    "image-token-out-of-vocab": (("image_token_index",), 99999, "image_token_index"),
    # the probe's tracebacks (issue 10, item 9) and accepted invalid values (item 10)
    "heads-zero": (("text_config", "num_attention_heads"), 0, "num_attention_heads"),
    "head-dim-zero": (("text_config", "head_dim"), 0, "head_dim"),
    "vision-heads-zero": (("vision_config", "num_attention_heads"), 0, "vision_config.num_attention_heads"),
    "image-token-list": (("image_token_index",), [1], "image_token_index"),
    "layers-float-1e9": (("text_config", "num_hidden_layers"), 1e9, "num_hidden_layers"),
    "layers-int-1e9": (("text_config", "num_hidden_layers"), 10**9, "num_hidden_layers", "at most 4096"),
    "vision-layers-int-1e9": (("vision_config", "num_hidden_layers"), 10**9, "vision_config.num_hidden_layers"),
    "shared-intermediate-negative": (("text_config", "shared_intermediate_size"), -5, "shared_intermediate_size"),
    "projector-hidden-negative": (("projector_hidden_size",), -5, "projector_hidden_size"),
    "eos-string": (("text_config", "eos_token_id"), "a", "eos_token_id"),
    "eos-float": (("text_config", "eos_token_id"), 1.5, "eos_token_id"),
    "eos-out-of-vocab": (("text_config", "eos_token_id"), 512, "eos_token_id", "below vocab_size=512"),
    "eos-list-one-out-of-vocab": (("text_config", "eos_token_id"), [1, 99999], "eos_token_id", "99999"),
    "bos-negative": (("text_config", "bos_token_id"), -1, "bos_token_id"),
    "vision-layer-norm-eps-negative": (("vision_config", "layer_norm_eps"), -1e-5, "vision_config.layer_norm_eps"),
    "rms-norm-eps-string": (("text_config", "rms_norm_eps"), "1e-6", "rms_norm_eps"),
    "rope-theta-negative": (("text_config", "rope_parameters", "rope_theta"), -1.0, "rope_theta"),
    "tie-embeddings-string": (("tie_word_embeddings",), "false", "tie_word_embeddings"),
    "layer-types-not-a-list": (("text_config", "layer_types"), "full_attention", "layer_types"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_invalid_values_name_the_key(case):
    path, value, key, *shown = BAD[case]
    raw = hf_config().to_dict()
    d = raw
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")) as e:
        M3Config.from_dict(raw)
    assert (shown[0] if shown else repr(value)) in str(e.value)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        M3Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        M3Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type"):
        M3Config.from_pretrained(tmp_path)


@pytest.mark.parametrize("section,key", [("text_config", "hidden_size"), ("text_config", "vocab_size"),
                                         ("text_config", "head_dim"), ("text_config", "shared_intermediate_size"),
                                         ("text_config", "index_head_dim"), ("vision_config", "hidden_size")],
                         ids=lambda v: v)
def test_missing_shape_key_is_an_error_not_the_full_size_default(section, key):
    """transformers fills a missing hidden_size with 6144 (another model); we name the key instead."""
    from transformers import MiniMaxM3VLConfig

    raw = hf_config().to_dict()
    raw[section].pop(key)
    theirs = MiniMaxM3VLConfig(**json.loads(json.dumps(raw)))
    assert getattr(getattr(theirs, section), key) != getattr(getattr(hf_config(), section), key)  # another model
    with pytest.raises(ConfigError, match=f"{section}.{key} are missing"):
        M3Config.from_dict(raw)


def test_missing_projector_hidden_size_takes_the_default_with_a_note():
    """The one shape key that follows transformers' default (the weights' shapes check it at load)."""
    raw = hf_config().to_dict()
    raw.pop("projector_hidden_size")
    with pytest.warns(ConfigNote, match="projector_hidden_size' is missing: using transformers' default 6144"):
        cfg = M3Config.from_dict(raw)
    assert cfg.projector_hidden_size == 6144 and cfg.notes


def test_rotary_dim_is_a_note_partial_factor_governs():
    """save_pretrained writes rotary_dim (default 64) that transformers never reads: ours follows the factor."""
    from transformers import MiniMaxM3VLConfig

    raw = hf_config().to_dict()
    raw["text_config"]["rotary_dim"] = 64  # > head_dim 16: the probe's ConfigError
    with pytest.warns(ConfigNote, match="rotary_dim = 64 is ignored"):
        cfg = M3Config.from_dict(raw)
    assert cfg.text.rotary_dim == 8 and any("rotary_dim = 64" in n for n in cfg.notes)
    # no partial_rotary_factor at all: transformers rotates the whole head (factor 1.0)
    del raw["text_config"]["rope_parameters"]["partial_rotary_factor"]
    theirs = MiniMaxM3VLConfig(**json.loads(json.dumps(raw))).text_config
    with pytest.warns(ConfigNote):
        assert M3Config.from_dict(raw).text.rotary_dim == theirs.head_dim == 16
    # agreeing keys: no note
    assert M3Config.from_dict(hf_config().to_dict()).notes == ()
