"""``m3-trt compare`` on hostile or incomplete inputs (issue 10, items 9 and 15).

* a pickle-only folder with ``--backend transformers``: a named error, the pickle never unpickled;
* a checkpoint without tokenizer files: compared on token-id prompts (and it says so), still able
  to fail on a corrupted backend;
* no ``--out``: the report goes to a new temp folder that is printed, never into the current folder;
  ``--out`` is never the checkpoint or a user's folder.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest

from m3_trt.model.checkpoint import CheckpointError
from m3_trt.compare.cli import CompareOptions, cmd_compare
from m3_trt.outputs import OutputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class _Payload:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_transformers_backend_refuses_a_pickle_only_folder_without_unpickling(tiny_ckpt, tmp_path):
    from m3_trt.cli.main import main

    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in ("config.json", *TOKENIZER_FILES, "preprocessor_config.json", "video_preprocessor_config.json"):
        shutil.copy(tiny_ckpt / f, folder)
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"has no model.safetensors.*pytorch_model.bin: pickle files are never"):
        cmd_compare(CompareOptions(ckpt=folder, backend="transformers", tokens=0, out=tmp_path / "cmp"))
    assert main(["compare", str(folder), "--backend", "transformers", "--tokens", "0",
                 "--out", str(tmp_path / "cmp2")]) == 2
    assert not marker.exists()
    pickle.loads((folder / "pytorch_model.bin").read_bytes())  # control: the file is a live payload
    assert marker.exists()


@pytest.fixture(scope="module")
def no_tokenizer_ckpt(tiny_ckpt, tmp_path_factory):
    ckpt = shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("notok") / "ckpt")
    for f in TOKENIZER_FILES:
        (ckpt / f).unlink()
    return ckpt


def test_checkpoint_without_tokenizer_compares_on_token_ids(no_tokenizer_ckpt, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = cmd_compare(CompareOptions(ckpt=no_tokenizer_ckpt, backend="torch", kernels="torch", tokens=3, out=out))
    printed = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rc == 0 and rep["verdict"] == "pass", printed
    assert "no tokenizer.json" in printed and "token-id prompts" in printed
    assert rep["prompt_source"].startswith("token ids")
    assert "prompts: token ids" in (out / "report.txt").read_text()
    assert [p["name"] for p in rep["prompts"]] == ["token-ids-32", "token-ids-96"]
    assert all(g["ref_len"] == 3 and g["first_divergence"] is None for g in rep["greedy"])


def test_token_id_prompts_still_catch_a_corrupted_backend(no_tokenizer_ckpt, tmp_path):
    """Negative control: the token-id comparison fails on swapped experts, layer 1 named first."""
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(no_tokenizer_ckpt, tmp_path / "bad")
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    for w in ("w1", "w2", "w3"):
        a, b = (f"language_model.model.layers.1.block_sparse_moe.experts.{e}.{w}.weight" for e in (0, 1))
        sa, sb = bad / index[a], bad / index[b]
        ta, tb = load_file(sa), load_file(sb)
        ta[a], tb[b] = tb[b].clone(), ta[a].clone()
        save_file(ta, sa, metadata={"format": "pt"})
        tb = load_file(sb) if sa == sb else tb
        if sa == sb:
            tb[a], tb[b] = ta[a], ta[b]
        save_file(tb, sb, metadata={"format": "pt"})
    rc = cmd_compare(CompareOptions(ckpt=no_tokenizer_ckpt, backend="torch", backend_path=bad, layers=True,
                                    tokens=0, out=tmp_path / "cmp"))
    rep = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert rc == 1 and rep["first_failure"]["what"] == "layer.1", rep["first_failure"]


def test_text_prompts_without_tokenizer_and_bad_token_ids_are_named(no_tokenizer_ckpt, tmp_path):
    from m3_trt.compare.runner import run_compare

    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"prompt": "hello"}) + "\n")
    with pytest.raises(ValueError, match='no tokenizer.json.*give token ids instead.*"input_ids"'):
        run_compare(no_tokenizer_ckpt, backend="torch", prompts=text, tokens=0, progress=lambda m: None)
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"input_ids": [1, 2, 50000]}) + "\n")
    with pytest.raises(ValueError, match=r"token id 50000 is outside the vocabulary \(vocab_size=\d+\)"):
        run_compare(no_tokenizer_ckpt, backend="torch", prompts=ids, tokens=0, progress=lambda m: None)
    ids.write_text(json.dumps({"input_ids": [1, "2"]}) + "\n")
    with pytest.raises(ValueError, match="'input_ids' must be a non-empty list of token ids"):
        run_compare(no_tokenizer_ckpt, backend="torch", prompts=ids, tokens=0, progress=lambda m: None)


def test_report_location_is_explicit(no_tokenizer_ckpt, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"input_ids": list(range(20))}) + "\n")
    assert cmd_compare(CompareOptions(ckpt=no_tokenizer_ckpt, backend="torch", prompts=ids, tokens=0)) == 0
    printed = capsys.readouterr().out
    assert list(cwd.iterdir()) == []  # nothing written where the command ran
    where = Path(printed.split("the report goes to ")[1].split()[0])
    try:
        assert where.parent == Path(tempfile.gettempdir()) and (where / "report.json").is_file()
        assert f"wrote {where / 'report.json'}" in printed
    finally:
        shutil.rmtree(where)
    # --out is never the checkpoint, nor a folder of the user's (unless --overwrite)
    with pytest.raises(OutputError, match="is the input"):
        cmd_compare(CompareOptions(ckpt=no_tokenizer_ckpt, backend="torch", prompts=ids, tokens=0,
                                   out=no_tokenizer_ckpt))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="is not a previous compare output"):
        cmd_compare(CompareOptions(ckpt=no_tokenizer_ckpt, backend="torch", prompts=ids, tokens=0, out=mine))
    assert cmd_compare(CompareOptions(ckpt=no_tokenizer_ckpt, backend="torch", prompts=ids, tokens=0, out=mine,
                                      overwrite=True)) == 0
    assert (mine / "notes.txt").read_text() == "keep"  # the report is written beside, nothing removed
    # now it holds a compare report: a re-run may replace that without --overwrite
    assert cmd_compare(CompareOptions(ckpt=no_tokenizer_ckpt, backend="torch", prompts=ids, tokens=0, out=mine)) == 0


def test_transformers_backend_refuses_an_index_pointing_outside(tiny_ckpt, tmp_path):
    """transformers itself would open '../' shard names: the backend checks the index first."""
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.move(ckpt / first, tmp_path / first)
    index["weight_map"] = {k: ("../" + v if v == first else v) for k, v in index["weight_map"].items()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="is not a plain file name in the checkpoint folder"):
        cmd_compare(CompareOptions(ckpt=ckpt, backend="transformers", tokens=0, out=tmp_path / "cmp"))
