"""Helpers shared by the generated python-backend ``model.py`` files.

``triton_python_backend_utils`` exists only inside the python-backend stub, so every helper takes
the module as its first argument (``pb``) instead of importing it; tests pass a stand-in.
Tensors of models with ``max_batch_size > 0`` arrive with the request's batch dimension (1)
in front; :func:`read` strips it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from m3_trt.serving.batching import BatchScheduler, SchedulerMetrics, batch_backend
from m3_trt.serving.pipeline import RequestError, RequestLimits, SamplingParams, split_image_rows

__all__ = ["model_parameters", "read", "read_text", "read_scalar", "sampling_params", "error_response",
           "TritonMetrics", "vision_batch_metric", "llm_scheduler", "read_images"]


def model_parameters(args: dict) -> dict[str, str]:
    """The ``parameters { key: ... string_value: ... }`` of a model's config.pbtxt, as a dict."""
    cfg = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}


def read(pb, request, name: str, *, required: bool = True) -> np.ndarray | None:
    """Input ``name`` without its leading batch dimension; None when optional and absent."""
    t = pb.get_input_tensor_by_name(request, name)
    if t is None:
        if required:
            raise RequestError(f"missing required input '{name}'")
        return None
    array = t.as_numpy()
    return array[0] if array.ndim > 0 and array.shape[0] == 1 else array


def read_text(pb, request, name: str) -> str:
    array = read(pb, request, name)
    if array.dtype != np.object_ or array.size != 1:
        raise RequestError(f"input '{name}' must be one BYTES/STRING element, got {array.dtype} {array.shape}")
    value = array.reshape(-1)[0]
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError as e:
        raise RequestError(f"input '{name}' is not valid UTF-8: {e}") from e


def read_scalar(pb, request, name: str, default: Any, kind: type) -> Any:
    array = read(pb, request, name, required=default is ...)
    if array is None:
        return default
    if array.size != 1:
        raise RequestError(f"input '{name}' must hold one value, got shape {array.shape}")
    return kind(array.reshape(-1)[0])


def sampling_params(pb, request, *, max_tokens_name: str = "max_tokens") -> SamplingParams:
    """The TensorRT-LLM-named sampling inputs of a request, validated."""
    return SamplingParams(
        max_tokens=read_scalar(pb, request, max_tokens_name, ..., int),
        temperature=read_scalar(pb, request, "temperature", 0.0, float),
        top_k=read_scalar(pb, request, "top_k", 0, int),
        top_p=read_scalar(pb, request, "top_p", 1.0, float),
        seed=read_scalar(pb, request, "seed", None, int),
        end_id=read_scalar(pb, request, "end_id", None, int),
        pad_id=read_scalar(pb, request, "pad_id", None, int),
    ).validate()


def read_images(pb, request, limits: RequestLimits, prompt: str) -> list[bytes]:
    """The request's encoded images (``image_bytes_input`` rows cut at ``image_bytes_lengths``),
    refused by name when over ``limits`` (count and total size checked before any copy)."""
    rows = read(pb, request, "image_bytes_input", required=False)
    if rows is None:
        limits.check(prompt, [])
        return []
    n = rows.reshape(-1, rows.shape[-1]).shape[0] if rows.ndim and rows.size else 0
    if n > limits.max_images:
        raise RequestError(f"{n} images in one request, over max_images={limits.max_images}")
    received = len(prompt.encode("utf-8")) + rows.nbytes
    if received > limits.max_request_bytes:
        raise RequestError(f"request is {received} bytes, over max_request_bytes={limits.max_request_bytes}")
    images = split_image_rows(rows, read(pb, request, "image_bytes_lengths", required=False))
    limits.check(prompt, images, received)
    return images


def error_response(pb, exc: BaseException):
    """A per-request error response; unexpected exceptions keep their type in the message."""
    msg = str(exc) if isinstance(exc, RequestError) else f"{type(exc).__name__}: {exc}"
    return pb.InferenceResponse(error=pb.TritonError(msg))


