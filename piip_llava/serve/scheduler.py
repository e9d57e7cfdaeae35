"""Continuous batching for concurrent chat requests (the API server and the Gradio demo).

One worker thread owns the model and runs a decode loop over the rows of one batch. Between two decode steps, jobs
that arrived meanwhile join it (up to `max_batch_size` rows): they are prefilled together (left-padded, with their
images), and their KV cache is left-padded to the running batch's length and appended to it; a finished row leaves
at once and frees its place. A request thus never waits for other requests' answers to end, only for the step in
flight. Beyond `max_queue` waiting jobs, `submit` refuses at once (`QueueFullError`, HTTP 429 in the API).

Each row has its own sampling settings (greedy, or temperature + top-p) and its own stopping: at its
`max_new_tokens`, at a stop string (multi-token strings included), at EOS, at the model's context, or when the job is
cancelled (a client that went away). Text deltas are streamed to the job as tokens arrive (held back inside
byte-fallback runs and where a stop string could still begin, see `IncrementalText`), and the generated token ids
are recorded, so `usage` and `finish_reason` come from ids, not from re-tokenised text.

The loop calls the model's forward directly rather than `generate()`, which cannot take new rows mid-flight.
Positions count real tokens only (as `prepare_inputs_for_generation` does), so a row's greedy answer is the one
`InferenceEngine.generate` gives it alone.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .inference import ChatRequest, IncrementalText, InferenceEngine

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]


class QueueFullError(RuntimeError):
    """More jobs are waiting than the scheduler accepts."""


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's extension: always generate max_new_tokens (benchmarks)


@dataclass
class Job:
    """One request in the scheduler. Events go to `sink` (default: the `events` queue): ("delta", str) while
    generating, then ("done", self) or ("error", exception)."""

    request: ChatRequest
    params: GenerationParams
    sink: Callable[[tuple[str, Any]], None] | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    token_ids: list[int] = field(default_factory=list)  # generated ids, the stop/EOS token included
    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_ids: list[int] = field(default_factory=list)  # tokenised once, when submitted
    pixel_values: torch.Tensor | None = None  # (1, 3, R, R), preprocessed when submitted
    submitted_at: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def emit(self, kind: str, value: Any) -> None:
        (self.sink or self.events.put)((kind, value))

    def cancel(self) -> None:
        """Stop generating for this job (its row ends at the next step; a waiting job is dropped)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def result(self, timeout: float | None = None) -> Job:
        """Block until done (only with the default sink); deltas are skipped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            kind, value = self.events.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            if kind == "done":
                return value
            if kind == "error":
                raise value


class _Row:
    """A running job's decoding state: its text, its stop ids, and what it suppresses."""

    __slots__ = ("context_left", "eos_ids", "job", "text")

    def __init__(self, job: Job, engine: InferenceEngine) -> None:
        self.job = job
        p = job.params
        self.text = IncrementalText(engine.tokenizer, engine._byte_token_ids, [engine.template.stop_str, *p.stop])
        self.eos_ids = engine._generation_kwargs(1, 0.0, 1.0, p.stop)["eos_token_id"]
        self.context_left = engine.max_context - job.prompt_tokens  # new tokens that still fit

    def push(self, tok: int) -> FinishReason | None:
        """Take the row's next token; stream its text; the reason the row ends here, if it does."""
        job = self.job
        job.token_ids.append(tok)
        n = len(job.token_ids)
        if tok in self.eos_ids and not job.params.ignore_eos:
            return "stop"
        delta = self.text.push(tok)
        if delta:
            job.emit("delta", delta)
        if self.text.stopped:
            return "stop"
        if n >= job.params.max_new_tokens or n >= self.context_left:
            return "length"
        if job.cancelled:
            return "cancelled"
        return None

    def finish(self, reason: FinishReason) -> None:
        tail = self.text.finish()
        if tail:
            self.job.emit("delta", tail)
        self.job.text, self.job.finish_reason = self.text.text, reason


class _SlackLayer(DynamicLayer):
    """A full-attention KV cache layer whose keys/values are views into buffers with room for `slack` more tokens,
    so a decode step writes its token in place: `DynamicLayer` concatenates, copying the whole (B, heads, L, head_dim)
    cache every step, which for a batch of rows costs more than the step's arithmetic."""

    slack = 64

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self._adopt(keys, values)

    def _adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        b, h, length, d = keys.shape
        self._k = keys.new_empty(b, h, length + self.slack, d)
        self._v = values.new_empty(b, h, length + self.slack, d)
        self._k[:, :, :length], self._v[:, :, :length] = keys, values
        self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        length, n = self.keys.shape[-2], key_states.shape[-2]
        if length + n > self._k.shape[-2]:
            self._adopt(self.keys, self.values)
        self._k[:, :, length:length + n], self._v[:, :, length:length + n] = key_states, value_states
        self.keys, self.values = self._k[:, :, :length + n], self._v[:, :, :length + n]
        return self.keys, self.values


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros before `t` along `dim` (a negative dim) up to `length`."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(t, pad)


