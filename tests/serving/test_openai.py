"""The OpenAI-compatible endpoint over the tiny checkpoint's real Triton server, driven by the `openai` client.

One tritonserver (ensemble only) and one :class:`OpenAIServer` for the module. Answers are compared
with the torch reference in-process (tests/serving/conftest.py), usage counts with the reference's
token counts; every bad request gets an OpenAI-style 4xx body and the next request is served.
"""

from __future__ import annotations

import base64
import json
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")
openai = pytest.importorskip("openai")

from m3_trt.processing.samples import demo_image_png  # noqa: E402

MAX_INPUT_LEN = 256
MAX_PIXELS = 200 * 200
IMAGE = demo_image_png((112, 84))


@pytest.fixture(scope="module")
def front(tiny_ckpt, tmp_path_factory):
    from m3_trt.serving.openai_server import OpenAIServer
    from m3_trt.serving.repository import write_repository
    from m3_trt.serving.server import TritonServer

    repo = write_repository(tiny_ckpt, tmp_path_factory.mktemp("openai") / "repo", max_input_len=MAX_INPUT_LEN,
                            max_pixels=MAX_PIXELS)
    logs_before = set(Path(tempfile.gettempdir()).glob("tritonserver-*.log"))
    server = TritonServer(repo, exit_timeout_s=15).start()
    # the default log is an unnamed temporary file: readable, but never a name in the temp folder
    assert "Started GRPCInferenceService" in server.log and "unnamed" in server.log_location
    assert set(Path(tempfile.gettempdir()).glob("tritonserver-*.log")) == logs_before
    api = OpenAIServer(repo, server.grpc_url).start()
    try:
        yield api
    finally:
        api.stop()
        log = server.log
        code = server.stop()
        assert code == 0, f"tritonserver did not unload every model (exit {code}):\n{log[-3000:]}"


@pytest.fixture(scope="module")
def client(front):
    return openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0, timeout=120)


def prompt_tokens(reference, prompt, n_images=0, images=()):
    """The prompt's length as the model sees it (the chat template, user text without special tokens)."""
    proc = reference.processor
    pics = [proc.decode_image(b) for b in images]
    return int(proc.encode_chat(prompt, pics)["input_ids"].shape[1])


def data_url(blob: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(blob).decode()


def test_models_lists_the_checkpoint(client, front, tiny_ckpt):
    assert [m.id for m in client.models.list().data] == [tiny_ckpt.name] == [front.model_name]


def test_non_streamed_greedy_equals_reference_with_usage(client, front, reference):
    toks, want = reference("Tell me a story.", max_tokens=10)
    r = client.chat.completions.create(model=front.model_name, max_tokens=10, temperature=0,
                                       messages=[{"role": "user", "content": "Tell me a story."}])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == len(toks) == 10
    assert r.usage.prompt_tokens == prompt_tokens(reference, "Tell me a story.")
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10
    # negative control: a different prompt's answer differs, so the equality above means something
    assert reference("Question 3: what is shown?", max_tokens=10)[1] != want


def test_streamed_equals_non_streamed(client, front, reference):
    messages = [{"role": "user", "content": "Describe the picture."}]
    whole = client.chat.completions.create(model=front.model_name, max_tokens=12, temperature=0, messages=messages)
    chunks = list(client.chat.completions.create(model=front.model_name, max_tokens=12, temperature=0,
                                                 messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content == reference("Describe the picture.", max_tokens=12)[1]
    assert len(pieces) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_image_by_data_url(client, front, reference):
    toks, want = reference("Describe the picture.", [IMAGE], max_tokens=8)
    r = client.chat.completions.create(model=front.model_name, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                                     {"type": "text", "text": "Describe the picture."}]}])
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == prompt_tokens(reference, "Describe the picture.", 1, [IMAGE])
    assert r.usage.prompt_tokens > prompt_tokens(reference, "Describe the picture.")  # the image's tokens count


