"""Targets and the build plan: the b200x8-fp8 plan of the full-size config against hand-computed bytes."""

from __future__ import annotations

import json

import pytest

from m3_trt.cli.main import main
from m3_trt.model.params import param_counts
from m3_trt.model.config import full_size
from m3_trt.build.plan import make_plan
from m3_trt.build.targets import list_targets, load_target, parse_sets

GIB = 1024**3


def test_every_target_file_loads():
    names = {p.stem for p in list_targets()}
    assert {"b200x8-fp8", "b200x8-bf16", "h100x1-bf16", "cpu"} <= names
    for n in names:
        assert load_target(n).name == n


def test_overrides_are_typed_and_checked(tmp_path):
    t = load_target("b200x8-fp8", parse_sets(["tp=4", "ep=4", "gpus=4", "kv_cache_dtype=bf16"]))
    assert (t.tp, t.ep, t.kv_cache_dtype) == (4, 4, "bf16")
    with pytest.raises(ValueError, match="unknown target field"):
        parse_sets(["tpp=4"])
    with pytest.raises(ValueError, match="cannot read .four. as int"):
        parse_sets(["tp=four"])
    user = tmp_path / "mine.toml"
    user.write_text('description = "user target"\ntp = 2\nep = 2\ngpus = 2\n')
    assert load_target(str(user)).world == 2


def test_b200x8_fp8_plan_full_size_hand_computed():
    p = make_plan(full_size(), load_target("b200x8-fp8"))
    H, V, L, n_sparse, n_moe, n_dense = 6144, 200064, 60, 45, 57, 3
    # per rank: 8 q heads, 1 KV head (4 KV heads replicated 2x over TP 8), 16 experts, D=128
    attn_fp8 = 1024 * H + 128 * H + 128 * H + H * 1024           # q, k, v, o_proj slices
    index_fp8 = 128 * H + 128 * H                                # indexer q (1 head) + k (replicated)
    dense_fp8 = 2 * 1536 * H + H * 1536                          # 12288/8 per half, down cols
    experts_fp8 = 16 * (2 * 3072 * H + H * 3072)                 # 16 whole experts (moe_tp 1)
    shared_fp8 = 2 * 384 * H + H * 384                           # 3072/8
    fp8 = L * attn_fp8 + n_sparse * index_fp8 + n_dense * dense_fp8 + n_moe * (experts_fp8 + shared_fp8)
    scale_rows = (L * (1024 + 128 + 128 + H) + n_sparse * (128 + 128) + n_dense * (3072 + H)
                  + n_moe * (16 * (6144 + H) + 768 + H))
    pc = param_counts(full_size())
    bf16_params = (2 * V * H + H + L * (2 * H + 2 * 128) + n_sparse * 2 * 128 + n_moe * (128 * H + 128)
                   + pc["vision_tower"] + pc["projector"])
    r0 = p.ranks[0]
    assert r0.weight_bytes == {"bf16": 2 * bf16_params, "fp8": fp8, "fp8_scales": 4 * scale_rows}
    kv = L * 2 * 16 * 1 * 131072 * 128 * 1 + n_sparse * 16 * 131072 * 128 * 1   # fp8 K,V + indexer keys
    assert r0.kv_cache_bytes == kv == 44_291_850_240
    act = 16384 * (4 * H + (8 + 2) * 128 + max(2 * 1536, 2 * 384 + 4 * 2 * 3072)) * 2 + 16 * V * 4
    assert r0.activation_bytes == act
    assert r0.reserve_bytes == 4 * GIB
    assert r0.total == 2 * bf16_params + fp8 + 4 * scale_rows + kv + act + 4 * GIB
    assert p.fits and 100 * GIB < r0.total < 105 * GIB
    assert all(r.total == r0.total for r in p.ranks)
    assert [r.experts for r in p.ranks] == [(16 * i, 16 * i + 16) for i in range(8)]
    assert [r.kv_heads for r in p.ranks] == [(i // 2, i // 2 + 1) for i in range(8)]
    assert any("replicated on 2 ranks" in n for n in p.notes)


def test_plan_that_does_not_fit_names_the_term():
    p = make_plan(full_size(), load_target("h100x1-bf16"))
    assert not p.fits and p.too_large.startswith("weights ")
    p = make_plan(full_size(), load_target("b200x8-fp8", {"max_batch": 128}))
    assert not p.fits and p.too_large.startswith("kv_cache ")


def test_uneven_split_is_refused():
    with pytest.raises(ValueError, match="KV heads over tp=6|attention heads do not divide"):
        make_plan(full_size(), load_target("b200x8-fp8", {"tp": 6, "ep": 6, "gpus": 6}))
    with pytest.raises(ValueError, match="experts do not divide over ep=3"):
        make_plan(full_size(), load_target("b200x8-fp8", {"tp": 1, "ep": 3, "gpus": 3}))


def test_dry_run_from_config_json_only(tmp_path, capsys):
    ck = tmp_path / "full"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps(full_size().to_hf_dict()))
    out = tmp_path / "out"
    assert main(["build-engine", str(ck), "--target", "b200x8-fp8", "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "fits: yes" in text and "rank 7: q heads [56,64) kv heads [3,4) experts [112,128)" in text
    assert not out.exists()
    assert main(["build-engine", "--list-targets"]) == 0
    assert "b200x8-fp8" in capsys.readouterr().out
