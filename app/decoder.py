"""Continuous batching: one decode loop per model steps every active stream together, one character a step.

Each `Stream` is one generation. The loop stacks the states of the streams that are ready, runs one batched
step off the event loop, samples one character per stream (each with its own parameters and generator), and
offers each stream its character. Streams join and leave between steps.

A stream may run `LOOKAHEAD` characters ahead of its client: while the model computes the next step, the
event loop sends the characters of the last one, so the two overlap. With many streams, a consumer asks
for two characters at a time, so each write to the socket carries two events. What the client was sent is tracked
apart from what was computed: the stream's committed state is always the one after its last *delivered*
character, and characters computed but not delivered when a client leaves are dropped, never stored.

Primes are read by the same thread between steps, in slices (`Decoder._read_primes`); the engine gives every
row the same result whatever the batch and however a prime is cut, so neither affects any stream's text.

Repetition penalties look at a stream's `recent` window: the characters read and computed before each step,
computed-ahead ones included, kept by the decode thread. A step's window is therefore a function of the
stream's own text, never of when its client reads. A stream that asks for log-probabilities gets one
`CharLogprob` per delivered character in `Stream.logprobs`, parallel to `Stream.text`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import torch

from charrnn.model import State
from charrnn.sampling import REPETITION_WINDOW, chosen_and_top, sample_next

from app.metrics import Metrics
from app.registry import LoadedModel

log = logging.getLogger("charrnn")


@dataclass
class SamplingParams:
    """A stream's sampling parameters; charrnn/sampling.py says what each does."""

    temperature: float
    top_k: int | None
    top_p: float | None
    max_chars: int
    stop: list[str]
    min_p: float | None = None
    logit_bias: dict[int, float] | None = None  # character id -> bias; -100 bans
    repetition_penalty: float = 1.0  # vLLM/Hugging Face: 1 is off
    presence_penalty: float = 0.0  # OpenAI: 0 is off
    frequency_penalty: float = 0.0
    repetition_window: int = REPETITION_WINDOW  # how many recent characters the penalties count
    prime_tail: tuple[int, ...] = ()  # ids read before the first step (the prime's end): the first window
    logprobs: int | None = None  # None: none; k (0-5): the chosen character's and the k most likely

    @property
    def penalizes(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


class CharLogprob(NamedTuple):
    """A delivered character's log-probability under the model's own distribution (log_softmax of the raw
    logits, before temperature, penalties, bias and cuts) and the k most likely characters', most likely first."""

    logprob: float
    top: tuple[tuple[str, float], ...]


LOOKAHEAD = 3  # characters computed ahead of delivery, per stream
COALESCE_ABOVE = 16  # with more streams than this, characters go out two per write
STRAGGLER_WAIT_S = 0.001  # how long a step waits for streams whose client is a little behind
# Primes and running streams share the decode thread, as clients: each step earns the waiting primes as much
# time as it took, times (waiting primes / running streams) when that is more than one. Up to PRIME_BURST_S
# is kept, so a short prime after a quiet spell is read at once, while a client sending long primes back to
# back gets at most half the thread beside streams, never more than PRIME_BURST_S in one go
# (docs/benchmarks.md, "Long primes").
PRIME_BURST_S = 0.04
PRIME_IDLE_SLICE_S = 0.02  # with no stream running, primes are read in slices of about this long
MAX_PRIME_SLICE = 1024  # characters of each prime per slice, at most


@dataclass(frozen=True)
class Row:
    """One stream's state as a row of a batch state, so steps neither split nor (mostly) re-stack states."""

    batch: State  # tensors (layers, B, hidden)
    index: int

    def materialize(self) -> State:
        """A compact copy of this row, shape (layers, 1, hidden), that does not pin the batch."""
        return tuple(t[:, self.index : self.index + 1].clone() for t in self.batch)


class Stream:
    def __init__(self, state: State, next_input: int, params: SamplingParams, generator: random.Random,
                 vocab_chars: list[str]):
        self.state = Row(state, 0)  # committed: the state before `next_input`
        self.next_input = next_input
        self.params = params
        self.generator = generator
        self.chars = vocab_chars
        self.pending: deque[tuple[Row, int, CharLogprob | None]] = deque()  # stepped, not yet taken
        self.text: list[str] = []
        # per delivered character, parallel to `text`, when the request asked for logprobs; else None
        self.logprobs: list[CharLogprob] | None = [] if params.logprobs is not None else None
        # the characters before the next step to compute (decode thread only), when a penalty needs them
        self.recent: deque[int] | None = None
        if params.penalizes:
            self.recent = deque(params.prime_tail[-params.repetition_window:], maxlen=params.repetition_window)
        self.finish_reason: str | None = None  # length | stop | cancelled | shutdown | error
        self.error: str | None = None
        self.decoder: Decoder | None = None
        self.ahead = 0  # computed and not yet taken (guarded by the decoder's condition)
        self.computed: tuple[Row, int] = (self.state, next_input)  # newest computed (decode thread only)
        self._waiter: asyncio.Future | None = None
        self._want = 1  # characters the consumer is waiting for
        self._tail = ""  # the last characters, for stop strings
        self._tail_len = max((len(s) for s in params.stop), default=0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _wake_consumer(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def per_write(self) -> int:
        """Characters to send per write: two when many streams share the event loop, whose time then goes to
        socket writes; one otherwise, for the lowest latency."""
        return 2 if self.decoder is not None and len(self.decoder.streams) > COALESCE_ABOVE else 1

    @property
    def remaining(self) -> int:
        return max(1, self.params.max_chars - len(self.text))

    @property
    def ready(self) -> bool:
        """Whether the next step may include this stream (read under the decoder's condition)."""
        return (self.finish_reason is None and self.ahead < LOOKAHEAD
                and len(self.text) + self.ahead < self.params.max_chars)

    def offer(self, state: Row, char_id: int, logprob: CharLogprob | None = None) -> None:
        self.pending.append((state, char_id, logprob))
        if len(self.pending) >= self._want:
            self._wake_consumer()

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error
        self._wake_consumer()
        if self.decoder is not None:
            self.decoder.wake()

    async def next_char(self, wait_for: int = 1) -> str | None:
        """The next character, or None once the stream has finished (see `finish_reason`).

        `wait_for` > 1 first waits until that many characters are computed (or the stream cannot get them),
        so the caller can take them together and send them in one write.
        """
        self._want = min(wait_for, self.remaining)
        while self.finish_reason is None and len(self.pending) < self._want:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if self.finish_reason is not None or not self.pending:
            return None
        state, char_id, logprob = self.pending.popleft()
        self.state, self.next_input = state, char_id  # committed: this character is being delivered
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if self.decoder is not None:
            self.decoder.taken(self)
        char = self.chars[char_id]
        self.text.append(char)
        if self._tail_len:
            self._tail = (self._tail + char)[-self._tail_len :]
        if len(self.text) >= self.params.max_chars:
            self.finish_reason = "length"
        elif self._tail_len and any(self._tail.endswith(s) for s in self.params.stop):
            self.finish_reason = "stop"
        return char


@dataclass(eq=False)  # jobs are compared by identity
class PrimeJob:
    """A prime being read: `ids` from `state`, `done` characters so far; the result goes to `future`."""

    ids: list[int]
    state: State | None
    future: asyncio.Future
    done: int = 0


class Decoder:
    """The decode loop of one loaded model, in a thread of its own: only it calls the model's engine.

    The thread steps again as soon as streams are ready, without a round trip through the event loop, and
    hands each step's characters to the event loop with one `call_soon_threadsafe`. Between steps it reads
    primes in slices (all waiting primes together, a few characters of each), so a long prime delays the
    running streams by at most about one step's time per step, whatever its length. Slicing does not change
    a prime's result (the engine reads any cut the same), so a stream's text never depends on the load.
    """

    def __init__(self, lm: LoadedModel, metrics: Metrics, batching: bool = True):
        self.lm = lm
        self.metrics = metrics
        self.batching = batching
        self.streams: list[Stream] = []  # guarded by _cond
        self.closing = False
        self._primes: list[PrimeJob] = []  # guarded by _cond
        # measured seconds per character of a slice, by the number of primes read together (a power of two)
        self._prime_step_s: dict[int, float] = {}
        self._cond = threading.Condition()
        self._loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._run, name=f"decoder-{lm.name}", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def taken(self, stream: Stream) -> None:
        """The consumer took one character: the stream may be stepped again."""
        with self._cond:
            stream.ahead -= 1
            self._cond.notify()

    def add(self, stream: Stream) -> None:
        stream.decoder = self
        with self._cond:
            self.streams.append(stream)
            self._cond.notify()

    async def prime(self, ids: list[int], state: State | None) -> State:
        """The state after reading `ids` from `state` (None: zeros), read by the decode thread between steps."""
        future = self._loop.create_future()
        with self._cond:
            self._primes.append(PrimeJob(ids, state, future))
            self._cond.notify()
        return await future

    def close(self) -> None:
        """Stop once the running streams are done (the model was replaced or removed)."""
        with self._cond:
            self.closing = True
            self._cond.notify()

    @torch.inference_mode()
    def _step(self, group: list[Stream]) -> tuple[State, list[int], list[CharLogprob | None]]:
        """Runs in the decode thread: one batched step and one sampled character per stream (with its
        log-probabilities, for the streams that asked)."""
        latest = [s.computed for s in group]
        ids = torch.tensor([char_id for _, char_id in latest])
        rows = [row for row, _ in latest]
        first = rows[0].batch
        if all(r.batch is first and r.index == j for j, r in enumerate(rows)) and first[0].shape[1] == len(rows):
            state = first  # the same streams in the same order as the last step: nothing to stack
        else:
            state = tuple(torch.cat([r.batch[i][:, r.index : r.index + 1] for r in rows], dim=1)
                          for i in range(len(first)))
        logits, new_state = self.lm.engine.step(ids, state)
        params = [s.params for s in group]
        controls = {}  # only what some stream uses: a batch without them samples exactly as before they existed
        if any(p.min_p for p in params):
            controls["min_p"] = [p.min_p for p in params]
        if any(p.logit_bias for p in params):
            controls["logit_bias"] = [p.logit_bias for p in params]
        if any(s.recent is not None for s in group):
            controls.update(recent=[s.recent for s in group],
                            repetition_penalty=[p.repetition_penalty for p in params],
                            presence_penalty=[p.presence_penalty for p in params],
                            frequency_penalty=[p.frequency_penalty for p in params])
        chosen_ids = sample_next(
            logits,
            [p.temperature for p in params],
            [p.top_k for p in params],
            [p.top_p for p in params],
            [s.generator for s in group],
            **controls,
        )
        chosen = chosen_ids.tolist()
        for s, char_id in zip(group, chosen):
            if s.recent is not None:
                s.recent.append(char_id)  # the window of this stream's next step
        return new_state, chosen, self._logprobs(group, logits, chosen_ids)

    @staticmethod
    def _logprobs(group: list[Stream], logits: torch.Tensor, chosen: torch.Tensor) -> list[CharLogprob | None]:
        """The model's log-probabilities for the streams that asked (nothing is computed for the others)."""
        rows = [j for j, s in enumerate(group) if s.params.logprobs is not None]
        out: list[CharLogprob | None] = [None] * len(group)
        if not rows:
            return out
        k = max(group[j].params.logprobs for j in rows)
        index = torch.tensor(rows)
        mine, top, top_ids = chosen_and_top(torch.log_softmax(logits[index].float(), dim=-1), chosen[index], k)
        for j, lp, values, ids in zip(rows, mine.tolist(), top.tolist(), top_ids.tolist()):
            s = group[j]
            n = s.params.logprobs
            out[j] = CharLogprob(lp, tuple((s.chars[i], v) for i, v in zip(ids[:n], values[:n])))
        return out

    def _read_primes(self, budget_s: float) -> float:
        """In the decode thread: read the next slice of every waiting prime, sized to take about `budget_s`
        (at least one character). Returns the seconds it took."""
        with self._cond:
            self._primes = [job for job in self._primes if not job.future.done()]  # done: the request left
            jobs = list(self._primes)  # primes that arrive meanwhile wait for the next slice
        if not jobs:
            return 0.0
        rows = 1 << (len(jobs) - 1).bit_length()
        per_char = self._prime_step_s.get(rows, 1e-3 * rows)
        chars = max(1, min(MAX_PRIME_SLICE, int(budget_s / per_char)))
        pieces = [job.ids[job.done : job.done + chars] for job in jobs]
        self.metrics.prime_batch_size.observe(len(jobs))
        started = time.perf_counter()
        try:
            states, _ = self.lm.engine.read(pieces, [job.state for job in jobs])
        except Exception as e:
            log.exception("priming failed for model %s", self.lm.name)
            finished, error = jobs, e
        else:
            error = None
            longest = max(len(p) for p in pieces)
            if longest:  # seconds per character at this many primes, for the next slice's size
                self._prime_step_s[rows] = 0.5 * per_char + 0.5 * (time.perf_counter() - started) / longest
            for job, state, piece in zip(jobs, states, pieces):
                job.state, job.done = state, job.done + len(piece)
            finished = [job for job in jobs if job.done >= len(job.ids)]
        with self._cond:
            self._primes = [job for job in self._primes if job not in finished]

        def deliver() -> None:
            for job in finished:
                if job.future.done():
                    continue  # the request was cancelled meanwhile
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(job.state)

        self._loop.call_soon_threadsafe(deliver)
        return time.perf_counter() - started

    def _next_group(self) -> list[Stream] | None:
        """Wait for ready streams or primes (None: closed and idle). An empty list: only primes are waiting.
        Gives stragglers a moment so streams step together."""
        with self._cond:
            while True:
                self.streams = [s for s in self.streams if not s.finished]
                ready = [s for s in self.streams if s.ready]
                if ready and len(ready) < len(self.streams) and not self._primes:
                    # Consumers take their characters a few microseconds apart: wait briefly for the rest.
                    deadline = time.monotonic() + STRAGGLER_WAIT_S
                    while len(ready) < len(self.streams) and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)
                        self.streams = [s for s in self.streams if not s.finished]
                        ready = [s for s in self.streams if s.ready]
                if ready:
                    for s in ready:
                        s.ahead += 1
                    return ready
                if self._primes:
                    return []
                if self.closing and not self.streams:
                    return None
                self._cond.wait()

    def _run(self) -> None:
        credit = PRIME_BURST_S  # decode-thread time primes may take while streams run (see PRIME_BURST_S)
        while (ready := self._next_group()) is not None:
            if ready:
                started = time.perf_counter()
                groups = [ready] if self.batching else [[s] for s in ready]
                for group in groups:
                    self.metrics.decode_batch_size.observe(len(group))
                    try:
                        new_state, chosen, logprobs = self._step(group)
                    except Exception as e:  # a failing step ends these streams, not the server
                        log.exception("decode step failed for model %s", self.lm.name)
                        self._loop.call_soon_threadsafe(self._fail, group, f"generation failed: {e}")
                        continue
                    for j, (s, char_id) in enumerate(zip(group, chosen)):
                        s.computed = (Row(new_state, j), char_id)
                    self._loop.call_soon_threadsafe(self._deliver, group, new_state, chosen, logprobs)
                share = max(1.0, len(self._primes) / len(self.streams))  # clients waiting for a prime vs streaming
                credit = min(PRIME_BURST_S, credit + share * (time.perf_counter() - started))
            if not self._primes:
                continue
            if self.streams:  # share the thread: at most the credit (at least one character), then step again
                credit = max(0.0, credit - self._read_primes(credit))
            else:
                credit = PRIME_BURST_S
                self._read_primes(PRIME_IDLE_SLICE_S)

    @staticmethod
    def _deliver(group: list[Stream], new_state: State, chosen: list[int],
                 logprobs: list[CharLogprob | None]) -> None:
        for j, (s, char_id, logprob) in enumerate(zip(group, chosen, logprobs)):
            if not s.finished:
                s.offer(Row(new_state, j), char_id, logprob)

    @staticmethod
    def _fail(group: list[Stream], message: str) -> None:
        for s in group:
            s.finish("error", message)


def seeded_generator(seed: int | str | None) -> random.Random:
    """The stream's own random source: seeded requests repeat, unseeded ones draw from the OS."""
    return random.Random(seed)
