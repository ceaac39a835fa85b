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

from m3_trt.processing.samples import demo_image_png  # noqa: E402
from m3_trt.serving.client import M3Client, M3ClientError, build_inputs  # noqa: E402
from m3_trt.serving.pipeline import text_delta  # noqa: E402

MAX_INPUT_LEN = 256
MAX_PIXELS = 200 * 200
MAX_IMAGE_BYTES = 20000
ENTRIES = ["ensemble", "m3_bls"]


def set_parameter(repo, model: str, key: str, value) -> None:
    """Edit one ``parameters`` value of a generated ``config.pbtxt`` (as an operator would)."""
    import re

    path = repo / model / "config.pbtxt"
    text, n = re.subn(rf'(key: "{key}" value: {{ string_value: )"[^"]*"', rf'\g<1>"{value}"', path.read_text())
    assert n == 1, f"{model}/config.pbtxt has no parameter {key}"
    path.write_text(text)


@pytest.fixture(scope="module")
def served(tiny_ckpt, tmp_path_factory):
    from m3_trt.serving.repository import write_repository
    from m3_trt.serving.server import TritonServer

    repo = write_repository(tiny_ckpt, tmp_path_factory.mktemp("triton") / "repo", bls=True,
                            max_input_len=MAX_INPUT_LEN, max_pixels=MAX_PIXELS)
    for model in ("preprocessing", "m3_bls"):
        set_parameter(repo, model, "max_image_bytes", MAX_IMAGE_BYTES)
    set_parameter(repo, "m3_bls", "max_queue_size", 0)  # 8 KV slots, no waiting room: back-pressure test
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


# -- in-flight batching, cancellation, caps, metrics on the real server -------------------------

def _metrics(server) -> dict[str, float]:
    """``{'name{labels}': value}`` from Triton's Prometheus endpoint (our m3_* families only)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("m3_"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _sum(metrics: dict[str, float], prefix: str, model: str | None = None) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix + "{") and (model is None or f'model="{model}"' in k))


def _zero_ending_bmp(size) -> bytes:
    import io

    from PIL import Image

    img = Image.new("RGB", size, (30, 160, 220))
    img.paste((0, 0, 0), (0, 0, size[0], size[1] // 2))  # BMP stores rows bottom-up: the file ends in zeros
    buf = io.BytesIO()
    img.save(buf, "BMP")
    return buf.getvalue()


@pytest.mark.parametrize("entry", ENTRIES)
def test_image_ending_in_zero_bytes_served_and_oversize_image_refused_by_name(served, reference, entry):
    bmp = _zero_ending_bmp((56, 42))
    assert bmp.endswith(b"\0\0\0") and len(bmp) < MAX_IMAGE_BYTES
    client = M3Client(served.grpc_url, entry)
    assert client.generate("Describe the picture.", [bmp], max_tokens=6) == reference(
        "Describe the picture.", [bmp], max_tokens=6)[1]
    big = _zero_ending_bmp((150, 120))
    assert len(big) > MAX_IMAGE_BYTES
    with pytest.raises(M3ClientError, match=f"image 0 is {len(big)} bytes, over max_image_bytes={MAX_IMAGE_BYTES}"):
        client.generate("Describe the picture.", [big], max_tokens=4)
    with pytest.raises(M3ClientError, match="9 images in one request, over max_images=8"):
        client.generate("Describe the picture.", [IMAGE_A] * 9, max_tokens=4)
    assert client.generate("Tell me a story.", max_tokens=4) == reference("Tell me a story.", max_tokens=4)[1]


@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_sampling_values_and_overlong_max_tokens_named(served, reference, entry):
    client = M3Client(served.grpc_url, entry)
    for kw, msg in [(dict(temperature=float("inf")), "temperature must be a finite"),
                    (dict(end_id=10 ** 6), "end_id=1000000 is outside the vocabulary"),
                    (dict(pad_id=-5), "pad_id=-5 is outside the vocabulary"),
                    (dict(max_tokens=5000), "max_tokens=5000: prompt .* exceeds the KV cache's max_seq_len=")]:
        with pytest.raises(M3ClientError, match=msg):
            client.generate("Tell me a story.", **({"max_tokens": 4} | kw))
    assert client.generate("Tell me a story.", max_tokens=4) == reference("Tell me a story.", max_tokens=4)[1]


_KILLED_CLIENT = """
import queue, sys
import tritonclient.grpc as grpcclient
from m3_trt.serving.client import build_inputs
q = queue.Queue()
c = grpcclient.InferenceServerClient(sys.argv[1])
c.start_stream(callback=lambda result, error: q.put((result, error)))
c.async_stream_infer(sys.argv[2], build_inputs("Tell me a story.", max_tokens=1000, stream=True))
for _ in range(3):
    assert q.get(timeout=120)[1] is None
