"""In-flight batching for the ``llm`` step: a KV-cache pool, a step scheduler, two backends.

One :class:`BatchScheduler` per model instance owns a pool of ``max_batch`` KV-cache slots, each
``max_seq_len`` positions long. Requests wait in a bounded queue (full: "server busy, retry
later"), take a free slot between steps, and leave at once when they finish, fail or are
cancelled. Every :meth:`BatchScheduler.step` runs ONE forward ``[B, S]`` over all active rows:
decoding rows feed their last token, prefilling rows the next chunk of their prompt. Rows are
padded to the longest chunk, and the padded size ``B·S`` stays within ``max_num_tokens`` (the
per-step token budget; a prompt longer than the budget is prefilled in chunks over several steps
while the other rows keep decoding).

Padding never leaks into answers: a row's padded positions sit after its real ones (positions
``p..p+n-1`` real, ``p+n..`` padding, clamped to the last cache slot, which admission keeps
free: prompt + max_tokens ≤ max_seq_len and the last sampled token is never fed back). The cache
writes there are garbage ahead of every real query, masked by the causal mask, and overwritten
by the real token at that position before any query can read it.

Each row samples from its own logits with its own ``torch.Generator`` (seeded per request), so a
seeded answer does not depend on the batch it ran in; greedy answers equal the unbatched
:func:`m3_trt.model.generate.generate` (tested).

Backends (``forward(x_BSD, pos_BS, slots, last_B, t_len) -> logits [B, V]``):
:class:`TorchBatchBackend` (the torch reference, cache rows gathered per step up to ``t_len``)
and :class:`OnnxBatchBackend` (the ONNX export's embedding / decoder-layer / head graphs in ONNX
Runtime; the export's static cache length is the pool length).

Legend: P pool slots, B active rows, S padded step length, D hidden, V vocab, T cache length.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import traceback
from typing import Callable, Protocol

import numpy as np
import torch

from m3_trt.model.cache import LayerCache, StaticCache
from m3_trt.model.generate import sample_next

from m3_trt.serving.pipeline import OnnxTokenGenerator, RequestError, SamplingParams, TokenGenerator, check_placeholders, eos_ids

__all__ = ["GenRequest", "BatchScheduler", "TorchBatchBackend", "OnnxBatchBackend", "SchedulerMetrics",
           "SERVER_BUSY", "batch_backend"]

SERVER_BUSY = "server busy: {queued} requests are waiting (max_queue_size={limit}); retry later"


@dataclasses.dataclass(eq=False)
class GenRequest:
    """One generation request as the scheduler sees it (callbacks run on the scheduler thread).

    ``emit(token)`` per new token; ``finish(reason)`` once at the end (``eos`` | ``length`` |
    ``cancelled``); ``fail(exc)`` instead of ``finish`` on an error; ``cancelled()`` is polled
    before every step (Triton's ``request.is_cancelled``).
    """

    input_ids: np.ndarray
    image_embeds: np.ndarray | None
    params: SamplingParams
    emit: Callable[[int], None]
    finish: Callable[[str], None]
    fail: Callable[[BaseException], None]
    cancelled: Callable[[], bool] = lambda: False


class SchedulerMetrics:
    """What the scheduler reports; the default does nothing (the llm step sends them to Triton)."""

    def step(self, rows: int, active: int, slots_used: int, tokens: int) -> None:
        """After each step: rows in its forward (0: none ran), requests still active, KV slots
        held, tokens generated in it."""

    def first_token(self, seconds: float) -> None:
        """Time from submit to a request's first token."""

    def next_token(self, seconds: float) -> None:
        """Time between two tokens of one request."""


@dataclasses.dataclass(eq=False)
class _Seq:
    req: GenRequest
    embeds: np.ndarray  # [S0, D] prompt embeddings (image tokens spliced)
    eos: frozenset
    gen: torch.Generator | None
    submitted: float
    slot: int = -1
    pos: int = 0  # positions written to this row's cache
    next_token: int | None = None  # sampled, not yet fed back
    n_out: int = 0
    last_time: float = 0.0

    @property
    def prefilling(self) -> bool:
        return self.pos < self.embeds.shape[0]


class Backend(Protocol):
    max_seq_len: int
    vocab_size: int
    config: object

    def embed(self, input_ids: np.ndarray, image_embeds: np.ndarray | None) -> np.ndarray: ...

    def forward(self, x_BSD: np.ndarray, pos_BS: np.ndarray, slots: list[int], last_B: np.ndarray,
                t_len: int) -> np.ndarray: ...


class BatchScheduler:
    """Continuous batching over ``backend`` with ``max_batch`` KV slots (see the module doc).

    Drive it with :meth:`start` (a worker thread) or call :meth:`step` yourself (tests).
    """

    def __init__(self, backend: Backend, *, max_batch: int, max_num_tokens: int, max_queue: int,
                 metrics: SchedulerMetrics | None = None, name: str = "llm-batcher"):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and max_queue={max_queue} >= 0")
        if max_num_tokens < max_batch:
            raise ValueError(f"max_num_tokens={max_num_tokens} must be >= max_batch={max_batch} "
                             f"(every active row decodes one token per step)")
        self.backend = backend
        self.max_batch, self.max_num_tokens, self.max_queue = max_batch, max_num_tokens, max_queue
        self.metrics = metrics or SchedulerMetrics()
        self.eos = frozenset(eos_ids(backend.config))
        self._free = list(range(max_batch - 1, -1, -1))
        self._active: list[_Seq] = []
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._lock = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._name = name
        self.steps = 0  # forwards run so far (tests read it)

    # -- intake (any thread) ------------------------------------------------------------------
    def check(self, req: GenRequest) -> None:
        """Refuse a request that can never run here, naming the limit (raises RequestError)."""
        V, T = self.backend.vocab_size, self.backend.max_seq_len
        p = req.params.validate(vocab_size=V)
        ids = np.asarray(req.input_ids).reshape(-1)
        if ids.size == 0:
            raise RequestError("input_ids is empty")
        if int(ids.min()) < 0 or int(ids.max()) >= V:
            raise RequestError(f"input_ids out of the vocabulary [0, {V})")
        if ids.size + p.max_tokens > T:
            raise RequestError(f"max_tokens={p.max_tokens}: prompt ({ids.size} tokens) + max_tokens exceeds the "
                               f"KV cache's max_seq_len={T} (the model's sequence limit here); ask for at most "
                               f"{max(T - ids.size, 0)} tokens")
        check_placeholders(ids, req.image_embeds, self.backend.config)

    def submit(self, req: GenRequest) -> None:
        """Queue ``req``; a refused or over-capacity request is answered with ``req.fail`` at once."""
        try:
            self.check(req)
            with self._lock:
                if self._stop:
                    raise RequestError("the llm step is shutting down")
                if len(self._waiting) >= len(self._free) + self.max_queue:
                    raise RequestError(SERVER_BUSY.format(queued=len(self._waiting), limit=self.max_queue))
                p = req.params
                gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
                eos = frozenset((p.end_id,)) if p.end_id is not None else self.eos
                self._waiting.append(_Seq(req, np.empty((0, 0), np.float32), eos, gen, time.monotonic()))
                self._lock.notify()
        except BaseException as exc:  # noqa: BLE001 - reported to the client
            _safe(req.fail, exc)

    @property
    def slots_used(self) -> int:
        return self.max_batch - len(self._free)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    # -- the loop -----------------------------------------------------------------------------
    def start(self) -> "BatchScheduler":
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the worker; requests still queued or active are told the server is stopping."""
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        for seq in list(self._active) + list(self._waiting):
            _safe(seq.req.fail, RequestError("the llm step is shutting down"))
        self._active.clear()
        self._waiting.clear()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._active and not self._waiting:
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except BaseException as exc:  # noqa: BLE001 - a failed forward fails its rows, not the worker
                traceback.print_exc()
                for seq in list(self._active):
                    self._leave(seq)
                    _safe(seq.req.fail, exc)

    def step(self) -> bool:
        """Admit, drop cancelled rows, run one batched forward, sample, retire. False if idle."""
        self._drop_cancelled()
        self._admit()
        if not self._active:
            self.metrics.step(0, 0, self.slots_used, 0)
            return False
        rows = list(self._active)
        B = len(rows)
        prefill = [s for s in rows if s.prefilling]
        chunk = max(1, self.max_num_tokens // B) if prefill else 1
        n = [min(s.embeds.shape[0] - s.pos, chunk) if s.prefilling else 1 for s in rows]
        S = max(n)
        T = self.backend.max_seq_len
        decoding = [s for s in rows if not s.prefilling]
        tok_embeds = (self.backend.embed(np.array([s.next_token for s in decoding], np.int64), None)
                      if decoding else None)
        D = (tok_embeds if tok_embeds is not None else rows[0].embeds).shape[-1]
        x = np.zeros((B, S, D), np.float32)
        pos = np.empty((B, S), np.int64)
        d = 0
        for r, (s, k) in enumerate(zip(rows, n)):
            if s.prefilling:
                x[r, :k] = s.embeds[s.pos:s.pos + k]
            else:
                x[r, 0] = tok_embeds[d]
                d += 1
            pos[r] = np.minimum(s.pos + np.arange(S), T - 1)
        t_len = min(T, -(-int((pos.max() + 1)) // 16) * 16)
        last = np.array(n, np.int64) - 1
        logits = self.backend.forward(x, pos, [s.slot for s in rows], last, t_len)
        self.steps += 1
        now = time.monotonic()
        out: list[tuple[_Seq, int, str | None]] = []  # (row, token, end reason or None)
        for r, (s, k) in enumerate(zip(rows, n)):
            s.pos += k
            if s.prefilling:
                continue  # mid-prompt: its logits predict nothing yet
            p = s.req.params
            tok = sample_next(torch.from_numpy(np.ascontiguousarray(logits[r], np.float32)),
                              temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, generator=s.gen)
            s.n_out += 1
            if s.n_out == 1:
                self.metrics.first_token(now - s.submitted)
            else:
                self.metrics.next_token(now - s.last_time)
            s.last_time = now
            end = "eos" if tok in s.eos else "length" if s.n_out >= p.max_tokens else None
            if end is None:
                s.next_token = tok
            else:
                self._leave(s)  # the slot is free before anyone hears of the end
            out.append((s, tok, end))
        # figures first, then the callbacks: a client that has its answer sees them up to date
        self.metrics.step(B, len(self._active), self.slots_used, len(out))
        for s, tok, end in out:
            try:
                s.req.emit(tok)
            except BaseException as exc:  # noqa: BLE001 - e.g. the client went away: free the slot
                self._leave(s)
                _safe(s.req.fail, exc)
                continue
            if end is not None:
                _safe(s.req.finish, end)
        return True

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and self._free:
                seq = self._waiting.popleft()
                seq.slot = self._free.pop()
                self._active.append(seq)
        for seq in [s for s in self._active if s.embeds.size == 0 and s.pos == 0]:
            try:
                seq.embeds = np.asarray(self.backend.embed(np.asarray(seq.req.input_ids, np.int64).reshape(-1),
                                                           seq.req.image_embeds), np.float32)
            except BaseException as exc:  # noqa: BLE001
                self._leave(seq)
                _safe(seq.req.fail, exc)

    def _drop_cancelled(self) -> None:
        with self._lock:
            seqs = list(self._waiting) + self._active
        gone = [s for s in seqs if _cancelled(s.req)]  # asks Triton (IPC): outside the lock
        with self._lock:
            for s in gone:
                if s in self._waiting:
                    self._waiting.remove(s)
        for s in gone:
            self._retire(s, "cancelled")

    def _leave(self, seq: _Seq) -> None:
        with self._lock:
            if seq in self._active:
                self._active.remove(seq)
                self._free.append(seq.slot)
            seq.slot = -1

    def _retire(self, seq: _Seq, reason: str) -> None:
        self._leave(seq)
        _safe(seq.req.finish, reason)


def _cancelled(req: GenRequest) -> bool:
    try:
        return bool(req.cancelled())
    except BaseException:  # noqa: BLE001 - a sender that cannot tell is a client that is gone
        return True


def _safe(fn, *args) -> None:
    try:
        fn(*args)
    except BaseException:  # noqa: BLE001 - never let one request kill the worker
        traceback.print_exc()


# -- backends -----------------------------------------------------------------------------------

class TorchBatchBackend:
    """The torch reference over a pool of ``slots`` cache rows, ``max_seq_len`` positions each."""

    def __init__(self, model, *, slots: int, max_seq_len: int):
        limit = model.config.text.max_position_embeddings
        if max_seq_len > limit:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings={limit}")
        self.model = model
        self.config = model.config
        self.vocab_size = model.config.text.vocab_size
        self.max_seq_len = max_seq_len
        self.pool = model.new_cache(slots, max_seq_len)

    @torch.no_grad()
    def embed(self, input_ids: np.ndarray, image_embeds: np.ndarray | None) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(input_ids, np.int64).reshape(1, -1))
        x = self.model.model.language_model.embed_tokens(ids)
        if image_embeds is not None and np.asarray(image_embeds).size:
            x = self.model.splice(x, ids, torch.from_numpy(np.asarray(image_embeds, np.float32)),
                                  self.config.image_token_id)
        return x[0].float().numpy()

    @torch.no_grad()
    def forward(self, x_BSD, pos_BS, slots, last_B, t_len) -> np.ndarray:
        idx = torch.tensor(slots)
        rows = StaticCache(layers=[LayerCache(
            k_BGTD=lc.k_BGTD[idx, :, :t_len], v_BGTD=lc.v_BGTD[idx, :, :t_len],
            idx_k_BTD=None if lc.idx_k_BTD is None else lc.idx_k_BTD[idx, :t_len]) for lc in self.pool.layers])
        dtype = self.model.lm_head.weight.dtype
        logits, rows = self.model(inputs_embeds=torch.from_numpy(x_BSD).to(dtype), cache=rows,
                                  position_ids=torch.from_numpy(pos_BS), logits_at=torch.from_numpy(last_B))
        for lc, new in zip(self.pool.layers, rows.layers):
            lc.k_BGTD[idx, :, :t_len] = new.k_BGTD
            lc.v_BGTD[idx, :, :t_len] = new.v_BGTD
            if lc.idx_k_BTD is not None:
                lc.idx_k_BTD[idx, :t_len] = new.idx_k_BTD
        return logits[:, 0].float().numpy()


class OnnxBatchBackend:
    """An ONNX export (``m3_trt.export.onnx.runtime.OnnxModel``) over a pool of ``slots`` cache rows.

    The export's caches are static (``max_seq_len`` positions), so the pool has that length and
    every step passes whole rows; its graphs take any batch size.
    """

    def __init__(self, onnx_model, *, slots: int):
        self.model = onnx_model
        self.config = onnx_model.config
        self.vocab_size = onnx_model.config.text.vocab_size
        self.max_seq_len = onnx_model.max_seq_len
        self.pool = onnx_model.new_cache(slots)

    def embed(self, input_ids: np.ndarray, image_embeds: np.ndarray | None) -> np.ndarray:
        ids = np.asarray(input_ids, np.int64).reshape(1, -1)
        embeds = None if image_embeds is None or not np.asarray(image_embeds).size else np.asarray(image_embeds)
        return np.asarray(self.model.embed(ids, embeds)[0], np.float32)

    def forward(self, x_BSD, pos_BS, slots, last_B, t_len) -> np.ndarray:
        idx = np.asarray(slots)
        caches = [[c[idx] for c in layer] for layer in self.pool]
        h = self.model.forward_embeds(x_BSD.astype(self.model.dtype), pos_BS, caches)
        for layer, new in zip(self.pool, caches):
            for c, n in zip(layer, new):
                c[idx] = n
        picked = h[np.arange(len(slots)), last_B][:, None]
        logits = self.model.head(picked)
        return np.asarray(logits[:, 0], np.float32)


def batch_backend(generator: TokenGenerator | OnnxTokenGenerator, *, slots: int, max_seq_len: int) -> Backend:
    """The batched backend over the model a :func:`~m3_trt.serving.pipeline.load_steps` generator holds.

    torch: a pool ``max_seq_len`` long (capped at the model's ``max_position_embeddings``);
    ONNX Runtime: the export's static ``max_seq_len``.
    """
    if isinstance(generator, TokenGenerator):
        limit = generator.model.config.text.max_position_embeddings
        return TorchBatchBackend(generator.model, slots=slots, max_seq_len=min(max_seq_len, limit))
    if isinstance(generator, OnnxTokenGenerator):
        return OnnxBatchBackend(generator.model, slots=slots)
    raise TypeError(f"no batched backend for {type(generator).__name__}")
