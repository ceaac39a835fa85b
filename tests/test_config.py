"""Config reading: transformers' keys, legacy keys, and errors that name the key."""

from __future__ import annotations

import json

import pytest
from hf_twins import hf_config

from m3_trt.config import ConfigError, M3Config, full_size, tiny


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
    "rotary-dim-over-head-dim": (("text_config", "rotary_dim"), 32, "rotary_dim"),
    "layer-types-wrong-length": (("text_config", "layer_types"), ["full_attention"], "layer_types"),
    "topk-over-experts": (("text_config", "num_experts_per_tok"), 9, "num_experts_per_tok"),
    "index-heads-not-kv-heads": (("text_config", "index_n_heads"), 1, "index_n_heads"),
    "negative-hidden": (("text_config", "hidden_size"), -64, "hidden_size"),
    "vision-heads": (("vision_config", "num_attention_heads"), 5, "vision_config.num_attention_heads"),
    "image-token-out-of-vocab": (("image_token_index",), 99999, "image_token_index"),
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
