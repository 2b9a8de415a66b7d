"""Continuous batching: one decode loop per model steps every active stream together, one character a step.

Each `Stream` is one generation. The loop stacks the states of the streams that are ready, runs one batched
step off the event loop, samples one character per stream (each with its own parameters and generator), and
offers each stream its character. Streams join and leave between steps.

A stream may run `LOOKAHEAD` characters ahead of its client: while the model computes the next step, the
event loop sends the characters of the last one, so the two overlap. What the client was sent is tracked
apart from what was computed: the stream's committed state is always the one after its last *delivered*
character, and characters computed but not delivered when a client leaves are dropped, never stored.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from charrnn.model import State
from charrnn.sampling import sample_next

from app.metrics import Metrics
from app.registry import LoadedModel

log = logging.getLogger("charrnn")


@dataclass
class SamplingParams:
    temperature: float
    top_k: int | None
    top_p: float | None
    max_chars: int
    stop: list[str]


LOOKAHEAD = 2  # characters computed ahead of delivery, per stream
SMALL_BATCH = 8  # batches up to this size step with `small_batch_threads`


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
        self.pending: deque[tuple[Row, int]] = deque()  # stepped, not yet taken by the consumer
        self.text: list[str] = []
        self.finish_reason: str | None = None  # length | stop | cancelled | shutdown | error
        self.error: str | None = None
        self.decoder: Decoder | None = None
        self._waiter: asyncio.Future | None = None
        self._tail = ""  # the last characters, for stop strings
        self._tail_len = max((len(s) for s in params.stop), default=0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _wake_consumer(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def ready(self) -> bool:
        """Whether the next step may include this stream."""
        ahead = len(self.pending)
        return self.finish_reason is None and ahead < LOOKAHEAD and len(self.text) + ahead < self.params.max_chars

    @property
    def latest(self) -> tuple[Row, int]:
        """The state and input the next step continues from (the newest computed character)."""
        return self.pending[-1] if self.pending else (self.state, self.next_input)

    def offer(self, state: Row, char_id: int) -> None:
        self.pending.append((state, char_id))
        self._wake_consumer()

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error
        self._wake_consumer()
        if self.decoder is not None:
            self.decoder.wake()

    async def next_char(self) -> str | None:
        """The next character, or None once the stream has finished (see `finish_reason`)."""
        while not self.pending and self.finish_reason is None:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if self.finish_reason is not None:
            return None
        state, char_id = self.pending.popleft()
        self.state, self.next_input = state, char_id  # committed: this character is being delivered
        char = self.chars[char_id]
        self.text.append(char)
        if self._tail_len:
            self._tail = (self._tail + char)[-self._tail_len :]
        if len(self.text) >= self.params.max_chars:
            self.finish_reason = "length"
        elif self._tail_len and any(self._tail.endswith(s) for s in self.params.stop):
            self.finish_reason = "stop"
        elif self.decoder is not None:
            self.decoder.wake()
        return char


class Decoder:
    """The decode loop of one loaded model. Only this task calls the model's stepper."""

    def __init__(self, lm: LoadedModel, executor: Executor, metrics: Metrics, batching: bool = True,
                 threads: int = 1, small_batch_threads: int = 2):
        self.lm = lm
        self.threads, self.small_batch_threads = threads, small_batch_threads
        self.executor = executor
        self.metrics = metrics
        self.batching = batching
        self.streams: list[Stream] = []
        self.closing = False
        self._prime_queue: list[tuple[list[int], State | None, asyncio.Future]] = []
        self._priming = False
        self._wake = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"decoder-{lm.name}")

    def wake(self) -> None:
        self._wake.set()

    def add(self, stream: Stream) -> None:
        stream.decoder = self
        self.streams.append(stream)
        self.wake()

    async def prime(self, ids: list[int], state: State | None) -> State:
        """The state after reading `ids` from `state`. Primes that arrive while a priming pass runs are read
        together in the next pass, so a burst of new streams costs one batched pass, not one each."""
        future = asyncio.get_running_loop().create_future()
        self._prime_queue.append((ids, state, future))
        if not self._priming:
            self._start_priming()
        return await future

    def _start_priming(self) -> None:
        batch, self._prime_queue = self._prime_queue, []
        self._priming = True
        self.metrics.prime_batch_size.observe(len(batch))
        done = asyncio.get_running_loop().run_in_executor(
            self.executor, self.lm.prime_batch, [ids for ids, _, _ in batch], [state for _, state, _ in batch])

        def deliver(result: asyncio.Future) -> None:
            self._priming = False
            for i, (_, _, future) in enumerate(batch):
                if future.done():
                    continue  # the request was cancelled meanwhile
                if result.exception() is not None:
                    future.set_exception(result.exception())
                else:
                    future.set_result(result.result()[i])
            if self._prime_queue:
                self._start_priming()

        done.add_done_callback(deliver)

    def close(self) -> None:
        """Stop once the running streams are done (the model was replaced or removed)."""
        self.closing = True
        self.wake()

    @torch.inference_mode()
    def _step(self, group: list[Stream]) -> tuple[State, list[int]]:
        """Runs in the executor: one batched step and one sampled character per stream."""
        # Small batches are latency-bound and gain from a second thread; large ones leave a core to the
        # event loop that frames and sends the characters (docs/benchmarks.md).
        torch.set_num_threads(self.small_batch_threads if len(group) <= SMALL_BATCH else self.threads)
        latest = [s.latest for s in group]
        ids = torch.tensor([char_id for _, char_id in latest])
        rows = [row for row, _ in latest]
        first = rows[0].batch
        if all(r.batch is first and r.index == j for j, r in enumerate(rows)) and first[0].shape[1] == len(rows):
            state = first  # the same streams in the same order as the last step: nothing to stack
        else:
            state = tuple(torch.cat([r.batch[i][:, r.index : r.index + 1] for r in rows], dim=1)
                          for i in range(len(first)))
        logits, new_state = self.lm.stepper.step(ids, state)
        chosen = sample_next(
            logits,
            [s.params.temperature for s in group],
            [s.params.top_k for s in group],
            [s.params.top_p for s in group],
            [s.generator for s in group],
        ).tolist()
        return new_state, chosen

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.streams = [s for s in self.streams if not s.finished]
            ready = [s for s in self.streams if s.ready]
            if not ready:
                if self.closing and not self.streams:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(ready) < len(self.streams):
                # Consumers woken by the last step take their characters on the next loop ticks: let them,
                # so the streams step together instead of in ragged groups.
                for _ in range(2):
                    await asyncio.sleep(0)
                ready = [s for s in self.streams if s.ready]
            groups = [ready] if self.batching else [[s] for s in ready]
            for group in groups:
                self.metrics.decode_batch_size.observe(len(group))
                try:
                    new_state, chosen = await loop.run_in_executor(self.executor, self._step, group)
                except Exception as e:  # a failing step ends these streams, not the server
                    log.exception("decode step failed for model %s", self.lm.name)
                    for s in group:
                        s.finish("error", f"generation failed: {e}")
                    continue
                for j, (s, char_id) in enumerate(zip(group, chosen)):
                    if not s.finished:
                        s.offer(Row(new_state, j), char_id)
            await asyncio.sleep(0)  # let consumers run before looking for ready streams again


def seeded_generator(seed: int | None) -> random.Random:
    """The stream's own random source: seeded requests repeat, unseeded ones draw from the OS."""
    return random.Random(seed)