print("streaming", flush=True)
sys.stdin.read()  # killed here, mid-stream
"""


# The ensemble is not cancellable mid-generation in Triton 2.51: its scheduler passes a
# cancellation only to steps that have not started (core PR #263), so the running llm step never
# sees it. m3_bls (one decoupled model) sees Triton's cancellation directly.
@pytest.mark.parametrize("how", ["stop_stream-cancel", "client-killed"])
def test_cancelled_or_dropped_stream_frees_its_slot(served, reference, how):
    import queue
    import subprocess
    import sys

    import tritonclient.grpc as grpcclient

    entry = "m3_bls"
    before = _sum(_metrics(served), "m3_llm_generated_tokens", entry)
    if how == "stop_stream-cancel":
        replies = queue.Queue()
        c = grpcclient.InferenceServerClient(served.grpc_url)
        c.start_stream(callback=lambda result, error: replies.put((result, error)))
        c.async_stream_infer(entry, build_inputs("Tell me a story.", max_tokens=1000, stream=True),
                             enable_empty_final_response=True)
        for _ in range(3):  # the long answer is under way
            result, error = replies.get(timeout=120)
            assert error is None
        c.stop_stream(cancel_requests=True)
        c.close()
    else:
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT, served.grpc_url, entry],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "streaming"
        finally:
            proc.kill()
            proc.wait()
    # the next request is answered (correctly) and, once it is, no slot is held: the long
    # request stopped instead of running on to its 1,000 tokens (the module's server must then
    # also exit 0 on SIGTERM: nothing left in flight)
    assert M3Client(served.grpc_url, entry).generate("Tell me a story.", max_tokens=4) == reference(
        "Tell me a story.", max_tokens=4)[1]
    m = _metrics(served)
    generated = _sum(m, "m3_llm_generated_tokens", entry) - before
    assert generated < 200, f"{generated} tokens generated: the dropped request kept running"
    assert _sum(m, "m3_llm_kv_slots_used", entry) == 0


def test_full_queue_answers_server_busy_then_serves(served, reference):
    import queue
    import time

    import tritonclient.grpc as grpcclient

    streams = []
    for i in range(8):  # fill m3_bls's 8 KV slots with long answers
        replies = queue.Queue()
        c = grpcclient.InferenceServerClient(served.grpc_url)
        c.start_stream(callback=lambda result, error, q=replies: q.put((result, error)))
        c.async_stream_infer("m3_bls", build_inputs(f"Question {i}: tell me a story.", max_tokens=1000, stream=True),
                             enable_empty_final_response=True)
        streams.append((c, replies))
    try:
        for _, replies in streams:
            assert replies.get(timeout=120)[1] is None
        with pytest.raises(M3ClientError, match=r"server busy: .*max_queue_size=0.* retry later"):
            M3Client(served.grpc_url, "m3_bls").generate("Tell me a story.", max_tokens=4)
    finally:
        for c, _ in streams:
            c.stop_stream(cancel_requests=True)
            c.close()
    # the cancelled requests leave at the scheduler's next step (asynchronously): wait for that,
    # bounded, then the server serves again
    for _ in range(600):
        if _sum(_metrics(served), "m3_llm_kv_slots_used", "m3_bls") == 0:
            break
        time.sleep(0.1)
    assert _sum(_metrics(served), "m3_llm_kv_slots_used", "m3_bls") == 0
    assert M3Client(served.grpc_url, "m3_bls").generate("Tell me a story.", max_tokens=4) == reference(
        "Tell me a story.", max_tokens=4)[1]


def test_metrics_count_tokens_and_batches(served, reference):
    toks, want = reference("Describe the picture.", [IMAGE_A], max_tokens=7)
    before = _metrics(served)
    assert M3Client(served.grpc_url, "ensemble").generate("Describe the picture.", [IMAGE_A], max_tokens=7,
                                                          stream=True) == want
    after = _metrics(served)
    diff = {k: after[k] - before.get(k, 0.0) for k in after}
    assert _sum(diff, "m3_llm_generated_tokens", "llm") == len(toks)
    assert _sum(diff, "m3_llm_time_to_first_token_seconds_count", "llm") == 1
    assert _sum(diff, "m3_llm_inter_token_seconds_count", "llm") == len(toks) - 1
    assert _sum(diff, "m3_vision_batch_size_count") >= 1
    assert _sum(after, "m3_llm_kv_slots_used", "llm") == 0 and _sum(after, "m3_llm_queued_requests", "llm") == 0
    # the concurrent-clients test ran batched forwards: some steps carried more than one request
    steps = _sum(after, "m3_llm_step_batch_size_count")
    single = sum(v for k, v in after.items() if k.startswith("m3_llm_step_batch_size_bucket") and 'le="1"' in k)
    assert steps > single > 0
