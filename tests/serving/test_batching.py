"""In-flight batching (m3_trt.serving.batching) in-process, against the unbatched generator.

The unbatched reference is ``m3_trt.model.generate.generate`` (through ``TokenGenerator``): one request,
its own cache, whole-prompt prefill. The scheduler runs one padded forward per step over every
active row, with chunked prefill; greedy answers must be the same tokens whatever the batch
composition, and seeded sampling the same tokens per seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m3_trt.processing.samples import demo_image_png
from m3_trt.serving.batching import BatchScheduler, GenRequest, OnnxBatchBackend, TorchBatchBackend
from m3_trt.serving.pipeline import (OnnxTokenGenerator, Preprocessor, RequestError, SamplingParams, TokenGenerator,
                                     VisionEncoder)

IMAGE = demo_image_png((112, 84))


@pytest.fixture(scope="module")
def parts(tiny_ckpt):
    from m3_trt.model.modeling import M3ForConditionalGeneration

    model = M3ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32)
    pre = Preprocessor(tiny_ckpt, max_input_len=512, max_input_pixels=200 * 200)
    return model, pre, VisionEncoder.from_model(model)


def _inputs(parts, prompt, images=()):
    model, pre, vision = parts
    enc = pre(prompt, list(images))
    embeds = vision([(enc["pixel_values"], enc["image_grid_thw"])])[0] if images else None
    return enc["input_ids"], embeds


class _Log:
    """Callbacks of one request, recorded."""

    def __init__(self, cancel_after: int | None = None):
        self.tokens, self.end, self.error, self.cancel_after = [], None, None, cancel_after

    def request(self, ids, embeds, params):
        return GenRequest(ids, embeds, params, emit=self.tokens.append, finish=self._finish, fail=self._fail,
                          cancelled=lambda: self.cancel_after is not None and len(self.tokens) >= self.cancel_after)

    def _finish(self, reason):
        self.end = reason

    def _fail(self, exc):
        self.error = str(exc)


def _scheduler(model, *, max_batch=4, max_num_tokens=16, max_queue=8, max_seq_len=256):
    backend = TorchBatchBackend(model, slots=max_batch, max_seq_len=max_seq_len)
    return BatchScheduler(backend, max_batch=max_batch, max_num_tokens=max_num_tokens, max_queue=max_queue)


def _drain(sched, limit=500):
    for _ in range(limit):
        if not sched.step():
            return
    raise AssertionError("scheduler did not go idle")


# Five requests of different lengths (two with an image): B joins while A decodes, C, D and E
# while B is still prefilling in chunks (max_num_tokens=16 over 2..4 rows: 8..4-token chunks).
CASES = [("A", "Tell me a story.", ()), ("B", "Question 7: describe the scene in many words " * 2, ()),
         ("C", "Describe the picture.", (IMAGE,)), ("D", "Hi", ()), ("E", "What is shown?", (IMAGE,))]


def test_greedy_batched_equals_unbatched_whatever_the_composition(parts):
    model = parts[0]
    gen = TokenGenerator(model)
    inputs = {name: _inputs(parts, prompt, images) for name, prompt, images in CASES}
    params = {name: SamplingParams(max_tokens=4 + i) for i, (name, _, _) in enumerate(CASES)}
    want = {n: list(gen(*inputs[n], params[n])) for n in inputs}
    sched = _scheduler(model)
    logs = {n: _Log() for n in inputs}
    sched.submit(logs["A"].request(*inputs["A"], params["A"]))
    while not logs["A"].tokens:
        sched.step()
    sched.submit(logs["B"].request(*inputs["B"], params["B"]))
    for _ in range(2):
        sched.step()
    assert len(logs["A"].tokens) == 3 and not logs["B"].tokens  # A decodes while B prefills in chunks
    for n in "CDE":
        sched.submit(logs[n].request(*inputs[n], params[n]))
    _drain(sched)
    got = {n: log.tokens for n, log in logs.items()}
    assert got == want
    assert all(log.end == "length" and log.error is None for log in logs.values())
    assert sched.slots_used == 0
    # one forward per step for all rows: far fewer steps than the requests' tokens and chunks summed
    assert sched.steps < sum(len(t) for t in want.values())
    # negative control: a batch that mixes up rows' positions (row 0's for all) changes the answers
    sched = _scheduler(model)
    forward = sched.backend.forward
    sched.backend.forward = lambda x, pos, *a: forward(x, np.broadcast_to(pos[:1], pos.shape).copy(), *a)
    logs = {n: _Log() for n in "AD"}
    for n in logs:
        sched.submit(logs[n].request(*inputs[n], params[n]))
    _drain(sched)
    assert {n: log.tokens for n, log in logs.items()} != {n: want[n] for n in logs}


def test_sampled_answer_reproducible_per_seed_in_any_batch(parts):
    model = parts[0]
    # high temperature: the tiny model is so peaked that a low one samples the greedy tokens
    params = SamplingParams(max_tokens=8, temperature=5.0, top_k=50, top_p=0.95, seed=77)
    ids, embeds = _inputs(parts, "Tell me a story.")
    want = list(TokenGenerator(model)(ids, embeds, params))
    alone, crowded = _Log(), _Log()
    sched = _scheduler(model)
    sched.submit(alone.request(ids, embeds, params))
    _drain(sched)
    others = [_Log() for _ in range(2)]
    for i, log in enumerate(others):
        sched.submit(log.request(*_inputs(parts, f"Question {i}: what?" * (i + 1)),
                                 SamplingParams(max_tokens=5, temperature=5.0, top_k=50, seed=i)))
    sched.step()
    sched.submit(crowded.request(ids, embeds, params))
    _drain(sched)
    assert alone.tokens == crowded.tokens == want
    # negative control: another seed gives another answer
    other = list(TokenGenerator(model)(ids, embeds, SamplingParams(max_tokens=8, temperature=5.0, top_k=50,
                                                                   top_p=0.95, seed=78)))
    assert other != want


def test_finished_requests_leave_and_waiting_ones_join_between_steps(parts):
    model = parts[0]
    sched = _scheduler(model, max_batch=2, max_num_tokens=64)
    ids, _ = _inputs(parts, "Hi")
    short, long_, waiting = _Log(), _Log(), _Log()
    sched.submit(short.request(ids, None, SamplingParams(max_tokens=2)))
    sched.submit(long_.request(ids, None, SamplingParams(max_tokens=6)))
    sched.submit(waiting.request(ids, None, SamplingParams(max_tokens=3)))
    sched.step()  # both prefill, first tokens
    assert (len(short.tokens), len(long_.tokens), sched.slots_used, sched.queued) == (1, 1, 2, 1)
    sched.step()  # short finishes in this step and frees its slot at once
    assert short.end == "length" and sched.slots_used == 1 and not waiting.tokens
    sched.step()  # the waiting request joins at the next step
    assert len(waiting.tokens) == 1 and sched.slots_used == 2 and sched.queued == 0
    _drain(sched)
    assert long_.end == waiting.end == "length" and sched.slots_used == 0
    assert long_.tokens[:2] == short.tokens and waiting.tokens == long_.tokens[:3]  # same prompt, greedy


def test_cancelled_request_frees_its_slot_within_one_step(parts):
    model = parts[0]
    sched = _scheduler(model, max_batch=1, max_num_tokens=64)
    ids, _ = _inputs(parts, "Tell me a story.")
    cancelled, nxt = _Log(cancel_after=2), _Log()
    sched.submit(cancelled.request(ids, None, SamplingParams(max_tokens=200)))
    sched.submit(nxt.request(ids, None, SamplingParams(max_tokens=2)))
    for _ in range(3):
        sched.step()
    assert cancelled.end == "cancelled" and len(cancelled.tokens) == 2 and sched.slots_used == 1
    _drain(sched)
    assert nxt.end == "length" and len(nxt.tokens) == 2 and sched.steps == 4


def test_full_queue_answers_server_busy_and_limits_are_named(parts):
    model = parts[0]
    sched = _scheduler(model, max_batch=1, max_queue=1, max_seq_len=64)
    ids, _ = _inputs(parts, "Hi")
    logs = [_Log() for _ in range(3)]
    for log in logs:
        sched.submit(log.request(ids, None, SamplingParams(max_tokens=2)))
    # one slot (free) + one queued place: the third is refused at once, readably
    assert logs[2].error is not None and "server busy" in logs[2].error and "retry later" in logs[2].error
    assert logs[0].error is None and logs[1].error is None
    _drain(sched)
    assert logs[0].end == logs[1].end == "length"
    too_long = _Log()
    sched.submit(too_long.request(ids, None, SamplingParams(max_tokens=64)))
    assert too_long.error is not None and "max_tokens=64" in too_long.error and "max_seq_len=64" in too_long.error
    bad_end = _Log()
    sched.submit(bad_end.request(ids, None, SamplingParams(max_tokens=2, end_id=10 ** 6)))
    assert "end_id=1000000 is outside the vocabulary" in bad_end.error
    with pytest.raises(ValueError, match="max_num_tokens"):
        _scheduler(model, max_batch=4, max_num_tokens=2)


def test_onnx_backend_batched_equals_unbatched(parts, tiny_export):
    from m3_trt.export.onnx.runtime import OnnxModel

    onnx_model = OnnxModel(tiny_export("none"), threads=1)
    gen = OnnxTokenGenerator(onnx_model)
    names = ["A", "C", "D"]
    inputs = {n: _inputs(parts, p, im) for n, p, im in CASES if n in names}
    params = {n: SamplingParams(max_tokens=5 + i) for i, n in enumerate(names)}
    want = {n: list(gen(*inputs[n], params[n])) for n in names}
    sched = BatchScheduler(OnnxBatchBackend(onnx_model, slots=3), max_batch=3, max_num_tokens=12, max_queue=4)
    logs = {n: _Log() for n in names}
    sched.submit(logs["A"].request(*inputs["A"], params["A"]))
    sched.step()
    for n in names[1:]:
        sched.submit(logs[n].request(*inputs[n], params[n]))
    _drain(sched)
    assert {n: log.tokens for n, log in logs.items()} == want
    # the torch path agrees too (same checkpoint): the ONNX batch is not merely self-consistent
    assert want["A"] == list(TokenGenerator(parts[0])(*inputs["A"], params["A"]))
    with pytest.raises(RequestError, match="max_seq_len=128"):
        sched.check(GenRequest(inputs["A"][0], None, SamplingParams(max_tokens=128), None, None, None))