class TritonMetrics(SchedulerMetrics):
    """The scheduler's figures as python-backend custom metrics on Triton's metrics endpoint.

    ``m3_llm_generated_tokens`` (counter), ``m3_llm_time_to_first_token_seconds`` and
    ``m3_llm_inter_token_seconds`` and ``m3_llm_step_batch_size`` (rows per batched forward)
    (histograms), ``m3_llm_active_batch_size``,
    ``m3_llm_kv_slots_used`` and ``m3_llm_queued_requests`` (gauges), labelled with the model
    instance. Families are created once per process (Triton refuses a second family of a name).
    """

    def __init__(self, pb, args: dict, scheduler_queue=lambda: 0):
        labels = {"model": args.get("model_name", "llm"), "instance": args.get("model_instance_name", "0")}
        fam = _families(pb)
        self._tokens = fam["tokens"].Metric(labels=labels)
        self._ttft = fam["ttft"].Metric(labels=labels, buckets=TTFT_BUCKETS)
        self._itl = fam["itl"].Metric(labels=labels, buckets=ITL_BUCKETS)
        self._rows = fam["rows"].Metric(labels=labels, buckets=BATCH_BUCKETS)
        self._active = fam["active"].Metric(labels=labels)
        self._slots = fam["slots"].Metric(labels=labels)
        self._queued = fam["queued"].Metric(labels=labels)
        self._queue = scheduler_queue

    def step(self, rows: int, active: int, slots_used: int, tokens: int) -> None:
        if rows:
            self._rows.observe(rows)
        if tokens:
            self._tokens.increment(tokens)
        self._active.set(active)
        self._slots.set(slots_used)
        self._queued.set(self._queue())

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self._itl.observe(seconds)


TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
_FAMILIES: dict = {}


def _families(pb) -> dict:
    if not _FAMILIES:
        M = pb.MetricFamily
        for key, name, kind, what in (
            ("tokens", "m3_llm_generated_tokens", M.COUNTER, "Tokens generated by the llm step"),
            ("ttft", "m3_llm_time_to_first_token_seconds", M.HISTOGRAM, "Seconds from a request's arrival in the llm step to its first token"),
            ("itl", "m3_llm_inter_token_seconds", M.HISTOGRAM, "Seconds between consecutive tokens of one request"),
            ("rows", "m3_llm_step_batch_size", M.HISTOGRAM, "Requests per batched forward of the llm step"),
            ("active", "m3_llm_active_batch_size", M.GAUGE, "Requests holding a KV slot after the last step"),
            ("slots", "m3_llm_kv_slots_used", M.GAUGE, "KV-cache slots held by requests"),
            ("queued", "m3_llm_queued_requests", M.GAUGE, "Requests waiting for a KV-cache slot"),
            ("vision", "m3_vision_batch_size", M.HISTOGRAM, "Requests per vision-encoder forward"),
        ):
            _FAMILIES[key] = M(name=name, description=what, kind=kind)
    return _FAMILIES


def vision_batch_metric(pb, args: dict):
    """The vision encoder's batch-size histogram for this model instance."""
    labels = {"model": args.get("model_name", "vision_encoder"), "instance": args.get("model_instance_name", "0")}
    return _families(pb)["vision"].Metric(labels=labels, buckets=BATCH_BUCKETS)


def llm_scheduler(pb, args: dict, generator) -> BatchScheduler:
    """The in-flight batcher of an llm-like model (llm, m3_bls) from its config, started.

    KV slots = the model's ``max_batch_size``; cache length = ``max_input_len + max_output_len``
    (torch; capped at the model's positions) or the ONNX export's ``max_seq_len``.
    """
    cfg = json.loads(args["model_config"])
    p = model_parameters(args)
    slots = int(cfg.get("max_batch_size", 1)) or 1
    max_seq_len = int(p.get("max_input_len", "4096")) + int(p.get("max_output_len", "1024"))
    backend = batch_backend(generator, slots=slots, max_seq_len=max_seq_len)
    sched = BatchScheduler(backend, max_batch=slots, max_num_tokens=int(p.get("max_num_tokens", "256")),
                           max_queue=int(p.get("max_queue_size", "64")), name=cfg.get("name", "llm"))
    sched.metrics = TritonMetrics(pb, args, lambda: sched.queued)
    return sched.start()
