"""The tiny checkpoint's Triton repository on a real server, over gRPC, against the torch reference.

One server (ensemble + m3_bls entry points) per module; the ``reference`` fixture
(tests/serving/conftest.py) is the torch reference in-process. The server must shut down cleanly
(exit 0, every model unloaded) after all of it, error paths included.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

from m3_trt.demo import demo_image_png  # noqa: E402
from m3_trt.serving.client import M3Client, M3ClientError, build_inputs  # noqa: E402
from m3_trt.serving.pipeline import text_delta  # noqa: E402

MAX_INPUT_LEN = 256
MAX_PIXELS = 200 * 200
ENTRIES = ["ensemble", "m3_bls"]


@pytest.fixture(scope="module")
def served(tiny_ckpt, tmp_path_factory):
    from m3_trt.serving.repository import write_repository
    from m3_trt.serving.server import TritonServer

    repo = write_repository(tiny_ckpt, tmp_path_factory.mktemp("triton") / "repo", bls=True,
                            max_input_len=MAX_INPUT_LEN, max_pixels=MAX_PIXELS)
    # exit_timeout_s bounds the cost of a shutdown regression; the assert makes it fail loudly.
    server = TritonServer(repo, exit_timeout_s=15).start()
    yield server
    log = server.log
    code = server.stop()
    assert code == 0, f"tritonserver did not unload every model after the tests (exit {code}):\n{log[-3000:]}"


IMAGE_A = demo_image_png((112, 84))
IMAGE_B = demo_image_png((56, 140))


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", ["text", "image+text", "2images+text"])
def test_greedy_matches_torch_reference(served, reference, entry, case):
    images = {"text": [], "image+text": [IMAGE_A], "2images+text": [IMAGE_A, IMAGE_B]}[case]
    prompt = "Describe the picture." if images else "Tell me a story."
    toks, want = reference(prompt, images, max_tokens=10)
    got = M3Client(served.grpc_url, entry).generate(prompt, images, max_tokens=10)
    assert len(toks) == 10 and got == want
    # negative control: the same comparison rejects the answer to a different request
    _, other = reference("Question 3: what is shown?", images, max_tokens=10)
    assert other != want


@pytest.mark.parametrize("entry", ENTRIES)
def test_streaming_token_by_token(served, reference, entry):
    toks, want = reference("Describe the picture.", [IMAGE_A], max_tokens=12)
    pieces = list(M3Client(served.grpc_url, entry).stream("Describe the picture.", [IMAGE_A], max_tokens=12))
    proc = reference.processor
    expected = [text_delta(proc, toks[: i + 1], 1, False) for i in range(len(toks))]
    expected = [p for p in expected + [text_delta(proc, toks, 0, True)] if p]
    assert "".join(pieces) == want
    assert pieces == expected and len(pieces) > 1


@pytest.mark.parametrize("entry", ENTRIES)
def test_seeded_sampling_matches_reference(served, reference, entry):
    # The tiny model is sharply peaked (top-1 p ~ 1 - 1e-8): a low temperature would sample greedily.
    kw = dict(temperature=5.0, top_k=50, top_p=0.95, seed=1234)
    _, want = reference("Tell me a story.", [], max_tokens=8, **kw)
    _, greedy = reference("Tell me a story.", [], max_tokens=8)
    got = M3Client(served.grpc_url, entry).generate("Tell me a story.", max_tokens=8, **kw)
    assert got == want and want != greedy


def test_16_concurrent_clients_all_correct(served, reference):
    # Every 4th request greedy, the others sampled with their own seed: the tiny model answers most
    # greedy prompts alike, seeds make the answers differ, so a mix-up between requests shows.
    requests = []
    for i in range(16):
        images = [[], [IMAGE_A], [IMAGE_B], [IMAGE_A, IMAGE_B]][i % 4]
        sampling = {} if i % 4 == 0 else dict(temperature=5.0, top_k=50, seed=1000 + i)
        requests.append((ENTRIES[i % 2], f"Question {i}: what is shown?", images, bool(i % 3 == 0), sampling))
    want = [reference(p, im, max_tokens=8, **kw)[1] for _, p, im, _, kw in requests]

    def ask(req):
        entry, prompt, images, stream, kw = req
        return M3Client(served.grpc_url, entry).generate(prompt, images, max_tokens=8, stream=stream, **kw)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, requests))
    assert got == want
    assert len(set(want)) >= 12  # the answers really differ per request


def _raw_stream(url, model, inputs):
    """Send hand-made inputs over the streaming API; return the error message (or None)."""
    import queue

    import tritonclient.grpc as grpcclient

    q = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    try:
        c.async_stream_infer(model, inputs, enable_empty_final_response=True)
        _, err = q.get(timeout=60)
        return None if err is None else err.message()
    finally:
        c.stop_stream()
        c.close()


BAD = {
    "not-an-image": (dict(images=[b"this is not an image"]), "image 0 is not a decodable image"),
    "over-pixel-budget": (dict(images=[demo_image_png((300, 200))]), "over the pixel budget"),
    "prompt-too-long": (dict(prompt="word " * 400), f"over max_input_len={MAX_INPUT_LEN}"),
    "max_tokens-0": (dict(max_tokens=0), "max_tokens must be > 0"),
    "max_tokens-neg": (dict(max_tokens=-3), "max_tokens must be > 0"),
}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
def test_bad_request_named_then_good_request_served(served, reference, entry, bad):
    kw, message = BAD[bad]
    args = dict(prompt="Describe the picture.", images=[], max_tokens=6) | kw
    client = M3Client(served.grpc_url, entry)
    with pytest.raises(M3ClientError, match=message):
        client.generate(args.pop("prompt"), args.pop("images"), **args)
    assert client.generate("Describe the picture.", [IMAGE_A], max_tokens=6) == reference(
        "Describe the picture.", [IMAGE_A], max_tokens=6)[1]


@pytest.mark.parametrize("entry", ENTRIES)
def test_wrong_dtype_and_missing_text_input(served, reference, entry):
    import tritonclient.grpc as grpcclient

    inputs = build_inputs("Tell me a story.", max_tokens=4)
    wrong = grpcclient.InferInput("max_tokens", [1, 1], "INT64")
    wrong.set_data_from_numpy(np.array([[4]], np.int64))
    msg = _raw_stream(served.grpc_url, entry, [inputs[0], wrong] + inputs[2:])
    assert msg is not None and "max_tokens" in msg and "INT64" in msg and "INT32" in msg
    msg = _raw_stream(served.grpc_url, entry, inputs[1:])
    assert msg is not None and "missing required input 'text_input'" in msg
    msg = _raw_stream(served.grpc_url, entry, inputs[:1] + inputs[2:])
    assert msg is not None and "missing required input 'max_tokens'" in msg
    assert M3Client(served.grpc_url, entry).generate("Tell me a story.", max_tokens=4) == reference(
        "Tell me a story.", max_tokens=4)[1]
