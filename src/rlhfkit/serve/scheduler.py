"""The server's scheduler: one thread owns the model and runs continuous batching over every request.

Requests come in from the event loop (`Scheduler.submit`), wait in a bounded queue, and join the running
batch (`rollout.continuous.DecodeBatch`) at the next decode step while it has room for all their `n`
choices (`max_batch` rows); each choice leaves as soon as it ends (EOS, a stop string, its `max_tokens`)
or its request is cancelled (the client went away). Every step posts each request the text its choices
gained (`Delta`), and `Done` at the end; the event loop reads them from the job's asyncio queue.

Over capacity (the batch's `max_batch` rows and the queue's `max_queue` rows taken) `submit` raises
`Overloaded` with a Retry-After estimate:
the recent time one request takes, halved (about when a row frees up). An exception while stepping (a bug,
out of memory) fails the requests in flight with a server error and the scheduler carries on with a fresh
batch: one bad request never takes the server down.

Seeds: each choice samples with its own generator, seeded from (seed, choice index) when the request has a
seed, so the same request with the same seed gets the same answers whatever else runs (up to the float
rounding of batched matmuls, as in vLLM).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from rlhfkit.rollout.continuous import DecodeBatch
from rlhfkit.rollout.engine import RolloutEngine, SamplingConfig
from rlhfkit.serve.text import TextStream

log = logging.getLogger("rlhfkit.serve")


class Overloaded(Exception):
    """The queue is full; try again in `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is at capacity; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Request:
    """What to sample: `n` answers to one prompt."""

    prompt: list[int]
    sampling: SamplingConfig  # max_new_tokens is the request's max_tokens
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: each token's log-prob and the k most likely
    strip: bool = True  # the decoding rule's whitespace strip (chat); False: the raw continuation


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token (its text, EOS included as written), its log-prob under the model's distribution
    (temperature 1, before top-p: vLLM's raw log-probs) and the most likely tokens at that step."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Delta:
    """What one choice gained in one step."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" on its last delta


@dataclass(frozen=True)
class Done:
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


Event = list[Delta] | Done | Failed


class Job:
    """One submitted request: its choices' state (scheduler thread) and the asyncio queue its events go to
    as (job, event) pairs (the event loop's; several jobs of one HTTP request share one)."""

    def __init__(self, request: Request, events: asyncio.Queue[tuple[Job, Event]], number: int) -> None:
        self.request, self.events, self.number = request, events, number
        self.loop = asyncio.get_running_loop()
        self.cancelled = False  # set from the event loop; the scheduler drops the rows at its next step
        self.streams: list[TextStream] = []
        self.finished = [False] * request.n
        self.tokens = 0
        self.started = time.monotonic()

    def cancel(self) -> None:
        self.cancelled = True

    def post(self, item: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self, item))


def choice_generator(seed: int | None, index: int) -> torch.Generator:
    """The generator of one choice: from (seed, index) when seeded, else from fresh randomness."""
    if seed is None:
        return torch.Generator().manual_seed(secrets.randbits(63))
    return torch.Generator().manual_seed(random.Random(f"{seed}:{index}").getrandbits(63))


class Scheduler:
    """Continuous batching over one engine in a thread of its own (see the module docstring)."""

    def __init__(self, engine: RolloutEngine, max_batch: int = 32, max_queue: int = 128) -> None:
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.tokenizer_lock = threading.Lock()  # the tokenizer is shared with the request handlers
        self.batch = DecodeBatch(engine)
        self.jobs: dict[tuple[int, int], Job] = {}  # running row key (job number, choice) -> job
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.numbers = itertools.count()
        self.seconds_per_request = 1.0  # moving average, for Retry-After
        self.peak = 0  # most rows decoded together so far
        self.cancelled = 0  # rows dropped unfinished because their client went away
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="rlhfkit-scheduler", daemon=True)
        self.eos = set(engine.eos_token_ids)

    # ---------------------------------------------------------------------------- event-loop side
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=30)

    def submit(self, request: Request, events: asyncio.Queue[tuple[Job, Event]]) -> Job:
        """Queue a request whose events go to `events` (raises Overloaded when it does not fit in the batch
        and the queue)."""
        job = Job(request, events, next(self.numbers))
        with self.cond:
            queued = sum(j.request.n for j in self.waiting)
            if len(self.jobs) + queued + request.n > self.max_batch + self.max_queue:
                raise Overloaded(max(1, min(60, math.ceil(self.seconds_per_request / 2))))
            self.waiting.append(job)
            self.cond.notify()
        return job

    def stats(self) -> dict[str, Any]:
        with self.cond:
            waiting = sum(j.request.n for j in self.waiting)
            return {"running": len(self.jobs), "waiting": waiting, "peak_running": self.peak,
                    "cancelled": self.cancelled}  # fmt: skip

    # ---------------------------------------------------------------------------- scheduler thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not self.jobs:
                    self.cond.wait()
                if self.stopping:
                    return
                admitted = self._admit()
            try:
                self._step(admitted)
            except Exception:  # a bug or out of memory: fail what is in flight, keep serving
                log.exception("generation failed")
                for job in {*self.jobs.values(), *admitted}:
                    job.post(Failed("generation failed on the server; see its log"))
                with self.cond:
                    self.jobs.clear()
                self.batch = DecodeBatch(self.engine)

    def _admit(self) -> list[Job]:
        """Take waiting requests while the batch has room for all their choices (called under the lock)."""
        admitted: list[Job] = []
        room = self.max_batch - len(self.jobs)
        while self.waiting and (self.waiting[0].cancelled or self.waiting[0].request.n <= room):
            job = self.waiting.popleft()
            if not job.cancelled:
                admitted.append(job)
                room -= job.request.n
                self.jobs.update({(job.number, i): job for i in range(job.request.n)})
        self.peak = max(self.peak, len(self.jobs))
        return admitted

    def _step(self, admitted: list[Job]) -> None:
        gone = [key for key, job in self.jobs.items() if job.cancelled]
        if gone:
            self.batch.remove(gone)
            with self.cond:
                for key in gone:
                    self.jobs.pop(key)
                self.cancelled += len(gone)
        if admitted:
            self._join(admitted)
        if not len(self.batch):
            return
        logits = self.batch.logits
        assert logits is not None  # the batch has running rows
        running = cast("list[tuple[int, int]]", self.batch.keys)  # as `_join` gives: (job number, choice)
        tokens, _ = self.batch.sample()  # (b,)
        wanted = [i for i, key in enumerate(running) if self.jobs[key].request.logprobs is not None]
        logprobs = logits[wanted].log_softmax(-1) if wanted else None  # (w, V)
        deltas: dict[Job, list[Delta]] = {}
        keep = []
        for i, (key, token) in enumerate(zip(running, tokens.tolist(), strict=True)):
            job, index = self.jobs[key], key[1]
            stream = job.streams[index]
            with self.tokenizer_lock:
                text = stream.push(token)
            ended = token in self.eos and job.request.sampling.stop_at_eos
            finish = "stop" if ended or stream.stopped else None
            if finish is None and len(stream.ids) >= job.request.sampling.max_new_tokens:
                finish = "length"
            if finish is not None and not stream.stopped:
                with self.tokenizer_lock:
                    text += stream.finish()
            delta = Delta(index, text, finish_reason=finish)
            if logprobs is not None and i in wanted:
                k = job.request.logprobs
                assert k is not None  # `wanted` holds the rows whose request asks for log-probs
                delta.logprobs.append(self._logprob(logprobs[wanted.index(i)], token, k))
            deltas.setdefault(job, []).append(delta)
            job.tokens += 1
            keep.append(finish is None)
            if finish is not None:
                job.finished[index] = True
        self.batch.advance(tokens, keep)
        with self.cond:
            for key in [key for key, job in self.jobs.items() if job.finished[key[1]]]:
                self.jobs.pop(key)
        for job, items in deltas.items():
            job.post(items)
            if all(job.finished):
                job.post(Done(job.tokens))
                took = time.monotonic() - job.started
                self.seconds_per_request = 0.9 * self.seconds_per_request + 0.1 * took

    def _join(self, admitted: list[Job]) -> None:
        """Prefill the admitted requests' choices into the batch."""
        keys, prompts, configs, generators = [], [], [], []
        for job in admitted:
            r = job.request
            job.streams = [TextStream(self._decode, r.stop, r.strip) for _ in range(r.n)]
            for i in range(r.n):
                keys.append((job.number, i))
                prompts.append(r.prompt)
                configs.append(r.sampling)
                generators.append(choice_generator(r.seed, i))
        if not self.batch.add(keys, prompts, configs, generators):  # this model's cache cannot take joins
            while len(self.batch):  # so the running rows finish first
                self._step([])
            if any(not job.cancelled for job in admitted):
                self._join([job for job in admitted if not job.cancelled])  # an empty batch takes them

    def _decode(self, ids: list[int]) -> str:
        return self.engine.decode_ids(ids, strip=False)

    def _logprob(self, logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
        """The sampled token's entry from one row's log-softmax (V,) with the k most likely tokens."""
        tok = self.engine.tokenizer
        with self.tokenizer_lock:
            top = []
            if k:
                values, ids = logprobs.topk(k)  # (k,), (k,)
                top = [
                    (tok.decode([t]), float(v)) for t, v in zip(ids.tolist(), values.tolist(), strict=True)
                ]
            return TokenLogprob(tok.decode([token]), float(logprobs[token]), top)
