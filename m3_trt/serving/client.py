"""gRPC client for an M3 Triton repository (ensemble or BLS entry point).

Tensor names and types follow the TensorRT-LLM backend's ensemble templates
(``triton_backend/all_models/{inflight_batcher_llm,multimodal}/ensemble/config.pbtxt``), so
clients written for those work here. Every model has ``max_batch_size > 0``; a request is one
batch row, so each tensor below carries a leading batch dimension of 1:

====================  ======  ==========================  ==========================================
name                  dtype   shape                       meaning
====================  ======  ==========================  ==========================================
text_input            BYTES   [1, 1]                      user prompt (UTF-8); chat template applied
                                                          server-side
max_tokens            INT32   [1, 1]                      new tokens to generate, > 0
image_bytes_input     UINT8   [1, n_images, max_len]      encoded images (PNG/JPEG/...), each row
                                                          zero-padded to the longest (optional)
image_bytes_lengths   INT32   [1, n_images]               each image's length in bytes (sent when
                                                          an image ends in a zero byte; not a
                                                          TensorRT-LLM name)
stream                BOOL    [1, 1]                      one response per token (optional)
temperature           FP32    [1, 1]                      0 = greedy (optional)
top_k / top_p         INT32 / FP32                        sampling filters (optional)
seed                  UINT64  [1, 1]                      sampling seed (optional)
end_id / pad_id       INT32   [1, 1]                      override EOS / pad ids (optional)
text_output           BYTES   [1, 1]                      text piece (stream) or whole answer
====================  ======  ==========================  ==========================================

Image rows are zero-padded. When an image ends in a zero byte (BMP, TIFF, PPM, some WebP) the
client also sends ``image_bytes_lengths`` and the server cuts each row at its length; otherwise
the server strips the trailing zeros, which is exact for such files (PNG, JPEG, GIF never end in
zero), and repositories without that input (TensorRT-LLM-style) keep working. (The TensorRT-LLM
template's ``image_bytes_input`` is 4-D decoded pixels; encoded bytes keep requests small and
let the server own decoding and the pixel budget.)

All requests go over gRPC bidirectional streaming (``start_stream`` / ``async_stream_infer``):
decoupled models (the streaming ``llm`` step, hence the ensemble) reject unary ``infer``. The last
response of a request carries the ``triton_final_response`` parameter.
"""

from __future__ import annotations

import queue
import uuid
from typing import Iterator, Sequence

import numpy as np

__all__ = ["M3Client", "M3ClientError", "build_inputs", "pack_images"]


class M3ClientError(RuntimeError):
    """The server rejected a request; the message is the server's own."""


def pack_images(images: Sequence[bytes]) -> np.ndarray:
    """Encoded images → UINT8 ``[1, n_images, max_len]``, each row zero-padded at the end."""
    blobs = [bytes(b) for b in images]
    width = max(len(b) for b in blobs)
    out = np.zeros((1, len(blobs), width), dtype=np.uint8)
    for i, b in enumerate(blobs):
        out[0, i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return out


def build_inputs(
    prompt: str,
    images: Sequence[bytes] = (),
    *,
    max_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    end_id: int | None = None,
    pad_id: int | None = None,
    stream: bool = False,
):
    """The ``tritonclient.grpc.InferInput`` list for one request (see the module table)."""
    import tritonclient.grpc as grpcclient

    def tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    inputs = [
        tensor("text_input", np.array([[prompt.encode("utf-8")]], dtype=np.object_), "BYTES"),
        tensor("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
        tensor("stream", np.array([[bool(stream)]], dtype=np.bool_), "BOOL"),
        tensor("temperature", np.array([[temperature]], dtype=np.float32), "FP32"),
    ]
    if images:
        inputs.append(tensor("image_bytes_input", pack_images(images), "UINT8"))
        if any(bytes(b).endswith(b"\0") for b in images):  # stripping the padding would cut these
            inputs.append(tensor("image_bytes_lengths", np.array([[len(b) for b in images]], np.int32), "INT32"))
    if top_k is not None:
        inputs.append(tensor("top_k", np.array([[top_k]], dtype=np.int32), "INT32"))
    if top_p is not None:
        inputs.append(tensor("top_p", np.array([[top_p]], dtype=np.float32), "FP32"))
    if seed is not None:
        inputs.append(tensor("seed", np.array([[seed]], dtype=np.uint64), "UINT64"))
    if end_id is not None:
        inputs.append(tensor("end_id", np.array([[end_id]], dtype=np.int32), "INT32"))
    if pad_id is not None:
        inputs.append(tensor("pad_id", np.array([[pad_id]], dtype=np.int32), "INT32"))
    return inputs


def _text_of(result) -> str:
    array = result.as_numpy("text_output")
    if array is None or array.size == 0:
        return ""
    return b"".join(x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1)).decode(
        "utf-8", errors="replace"
    )


def _is_final(result) -> bool:
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


class M3Client:
    """Talks to ``model`` (``ensemble`` by default; ``m3_bls`` for the BLS entry) at ``url``.

    Each call opens its own gRPC channel and stream, so one ``M3Client`` may be shared by
    threads. ``timeout_s`` bounds a whole request.
    """

    def __init__(self, url: str = "localhost:8001", model: str = "ensemble", *, timeout_s: float = 300.0):
        self.url = url
        self.model = model
        self.timeout_s = timeout_s

    def stream(self, prompt: str, images: Sequence[bytes] = (), *, stream: bool = True, **params) -> Iterator[str]:
        """Yield text pieces as the server sends them (one per token when ``stream``)."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        inputs = build_inputs(prompt, images, stream=stream, **params)
        replies: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        done = False
        try:
            client.start_stream(callback=lambda result, error: replies.put((result, error)))
            client.async_stream_infer(
                self.model, inputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True
            )
            while True:
                try:
                    result, error = replies.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise M3ClientError(f"no response from {self.model} at {self.url} in {self.timeout_s} s") from None
                if error is not None:
                    done = True  # an error response ends the request on the server too
                    msg = error.message() if isinstance(error, InferenceServerException) else str(error)
                    raise M3ClientError(f"{self.model} at {self.url}: {msg}")
                done = _is_final(result)
                piece = _text_of(result)
                if piece:
                    yield piece
                if done:
                    return
        finally:
            # Cancel only a request abandoned before its final response (timeout, consumer
            # stopped early). Cancelling a stream whose request already completed races in
            # Triton 2.51's gRPC frontend: now and then the decoupled model's response factory
            # is never released, the model stays "live" and shutdown waits the whole exit timeout.
            try:
                client.stop_stream(cancel_requests=not done)
            finally:
                client.close()

    def generate(self, prompt: str, images: Sequence[bytes] = (), *, stream: bool = False, **params) -> str:
        """The whole answer. ``stream=True`` asks for per-token responses and joins them."""
        return "".join(self.stream(prompt, images, stream=stream, **params))

    def is_ready(self) -> bool:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        try:
            return client.is_server_ready() and client.is_model_ready(self.model)
        except Exception:
            return False
        finally:
            client.close()
