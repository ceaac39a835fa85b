"""Serving pipeline pieces in-process (no server): detokenisation, image rows, params, glue."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from m3_trt.serving.pipeline import RequestError, SamplingParams, split_image_rows, text_delta
from m3_trt.serving.triton_glue import InterleavedScheduler, read, read_scalar, sampling_params


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    from m3_trt.processing import M3Processor

    return M3Processor.from_pretrained(tiny_ckpt)


@pytest.mark.parametrize("text", ["plain ascii words", "naïve café – 東京 🚀 done"], ids=["ascii", "multibyte"])
def test_text_delta_telescopes_to_full_decode(processor, text):
    ids = processor.encode(text)
    pieces = [text_delta(processor, ids[: i + 1], 1, False) for i in range(len(ids))]
    pieces.append(text_delta(processor, ids, 0, True))
    assert "".join(pieces) == processor.decode(ids)
    assert not any("\ufffd" in p for p in pieces[:-1]) or "\ufffd" in processor.decode(ids)
    # negative control: dropping the stable-prefix logic (decode each token alone) breaks multibyte text
    naive = "".join(processor.decode([i]) for i in ids)
    assert (naive == processor.decode(ids)) == text.isascii()


def test_text_delta_whole_answer_at_once(processor):
    ids = processor.encode("some answer")
    assert text_delta(processor, ids, len(ids), True) == processor.decode(ids)


def test_split_image_rows_strips_padding():
    rows = np.zeros((2, 6), np.uint8)
    rows[0, :3] = [1, 2, 3]
    rows[1, :] = [9, 9, 9, 9, 9, 9]
    assert split_image_rows(rows) == [b"\x01\x02\x03", b"\x09" * 6]
    with pytest.raises(RequestError, match="UINT8"):
        split_image_rows(rows.astype(np.int32))


@pytest.mark.parametrize("kw,msg", [(dict(max_tokens=0), "max_tokens"), (dict(max_tokens=1, top_p=0.0), "top_p"),
                                    (dict(max_tokens=1, temperature=-1.0), "temperature"),
                                    (dict(max_tokens=1, top_k=-2), "top_k")], ids=["max_tokens0", "top_p0", "temp-1", "top_k-2"])
def test_sampling_params_refused(kw, msg):
    with pytest.raises(RequestError, match=msg):
        SamplingParams(**kw).validate()


class _Tensor:
    def __init__(self, a):
        self.a = a

    def as_numpy(self):
        return self.a


class _PB:  # stand-in for triton_python_backend_utils
    @staticmethod
    def get_input_tensor_by_name(request, name):
        return _Tensor(request[name]) if name in request else None


def test_glue_reads_batched_inputs_with_stand_in():
    req = {"max_tokens": np.array([[5]], np.int32), "temperature": np.array([[0.5]], np.float32),
           "input_ids": np.array([[1, 2, 3]])}
    assert read(_PB, req, "input_ids").tolist() == [1, 2, 3]
    p = sampling_params(_PB, req)
    assert (p.max_tokens, p.temperature, p.top_k, p.seed) == (5, 0.5, 0, None)
    assert read_scalar(_PB, req, "stream", False, bool) is False
    with pytest.raises(RequestError, match="missing required input 'max_tokens'"):
        sampling_params(_PB, {})


def test_scheduler_interleaves_and_reports():
    sched = InterleavedScheduler("test")
    log, done = [], threading.Event()
    remaining = [3]

    def finished(tag):
        log.append((tag, "end"))
        remaining[0] -= 1
        if not remaining[0]:
            done.set()

    gate = threading.Event()

    def slow_start():
        gate.wait(5)
        return iter([10, 11, 12])

    sched.submit(slow_start, lambda t: log.append(("a", t)), lambda: finished("a"), lambda e: log.append(("a", e)))
    sched.submit(lambda: iter([20, 21]), lambda t: log.append(("b", t)), lambda: finished("b"), None)

    def boom():
        raise RequestError("bad request")

    errors = []
    sched.submit(boom, None, None, lambda e: (errors.append(str(e)), finished("c")))
    gate.set()
    assert done.wait(10)
    sched.close()
    a = [t for tag, t in log if tag == "a" and t != "end"]
    b = [t for tag, t in log if tag == "b" and t != "end"]
    assert a == [10, 11, 12] and b == [20, 21] and errors == ["bad request"]
    # interleaved: b's first token comes before a's last
    assert log.index(("b", 20)) < log.index(("a", 12))
