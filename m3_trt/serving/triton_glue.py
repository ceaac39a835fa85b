"""Helpers shared by the generated python-backend ``model.py`` files.

``triton_python_backend_utils`` exists only inside the python-backend stub, so every helper takes
the module as its first argument (``pb``) instead of importing it; tests pass a stand-in.
Tensors of models with ``max_batch_size > 0`` arrive with the request's batch dimension (1)
in front; :func:`read` strips it.
"""

from __future__ import annotations

import json
import queue
import threading
import traceback
from typing import Any, Callable, Iterator

import numpy as np

from .pipeline import RequestError, SamplingParams

__all__ = ["model_parameters", "read", "read_text", "read_scalar", "sampling_params", "error_response",
           "InterleavedScheduler"]


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
    ).validate()


def error_response(pb, exc: BaseException):
    """A per-request error response; unexpected exceptions keep their type in the message."""
    msg = str(exc) if isinstance(exc, RequestError) else f"{type(exc).__name__}: {exc}"
    return pb.InferenceResponse(error=pb.TritonError(msg))


class InterleavedScheduler:
    """One worker thread that advances every active request by one token in turn.

    ``submit(start, emit, finish, fail)``: ``start()`` returns a token iterator (run on the
    worker, so slow set-up never blocks ``execute``); each token goes to ``emit(token)``; the end
    to ``finish()``; any exception to ``fail(exc)``. New requests join between tokens, so a long
    answer does not hold back a short one (continuous scheduling; forwards are not fused).
    """

    def __init__(self, name: str = "m3-scheduler"):
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, start: Callable[[], Iterator[int]], emit: Callable[[int], None],
               finish: Callable[[], None], fail: Callable[[BaseException], None]) -> None:
        self._inbox.put((start, emit, finish, fail))

    def close(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        active: list[list] = []
        while not self._stop.is_set():
            try:
                while True:
                    job = self._inbox.get(block=not active)
                    if job is None:
                        return
                    start, emit, finish, fail = job
                    try:
                        active.append([start(), emit, finish, fail])
                    except BaseException as exc:  # noqa: BLE001 - reported to the client
                        self._safe(fail, exc)
            except queue.Empty:
                pass
            for job in list(active):
                it, emit, finish, fail = job
                try:
                    tok = next(it)
                except StopIteration:
                    active.remove(job)
                    self._safe(finish)
                    continue
                except BaseException as exc:  # noqa: BLE001
                    active.remove(job)
                    self._safe(fail, exc)
                    continue
                try:
                    emit(tok)
                except BaseException as exc:  # noqa: BLE001 - e.g. the client went away
                    active.remove(job)
                    self._safe(fail, exc)

    @staticmethod
    def _safe(fn, *args) -> None:
        try:
            fn(*args)
        except BaseException:  # noqa: BLE001 - never let one request kill the worker
            traceback.print_exc()
