"""The onnxruntime repository: the tiny checkpoint's ONNX export served by Triton, against torch.

In-process first (the ONNX Runtime steps equal the torch steps), then the repository generator's
choices and refusals, then one real server (ensemble + m3_bls) over gRPC. The export is the
session's ``tiny_export("none")`` (portable ops: the ``m3`` plugin ops run through Python custom
ops in ONNX Runtime, ~30x slower per token, and are covered by tests/export).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from tolerances import assert_close, rel_err

from m3_trt.processing.samples import demo_image_png
from m3_trt.serving.pipeline import (OnnxTokenGenerator, Preprocessor, RequestError, SamplingParams, TokenGenerator,
                                     VisionEncoder)

PLUGINS = "none"
IMAGE_A = demo_image_png((112, 84))
IMAGE_B = demo_image_png((56, 140))
MAX_PIXELS = 200 * 200


@pytest.fixture(scope="module")
def export(tiny_export):
    return tiny_export(PLUGINS)


@pytest.fixture(scope="module")
def onnx_model(export):
    from m3_trt.export.onnx.runtime import OnnxModel

    return OnnxModel(export)


@pytest.fixture(scope="module")
def pre(tiny_ckpt):
    return Preprocessor(tiny_ckpt, max_input_len=127, max_input_pixels=MAX_PIXELS)


# -- in-process --------------------------------------------------------------------------------------

def test_onnx_vision_encoder_batch_matches_torch(onnx_model, reference, pre):
    batch = [(e["pixel_values"], e["image_grid_thw"]) for e in
             (pre("a", [IMAGE_A]), pre("b", []), pre("c", [IMAGE_B, IMAGE_A]))]
    got = VisionEncoder.from_onnx(onnx_model)(batch)
    want = VisionEncoder.from_model(reference.model)(batch)
    assert [g.shape for g in got] == [w.shape for w in want] and got[1].shape[0] == 0
    for g, w, what in zip(got, want, ["1 image", "no image", "2 images"]):
        if w.size:
            assert_close(torch.from_numpy(g), torch.from_numpy(w), "serving_onnx_vision", "fp32", what)
    # negative control: a batch-mate's embeddings (wrong split) are far off
    assert rel_err(torch.from_numpy(got[2][: got[0].shape[0]]), torch.from_numpy(want[0])) > 0.1


@pytest.mark.parametrize("case", ["text-greedy", "image-greedy", "text-sampled-seed7"])
def test_onnx_token_generator_matches_torch(onnx_model, reference, pre, case):
    enc = pre("Describe the picture.", [IMAGE_A] if case.startswith("image") else [])
    embeds = VisionEncoder.from_model(reference.model)([(enc["pixel_values"], enc["image_grid_thw"])])[0]
    # high temperature: the tiny model is so peaked that a low one samples the greedy tokens
    kw = dict(temperature=5.0, top_k=50, top_p=0.95, seed=7) if "sampled" in case else {}
    params = SamplingParams(max_tokens=12, **kw)
    got = list(OnnxTokenGenerator(onnx_model)(enc["input_ids"], embeds, params))
    want = list(TokenGenerator(reference.model)(enc["input_ids"], embeds, params))
    assert len(want) == 12 and got == want
    if kw:
        assert want != list(TokenGenerator(reference.model)(enc["input_ids"], embeds, SamplingParams(max_tokens=12)))
    # negative control: the same comparison rejects a different prompt's tokens
    other = pre("Describe the picture, briefly.", [IMAGE_A] if case.startswith("image") else [])
    assert list(OnnxTokenGenerator(onnx_model)(other["input_ids"], embeds, params)) != want


def test_onnx_token_generator_refuses_what_the_cache_cannot_hold(onnx_model, pre):
    enc = pre("Tell me a story.", [])
    with pytest.raises(RequestError, match="exceeds the ONNX export's max_seq_len=128"):
        OnnxTokenGenerator(onnx_model)(enc["input_ids"], None, SamplingParams(max_tokens=128))
    with pytest.raises(RequestError, match="1 image placeholders|image placeholders"):
        OnnxTokenGenerator(onnx_model)(enc["input_ids"], np.zeros((3, 64), np.float32), SamplingParams(max_tokens=2))


# -- repository generator ------------------------------------------------------------------------------

def test_repository_from_export_alone_or_with_checkpoint(tiny_ckpt, export, tmp_path):
    from m3_trt.serving.repository import write_repository

    a = write_repository(export, tmp_path / "a", backend="onnxruntime")
    b = write_repository(tiny_ckpt, tmp_path / "b", backend="onnxruntime", export=export, bls=True)
    for repo in (a, b):
        settings = json.loads((repo / "manifest.json").read_text())["settings"]
        assert settings["checkpoint"] == str(tiny_ckpt.resolve()) and settings["export_dir"] == str(export.resolve())
        assert settings["max_input_len"] == 127  # the export's static cache: max_seq_len=128
        for step in ("vision_encoder", "llm"):
            cfg = (repo / step / "config.pbtxt").read_text()
            assert 'string_value: "onnxruntime"' in cfg and str(export.resolve()) in cfg
    assert (b / "m3_bls" / "config.pbtxt").is_file() and not (a / "m3_bls").exists()


def test_repository_refusals_name_the_problem(tiny_ckpt, export, tmp_path):
    from m3_trt.serving.repository import write_repository

    with pytest.raises(ValueError, match="build-engine"):  # tensorrt takes a build-engine output
        write_repository(tiny_ckpt, tmp_path / "trt", backend="tensorrt")
    with pytest.raises(ValueError, match="not an ONNX export"):
        write_repository(tiny_ckpt, tmp_path / "x", backend="onnxruntime")
    with pytest.raises(ValueError, match="max_seq_len=128"):
        write_repository(export, tmp_path / "x", backend="onnxruntime", max_input_len=500)
    with pytest.raises(ValueError, match="backend='onnxruntime'"):
        write_repository(tiny_ckpt, tmp_path / "x", backend="torch", export=export)
    other = tmp_path / "other-ckpt"
    other.mkdir()
    for f in tiny_ckpt.iterdir():
        if f.suffix in (".json", ".jinja", ".txt"):
            shutil.copy2(f, other / f.name)
    cfg = json.loads((other / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] *= 10
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="different model config"):
        write_repository(other, tmp_path / "x", backend="onnxruntime", export=export)
    assert not (tmp_path / "x").exists()


# -- the real server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served_onnx(tiny_ckpt, export, tmp_path_factory):
    pytest.importorskip("pytriton")
    pytest.importorskip("tritonclient.grpc")
    from m3_trt.serving.repository import write_repository
    from m3_trt.serving.server import TritonServer

    repo = write_repository(tiny_ckpt, tmp_path_factory.mktemp("triton-onnx") / "repo", backend="onnxruntime",
                            export=export, bls=True, max_pixels=MAX_PIXELS)
    server = TritonServer(repo, exit_timeout_s=15).start()
    yield server
    log = server.log
    code = server.stop()
    assert code == 0, f"tritonserver did not unload every model (exit {code}):\n{log[-3000:]}"


@pytest.mark.parametrize("entry", ["ensemble", "m3_bls"])
@pytest.mark.parametrize("case", ["text", "image+text"])
def test_onnx_repository_greedy_matches_torch_reference(served_onnx, reference, entry, case):
    from m3_trt.serving.client import M3Client

    images = [IMAGE_A] if case == "image+text" else []
    prompt = "Describe the picture." if images else "Tell me a story."
    toks, want = reference(prompt, images, max_tokens=10)
    got = M3Client(served_onnx.grpc_url, entry).generate(prompt, images, max_tokens=10, stream=entry == "m3_bls")
    assert len(toks) == 10 and got == want
    _, other = reference("Question 3: what is shown?", images, max_tokens=10)
    assert other != want  # negative control


def test_onnx_repository_refuses_overlong_request_then_serves(served_onnx, reference):
    from m3_trt.serving.client import M3Client, M3ClientError

    client = M3Client(served_onnx.grpc_url, "ensemble")
    with pytest.raises(M3ClientError, match="max_seq_len=128"):
        client.generate("Tell me a story.", max_tokens=120)
    assert client.generate("Tell me a story.", max_tokens=6) == reference("Tell me a story.", max_tokens=6)[1]