class BatchScheduler:
    """Queue + worker thread running continuous batching on `engine`.

    `batch_window_s`: when the model is idle, how long the first arriving job waits for others sent with it, so that
    they are prefilled together (while the model is busy, arrivals gather during the step in flight anyway).
    """

    def __init__(self, engine: InferenceEngine, max_batch_size: int = 16, max_queue: int = 64,
                 batch_window_s: float = 0.002) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_window_s = batch_window_s
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self.busy = False  # a batch is running (or being admitted)
        self.batches_run = 0  # groups of jobs prefilled together
        self.largest_batch = 0  # most rows decoded in one step
        self.tokens_generated = 0  # over all rows, for /health and tests
        # the running batch: one row per job, all tensors in row order
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None  # (B, heads, L, head_dim) per layer, left-padded
        self._mask: torch.Tensor | None = None  # (B, L): 1 where the cache holds a real token
        self._next: torch.Tensor | None = None  # (B,) the token each row feeds into the next step
        self._pos: torch.Tensor | None = None  # (B,) its position (real tokens before it)
        self._thread = threading.Thread(target=self._loop, name="piip-batch-scheduler", daemon=True)
        self._thread.start()

    # ---- producer side ----
    def submit(self, request: ChatRequest, params: GenerationParams,
               sink: Callable[[tuple[str, Any]], None] | None = None, prompt_ids: list[int] | None = None) -> Job:
        """Queue `request`; `prompt_ids` when the caller has already tokenised it (`engine.prompt_ids`)."""
        job = Job(request, params, sink)
        job.prompt_ids = prompt_ids if prompt_ids is not None else self.engine.prompt_ids(request)
        job.pixel_values = self.engine.pixel_values(request)  # in the caller's thread, not the model's
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"{len(self._pending)} requests are waiting (the limit is {self.max_queue}); "
                                     "retry later")
            self._pending.append(job)
            self._cond.notify()
        return job

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._pending)

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking jobs; waiting and running ones end as cancelled."""
        with self._cond:
            self._closed = True
            for job in self._pending:
                job.cancel()
            for row in self._rows:
                row.job.cancel()
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- worker side ----
    def _take_joiners(self) -> list[Job] | None:
        """Jobs that join the batch now ([] if none); blocks while there is nothing to do; None once closed."""
        with self._cond:
            while not self._pending and not self._rows and not self._closed:
                self._cond.wait()
            if self._closed and not self._pending and not self._rows:
                return None
            idle = not self._rows
        if idle and self.batch_window_s > 0:
            time.sleep(self.batch_window_s)  # let requests sent together be prefilled together
        with self._cond:
            room = self.max_batch_size - len(self._rows)
            joiners, self._pending = self._pending[:room], self._pending[room:]
            self.busy = bool(joiners or self._rows)
        live = []
        for job in joiners:
            if job.cancelled:  # the client left while waiting
                job.finish_reason = "cancelled"
                job.emit("done", job)
            else:
                live.append(job)
        return live

    def _loop(self) -> None:
        while True:
            joiners = self._take_joiners()
            if joiners is None:
                return
            if joiners:
                try:
                    self._admit(joiners)
                except Exception as e:  # reported to the joiners; the running rows go on
                    logger.exception("prefill failed")
                    for job in joiners:
                        job.emit("error", e)
            if self._rows:
                try:
                    self._step()
                except Exception as e:  # reported to every running row; the worker keeps serving
                    logger.exception("decode step failed")
                    for row in self._rows:
                        row.job.emit("error", e)
                    self._reset()
            with self._cond:
                self.busy = bool(self._rows)

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._next, self._pos = [], None, None, None, None

    def _forward(self, **inputs: Any) -> torch.Tensor:
        """One model call on the cache; the last position's logits (B, V) in fp32."""
        with self.engine._lock:
            out = self.engine.model(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def _admit(self, jobs: list[Job]) -> None:
        """Prefill `jobs` together, take their first tokens, and append the unfinished ones to the batch."""
        engine = self.engine
        inputs = engine.prepare([j.request for j in jobs], [j.prompt_ids for j in jobs],
                                [j.pixel_values for j in jobs])
        mask = inputs["attention_mask"]
        cache = DynamicCache(config=engine.config.text_config)
        logits = self._forward(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache)
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise NotImplementedError(  # sliding-window or linear layers keep a cache that cannot be left-padded
                f"continuous batching needs full-attention KV caches; this LLM's cache has "
                f"{sorted({type(layer).__name__ for layer in cache.layers})}")
        cache.layers = [_SlackLayer(layer.keys, layer.values) for layer in cache.layers]
        rows = [_Row(j, engine) for j in jobs]
        self.batches_run += 1
        tokens = self._pick(logits, rows)
        keep = self._push(rows, tokens)
        if not keep:
            return
        idx = torch.tensor(keep)
        self._join([rows[i] for i in keep], cache, mask[idx], tokens[idx], mask.sum(-1)[idx], idx)

    def _join(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, nxt: torch.Tensor,
              pos: torch.Tensor, idx: torch.Tensor) -> None:
        """Append rows (their cache rows `idx`) to the running batch, left-padding whichever is shorter."""
        if len(idx) < len(cache.layers[0].keys):
            for layer in cache.layers:
                layer._adopt(layer.keys[idx], layer.values[idx])
        if not self._rows:
            self._rows, self._cache, self._mask, self._next, self._pos = rows, cache, mask, nxt, pos
        else:
            length = max(self._mask.shape[1], mask.shape[1])
            for old, new in zip(self._cache.layers, cache.layers):
                old._adopt(torch.cat([_left_pad(old.keys, length, -2), _left_pad(new.keys, length, -2)]),
                           torch.cat([_left_pad(old.values, length, -2), _left_pad(new.values, length, -2)]))
            self._mask = torch.cat([_left_pad(self._mask, length, -1), _left_pad(mask, length, -1)])
            self._next = torch.cat([self._next, nxt])
            self._pos = torch.cat([self._pos, pos])
            self._rows = self._rows + rows
        self.largest_batch = max(self.largest_batch, len(self._rows))

    @torch.inference_mode()
    def _step(self) -> None:
        """One decode step of every running row; finished rows leave the batch."""
        self._mask = F.pad(self._mask, (0, 1), value=1)
        logits = self._forward(input_ids=self._next[:, None], attention_mask=self._mask,
                               position_ids=self._pos[:, None], cache=self._cache)
        self._pos = self._pos + 1
        self._next = self._pick(logits, self._rows)
        keep = self._push(self._rows, self._next)
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset()
            return
        idx = torch.tensor(keep)
        mask = self._mask[idx]
        first = int(mask.any(0).int().argmax())  # columns that are padding in every remaining row go
        for layer in self._cache.layers:
            layer._adopt(layer.keys[idx, :, first:], layer.values[idx, :, first:])
        self._rows = [self._rows[i] for i in keep]
        self._mask, self._next, self._pos = mask[:, first:], self._next[idx], self._pos[idx]

    def _push(self, rows: list[_Row], tokens: torch.Tensor) -> list[int]:
        """Hand each row its token; finish the rows that end here; the indices of those that go on."""
        keep = []
        for i, (row, tok) in enumerate(zip(rows, tokens.tolist())):
            reason = row.push(tok)
            if reason is None:
                keep.append(i)
            else:
                row.finish(reason)
                row.job.emit("done", row.job)
        self.tokens_generated += len(rows)
        return keep

    @staticmethod
    def _pick(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Next token per row (B,): argmax for greedy rows, else a sample at the row's temperature and top-p. Rows
        with `ignore_eos` never get an EOS id."""
        suppress = [(i, t) for i, row in enumerate(rows) if row.job.params.ignore_eos for t in row.eos_ids]
        if suppress:
            logits[tuple(torch.tensor(suppress).T)] = float("-inf")
        tokens = logits.argmax(-1)
        sampled = [i for i, row in enumerate(rows) if row.job.params.temperature > 0]
        if not sampled:
            return tokens
        idx = torch.tensor(sampled)
        temperature = torch.tensor([rows[i].job.params.temperature for i in sampled])[:, None]
        top_p = torch.tensor([rows[i].job.params.top_p for i in sampled])[:, None]
        probs = torch.softmax(logits[idx] / temperature, -1)
        sorted_probs, order = probs.sort(-1, descending=True)
        # drop the tokens after the smallest set whose mass reaches top_p (the most likely one always stays)
        sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) >= top_p] = 0.0
        choice = torch.multinomial(sorted_probs, 1)
        tokens[idx] = order.gather(-1, choice)[:, 0]
        return tokens
