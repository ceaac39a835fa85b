"""OpenAI-compatible HTTP endpoint in front of the repository's ``ensemble`` (standard library only).

``m3-trt serve REPO --openai-port P`` runs :class:`OpenAIServer` beside tritonserver, bound to the
same host (loopback by default). It serves

- ``GET /v1/models`` — one model, named after the checkpoint folder (or ``--served-model-name``);
- ``POST /v1/chat/completions`` — one user turn: ``messages`` = a single ``user`` message whose
  content is a string or a list of ``text`` and ``image_url`` parts (``data:image/...;base64,``
  URLs only: the server fetches nothing). ``max_tokens`` (or ``max_completion_tokens``, default
  :data:`DEFAULT_MAX_TOKENS`), ``temperature`` (default 1, as OpenAI; 0 = greedy), ``top_p``,
  ``seed``, ``stop`` (a string or up to 4), ``stream`` (server-sent events ending with
  ``data: [DONE]``; ``stream_options.include_usage`` adds a usage chunk), ``n`` = 1; and the
  extensions vLLM and load generators such as ``aiperf`` send: ``top_k`` and ``ignore_eos``
  (always ``max_tokens`` tokens: the ensemble's ``end_id = -1``).

Every request is forwarded to the ensemble over gRPC streaming (the one path of truth; images
first, then the text parts joined by newlines — the order the repository's chat template uses).
The prompt is also run through the repository's own :class:`~m3_trt.serving.pipeline.Preprocessor`
(same checkpoint, same limits) before forwarding: bad images and over-long prompts are answered
400 without touching the server, and ``usage.prompt_tokens`` is exactly the prompt the server
tokenizes. ``usage.completion_tokens`` counts the ensemble's streamed responses: the ``llm`` step
sends one response per generated token when ``stream`` is set, and the final response (flagged
``triton_final_response``) carries no token of its own. ``stop`` strings are matched on the text;
the answer is cut before the first match (the rest of the server's answer is read and dropped in
the background). A streaming client that disconnects cancels its server request.

Bad requests get HTTP 4xx with ``{"error": {"message", "type", "param", "code"}}``; errors the
ensemble reports are 400 (``invalid_request_error``) when they name a bad request, else 500.
Chat roles other than one ``user`` turn are refused by name (the ensemble's contract is one prompt).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

from m3_trt.serving.client import build_inputs
from m3_trt.serving.pipeline import Preprocessor, RequestError

__all__ = ["OpenAIServer", "OpenAIError", "DEFAULT_MAX_TOKENS"]

DEFAULT_MAX_TOKENS = 256
IGNORE_EOS_END_ID = -1  # the ensemble's end_id that ends nothing (TensorRT-LLM's benchmarking convention)
MAX_BODY_BYTES = 64 << 20  # a request body above this is refused before it is read
MAX_STOP = 4


class OpenAIError(Exception):
    """A refused request: HTTP ``status`` and the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):  # noqa: A002 - OpenAI's field name
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` body."""

    prompt: str
    images: list[bytes]
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    ignore_eos: bool
    stop: list[str]
    stream: bool
    include_usage: bool


@dataclass
class Generation:
    """Counters filled while a forwarded request runs."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None
    text: list[str] = field(default_factory=list)


def _number(body: dict, name: str, kind: type, default, lo=None, hi=None):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) if kind is float \
        else isinstance(value, int) and not isinstance(value, bool)
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise OpenAIError(400, f"'{name}' must be {'a number' if kind is float else 'an integer'}{rng}, got {value!r}",
                          param=name, code="invalid_value")
    return kind(value)


def _image(url: str, param: str) -> bytes:
    if not isinstance(url, str) or not url.startswith("data:"):
        raise OpenAIError(400, "image_url must be a data: URL (data:image/png;base64,...); this server fetches "
                          "no remote URLs", param=param, code="invalid_image_url")
    head, _, payload = url.partition(",")
    if not head.endswith(";base64") or not payload:
        raise OpenAIError(400, "image_url data: URL must be base64-encoded (data:<type>;base64,<data>)",
                          param=param, code="invalid_image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise OpenAIError(400, f"image_url data is not valid base64: {e}", param=param, code="invalid_image_url") from e


def parse_chat_request(body, model_name: str) -> ChatRequest:
    """Validate a chat completion body; raises :class:`OpenAIError` naming the bad field."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model != model_name:
        raise OpenAIError(404, f"The model {model!r} does not exist; this server serves {model_name!r}",
                          param="model", code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "'messages' must be a non-empty list", param="messages", code="invalid_value")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in messages]
        raise OpenAIError(400, f"this endpoint serves one user turn (the ensemble takes one prompt); got roles "
                          f"{roles}", param="messages", code="unsupported_conversation")
    content = messages[0].get("content")
    texts, images = [], []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list) and content:
        for i, part in enumerate(content):
            param = f"messages[0].content[{i}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                ref = part.get("image_url")
                images.append(_image(ref.get("url") if isinstance(ref, dict) else ref, param + ".image_url"))
            else:
                raise OpenAIError(400, f"content part {i} must be {{'type': 'text', 'text': str}} or "
                                  f"{{'type': 'image_url', 'image_url': {{'url': 'data:...'}}}}", param=param,
                                  code="invalid_content")
    else:
        raise OpenAIError(400, "messages[0].content must be a string or a non-empty list of parts",
                          param="messages[0].content", code="invalid_content")
    max_tokens = _number(body, "max_completion_tokens", int, None, 1)
    max_tokens = _number(body, "max_tokens", int, max_tokens or DEFAULT_MAX_TOKENS, 1)
    if _number(body, "n", int, 1, 1) != 1:
        raise OpenAIError(400, "only n = 1 is supported", param="n", code="invalid_value")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise OpenAIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them",
                          param="stop", code="invalid_value")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise OpenAIError(400, "'stream' must be a boolean and 'stream_options' an object", param="stream")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise OpenAIError(400, f"'ignore_eos' must be a boolean, got {ignore_eos!r}", param="ignore_eos",
                          code="invalid_value")
    return ChatRequest(
        prompt="\n".join(texts), images=images, max_tokens=max_tokens,
        temperature=_number(body, "temperature", float, 1.0, 0, 2),
        top_p=_number(body, "top_p", float, None, 0, 1), top_k=_number(body, "top_k", int, None, 0),
        seed=_number(body, "seed", int, None, 0, 2**64 - 1), ignore_eos=ignore_eos, stop=stop, stream=stream,
        include_usage=bool(options.get("include_usage")))


class _StopMatcher:
    """Releases text that can no longer be the start of a stop string; cuts at the first match."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.hit = stops, "", False
        self.keep = max((len(s) for s in stops), default=1) - 1

    def push(self, piece: str) -> str:
        self.held += piece
        cut = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, out, self.held = True, self.held[:cut], ""
            return out
        n = max(0, len(self.held) - self.keep)
        out, self.held = self.held[:n], self.held[n:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class OpenAIServer:
    """The endpoint for the repository ``repo`` whose ensemble answers at ``grpc_url``."""

    def __init__(self, repo: str | Path, grpc_url: str, *, host: str = "127.0.0.1", port: int = 0,
                 served_model_name: str | None = None, entry: str = "ensemble", timeout_s: float = 300.0):
        manifest = Path(repo) / "manifest.json"
        try:
            settings = json.loads(manifest.read_text())["settings"]
            missing = [k for k in ("checkpoint", "max_input_len", "max_input_pixels") if k not in settings]
            if missing:
                raise KeyError(f"settings lack {missing}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{manifest}: the OpenAI endpoint needs a repository written by `m3-trt triton-repo` "
                             f"(its manifest names the checkpoint whose processor counts the prompt): {e!r}") from e
        self.preprocessor = Preprocessor(settings["checkpoint"], max_input_len=int(settings["max_input_len"]),
                                         max_input_pixels=int(settings["max_input_pixels"]))
        self.model_name = served_model_name or Path(settings["checkpoint"]).name
        self.grpc_url, self.entry, self.timeout_s = grpc_url, entry, timeout_s
        self.created = int(time.time())
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self) -> "OpenAIServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="openai-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the work ------------------------------------------------------------------------------
    def prepare(self, req: ChatRequest) -> Generation:
        """Run the repository's preprocessing in-process: validates and counts the prompt's tokens."""
        try:
            enc = self.preprocessor(req.prompt, req.images)
        except RequestError as e:
            raise OpenAIError(400, str(e), param="messages", code="invalid_prompt") from e
        return Generation(prompt_tokens=int(enc["input_ids"].size))

    def generate(self, req: ChatRequest, gen: Generation) -> Iterator[str]:
        """Forward to the ensemble (gRPC streaming, one response per token); yield text as it becomes final.

        Sets ``gen.completion_tokens`` and ``gen.finish_reason``. A consumer that stops early (the
        client went away) cancels the server request.
        """
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        inputs = build_inputs(req.prompt, req.images, max_tokens=req.max_tokens, temperature=req.temperature,
                              top_p=req.top_p, top_k=req.top_k, seed=req.seed, stream=True,
                              end_id=IGNORE_EOS_END_ID if req.ignore_eos else None)
        replies: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.grpc_url)
        matcher, done = _StopMatcher(req.stop), False
        try:
            client.start_stream(callback=lambda result, error: replies.put((result, error)))
            client.async_stream_infer(self.entry, inputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True)
            while not done:
                try:
                    result, error = replies.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise OpenAIError(504, f"no response from the ensemble in {self.timeout_s} s",
                                      type="server_error", code="timeout") from None
                if error is not None:
                    done = True
                    msg = error.message() if isinstance(error, InferenceServerException) else str(error)
                    status = error.status() if isinstance(error, InferenceServerException) else None
                    if "UNAVAILABLE" in str(status) or "DEADLINE" in str(status):  # gRPC could not reach it
                        raise OpenAIError(503, f"the ensemble at {self.grpc_url} could not be reached: {msg}",
                                          type="server_error", code="upstream_unavailable")
                    if msg.startswith("server busy") or ": server busy" in msg:  # the llm's full queue
                        raise OpenAIError(503, msg, type="server_error", code="server_busy")
                    # The ensemble names a bad request before its first token; later errors are the server's.
                    raise OpenAIError(400 if gen.completion_tokens == 0 else 500, msg,
                                      type="invalid_request_error" if gen.completion_tokens == 0 else "server_error",
                                      code="ensemble_error")
                params = result.get_response().parameters
                done = "triton_final_response" in params and params["triton_final_response"].bool_param
                array = result.as_numpy("text_output")
                piece = b"".join(array.reshape(-1)).decode("utf-8", "replace") if array is not None else ""
                if not done:
                    gen.completion_tokens += 1
                out = matcher.push(piece)
                if out:
                    yield out
                if matcher.hit:
                    gen.finish_reason = "stop"
                    # Drain the rest in the background instead of cancelling: cancelling a request
                    # the llm step does not yet stop for leaves Triton 2.51 waiting for it at shutdown.
                    threading.Thread(target=_drain, args=(client, replies, self.timeout_s), daemon=True).start()
                    client, done = None, True
                    return
            tail = matcher.flush()
            if tail:
                yield tail
            gen.finish_reason = "length" if gen.completion_tokens >= req.max_tokens else "stop"
        finally:
            if client is not None:
                try:
                    client.stop_stream(cancel_requests=not done)
                finally:
                    client.close()


def _drain(client, replies: queue.Queue, timeout_s: float) -> None:
    """Read a request's remaining responses until its final one, then close the stream."""
    try:
        while True:
            result, error = replies.get(timeout=timeout_s)
            if error is not None:
                break
            params = result.get_response().parameters
            if "triton_final_response" in params and params["triton_final_response"].bool_param:
                break
    except queue.Empty:
        pass
    finally:
        try:
            client.stop_stream(cancel_requests=False)
        finally:
            client.close()


def _handler(server: OpenAIServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "m3-trt-openai"

        def log_message(self, fmt, *args):  # the access log would flood the terminal Triton's log shares
            pass

        def _send_json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: OpenAIError) -> None:
            self._send_json(e.status, e.body())

        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.rstrip("/") == "/v1/models":
                self._send_json(200, {"object": "list", "data": [
                    {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "m3-trt"}]})
            elif self.path.rstrip("/") == f"/v1/models/{server.model_name}":
                self._send_json(200, {"id": server.model_name, "object": "model", "created": server.created,
                                      "owned_by": "m3-trt"})
            else:
                self._error(OpenAIError(404, f"no route GET {self.path}", code="not_found"))

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._drain()
                return self._error(OpenAIError(404, f"no route POST {self.path}", code="not_found"))
            try:
                body = self._read_json()
                req = parse_chat_request(body, server.model_name)
                gen = server.prepare(req)
                if req.stream:
                    return self._stream(req, gen)
                text = "".join(server.generate(req, gen))
            except OpenAIError as e:
                return self._error(e)
            except Exception as e:  # noqa: BLE001 - e.g. the gRPC server is unreachable; keep serving
                return self._error(OpenAIError(503, f"the ensemble at {server.grpc_url} could not be reached: {e}",
                                               type="server_error", code="upstream_unavailable"))
            self._send_json(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": server.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": gen.finish_reason, "logprobs": None}],
                "usage": _usage(gen)})

        def _drain(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            if 0 < n <= MAX_BODY_BYTES:
                self.rfile.read(n)
            elif n:
                self.close_connection = True

        def _read_json(self):
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                n = -1
            if n <= 0 or n > MAX_BODY_BYTES:
                self.close_connection = True
                raise OpenAIError(413 if n > MAX_BODY_BYTES else 400,
                                  f"the request body must have a Content-Length in 1..{MAX_BODY_BYTES} bytes")
            raw = self.rfile.read(n)
            try:
                return json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise OpenAIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e

        def _stream(self, req: ChatRequest, gen: Generation) -> None:
            cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

            def chunk(delta: dict, finish=None, usage=None) -> bytes:
                obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": server.model_name,
                       "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                     "logprobs": None}]}
                if usage:
                    obj["usage"] = usage
                return b"data: " + json.dumps(obj).encode() + b"\n\n"

            pieces = server.generate(req, gen)
            try:
                first = next(pieces, None)  # errors before the first token still get a 4xx status
            except OpenAIError as e:
                return self._error(e)
            except Exception as e:  # noqa: BLE001
                return self._error(OpenAIError(503, f"the ensemble at {server.grpc_url} could not be reached: {e}",
                                               type="server_error", code="upstream_unavailable"))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def send(data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            try:
                send(chunk({"role": "assistant", "content": ""}))
                try:
                    for piece in itertools.chain([first] if first else [], pieces):
                        send(chunk({"content": piece}))
                except OpenAIError as e:  # mid-stream: the status is sent; report in the stream
                    send(b"data: " + json.dumps(e.body()).encode() + b"\n\n")
                else:
                    send(chunk({}, gen.finish_reason))
                    if req.include_usage:
                        send(chunk({}, usage=_usage(gen)))
                send(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pieces.close()  # the client left: cancels the server request
                self.close_connection = True

    return Handler


def _usage(gen: Generation) -> dict:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}
