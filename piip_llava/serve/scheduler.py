"""Batched generation for concurrent chat requests (the API server and the Gradio demo).

One worker thread owns the model. Requests are queued as `Job`s; whenever the model is free, the worker takes the
oldest job and every queued job with the same sampling settings (greedy, or the same temperature/top_p), up to
`max_batch_size`, and runs them as ONE left-padded `generate()` call. Requests that arrive meanwhile wait for the
next batch (static batching: `generate()` cannot take new rows mid-flight). Beyond `max_queue` waiting jobs,
`submit` refuses at once (`QueueFullError`, HTTP 429 in the API).

Per row, a stopping criterion sees every new token id: it streams text deltas to the job (held back inside
byte-fallback runs and where a stop string could still begin), ends the row at its own `max_new_tokens`, at a stop
string (multi-token strings included), at EOS, or when the job is cancelled (a client that went away), and records
the generated token ids, so `usage` and `finish_reason` come from ids, not from re-tokenised text.
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
from transformers import StoppingCriteria

from .inference import ChatRequest, IncrementalText, InferenceEngine

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]


class QueueFullError(RuntimeError):
    """More jobs are waiting than the scheduler accepts."""


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's extension: always generate max_new_tokens (benchmarks)

    @property
    def batch_key(self) -> tuple:
        """Jobs that can share one `generate()` call (one sampling configuration)."""
        sampling = ("greedy",) if self.temperature <= 0 else ("sample", self.temperature, self.top_p)
        return (*sampling, self.ignore_eos)


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


class _RowStopper(StoppingCriteria):
    """Per-row bookkeeping of one batch: streams deltas and decides, row by row, when a row is finished."""

    def __init__(self, jobs: list[Job], engine: InferenceEngine, prompt_len: int, eos_ids: set[int]) -> None:
        self.jobs = jobs
        self.prompt_len = prompt_len
        self.eos_ids = eos_ids
        self.done = [False] * len(jobs)
        self.texts = [IncrementalText(engine.tokenizer, engine._byte_token_ids,
                                      [engine.template.stop_str, *j.params.stop]) for j in jobs]

    def _finish(self, i: int, reason: FinishReason) -> None:
        job, text = self.jobs[i], self.texts[i]
        self.done[i] = True
        tail = text.finish()
        if tail:
            job.emit("delta", tail)
        job.text, job.finish_reason = text.text, reason

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for i, job in enumerate(self.jobs):
            if self.done[i]:
                continue
            tok = int(last[i])
            job.token_ids.append(tok)
            if tok in self.eos_ids:
                self._finish(i, "stop")
                continue
            delta = self.texts[i].push(tok)
            if delta:
                job.emit("delta", delta)
            if self.texts[i].stopped:
                self._finish(i, "stop")
            elif len(job.token_ids) >= job.params.max_new_tokens:
                self._finish(i, "length")
            elif job.cancelled:
                self._finish(i, "cancelled")
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


class BatchScheduler:
    """Queue + worker thread running batched generation on `engine`."""

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
        self.busy = False
        self.batches_run = 0
        self.largest_batch = 0
        self.tokens_generated = 0  # over all rows, for /health and tests
        self._thread = threading.Thread(target=self._loop, name="piip-batch-scheduler", daemon=True)
        self._thread.start()

    # ---- producer side ----
    def submit(self, request: ChatRequest, params: GenerationParams,
               sink: Callable[[tuple[str, Any]], None] | None = None, prompt_ids: list[int] | None = None) -> Job:
        """Queue `request`; `prompt_ids` when the caller has already tokenised it (`engine.prompt_ids`)."""
        job = Job(request, params, sink)
        job.prompt_ids = prompt_ids if prompt_ids is not None else self.engine.prompt_ids(request)
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
        with self._cond:
            self._closed = True
            for job in self._pending:
                job.cancel()
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- worker side ----
    def _take_batch(self) -> list[Job]:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed and not self._pending:
                return []
        if self.batch_window_s > 0:
            time.sleep(self.batch_window_s)  # let requests sent together arrive together
        with self._cond:
            head = self._pending[0]
            batch = [j for j in self._pending if j.params.batch_key == head.params.batch_key][: self.max_batch_size]
            taken = {id(j) for j in batch}
            self._pending = [j for j in self._pending if id(j) not in taken]
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            live = []
            for job in batch:
                if job.cancelled:  # the client left while waiting
                    job.finish_reason = "cancelled"
                    job.emit("done", job)
                else:
                    live.append(job)
            if not live:
                continue
            self.busy = True
            try:
                self._run(live)
            except Exception as e:  # reported to each job; the worker keeps serving
                logger.exception("batched generation failed")
                for job in live:
                    job.emit("error", e)
            else:
                for job in live:
                    job.emit("done", job)
            finally:
                self.busy = False

    @torch.inference_mode()
    def _run(self, jobs: list[Job]) -> None:
        engine = self.engine
        inputs = engine.prepare([j.request for j in jobs], [j.prompt_ids for j in jobs])
        params = jobs[0].params
        longest = max(j.params.max_new_tokens for j in jobs)
        kwargs = engine._generation_kwargs(longest, params.temperature, params.top_p, None)
        eos_ids = set(kwargs["eos_token_id"])
        if params.ignore_eos:
            kwargs["min_new_tokens"] = longest  # EOS is suppressed until then; rows still end at their own limit
            eos_ids = set()
        stopper = _RowStopper(jobs, engine, inputs["input_ids"].shape[1], eos_ids)
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(jobs))
        try:
            with engine._lock:
                engine.model.generate(**inputs, stopping_criteria=[stopper], **kwargs)
        finally:
            self.tokens_generated += sum(len(j.token_ids) for j in jobs)
        for i, job in enumerate(jobs):  # rows the loop ended without the stopper (e.g. the context was full)
            if not stopper.done[i]:
                stopper._finish(i, "length")