def test_load_generator_extensions(client, front, reference):
    """top_k and ignore_eos (what aiperf sends with --extra-inputs) reach the ensemble: top_k = 1
    samples greedily at any temperature; ignore_eos always gives max_tokens tokens."""
    r = client.chat.completions.create(model=front.model_name, max_tokens=6, temperature=2.0,
                                       extra_body={"top_k": 1, "ignore_eos": True},
                                       messages=[{"role": "user", "content": "Tell me a story."}])
    assert r.choices[0].message.content == reference("Tell me a story.", max_tokens=6)[1]
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"


def test_stop_string_cuts_the_answer(client, front, reference):
    _, want = reference("Tell me a story.", max_tokens=10)
    stop = want[6:9]
    assert want.find(stop) == 6
    r = client.chat.completions.create(model=front.model_name, max_tokens=10, temperature=0, stop=[stop],
                                       messages=[{"role": "user", "content": "Tell me a story."}])
    assert r.choices[0].message.content == want[:6] and r.choices[0].finish_reason == "stop"


def _raw(front, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(f"{front.url}/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


BAD = {
    "bad-json": (b'{"model": "x", "messages": [', 400, "invalid_json", None),
    "missing-messages": (dict(), 400, "invalid_value", "messages"),
    "unknown-model": (dict(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]), 404, "model_not_found",
                      "model"),
    "bad-image": (dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(b"this is not an image")}},
        {"type": "text", "text": "what is it?"}]}]), 400, "invalid_prompt", "messages"),
    "remote-image-url": (dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}]}]), 400, "invalid_image_url",
        "messages[0].content[0].image_url"),
    "prompt-too-long": (dict(messages=[{"role": "user", "content": "word " * 400}]), 400, "invalid_prompt",
                        "messages"),
    "two-turns": (dict(messages=[{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]), 400,
                  "unsupported_conversation", "messages"),
    "max_tokens-0": (dict(messages=[{"role": "user", "content": "hi"}], max_tokens=0), 400, "invalid_value",
                     "max_tokens"),
    "top_k-negative": (dict(messages=[{"role": "user", "content": "hi"}], top_k=-1), 400, "invalid_value", "top_k"),
    "ignore_eos-not-bool": (dict(messages=[{"role": "user", "content": "hi"}], ignore_eos="yes"), 400,
                            "invalid_value", "ignore_eos"),
    "temperature-inf": (b'{"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
                        400, "invalid_value", "temperature"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_request_is_4xx_then_served(front, client, reference, case):
    body, status, code, param = BAD[case]
    if isinstance(body, dict):
        body = json.dumps({"model": front.model_name, **body}).encode()
    code_got, reply = _raw(front, body.replace(b'"M"', json.dumps(front.model_name).encode()))
    assert code_got == status and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert reply["error"]["code"] == code and reply["error"]["param"] == param and reply["error"]["message"], reply
    if case == "bad-image":
        assert "not a decodable image" in reply["error"]["message"]
    r = client.chat.completions.create(model=front.model_name, max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": "Tell me a story."}])
    assert r.choices[0].message.content == reference("Tell me a story.", max_tokens=4)[1]


def test_openai_client_sees_typed_errors(client, front):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="data: URL"):
        client.chat.completions.create(model=front.model_name, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}], stream=True)


def test_unreachable_ensemble_is_503_and_endpoint_keeps_serving(tiny_ckpt, tmp_path):
    from m3_trt.serving.openai_server import OpenAIServer
    from m3_trt.serving.repository import write_repository
    from m3_trt.serving.server import free_port

    repo = write_repository(tiny_ckpt, tmp_path / "repo")
    with OpenAIServer(repo, f"127.0.0.1:{free_port()}", served_model_name="m3") as api:
        for stream in (False, True):
            body = json.dumps({"model": "m3", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
            code, reply = _raw(api, body.encode())
            assert code == 503 and reply["error"]["code"] == "upstream_unavailable", reply
        with urllib.request.urlopen(f"{api.url}/v1/models", timeout=10) as r:
            assert json.loads(r.read())["data"][0]["id"] == "m3"
