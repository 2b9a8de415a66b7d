"""The service object the routes talk to: registry, sessions, decoders, and the generation flow."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
import torch

from app.auth import Client
from app.decoder import Decoder, SamplingParams, Stream, seeded_generator
from app.errors import APIError, invalid
from app.failures import SessionGone
from app.metrics import Metrics
from app.quotas import Quotas
from app.registry import LoadedModel, Registry, ScanResult
from app.schemas import CharLogprobs, GenerateRequest, GenerateResult, InspectRequest, InspectResult, TopLogprob
from app.sessions import MemorySessionStore, Session, SessionStore, StatePool, new_session_id
from app.settings import Settings
from charrnn.activations import interesting_units, trace
from charrnn.engine import start_ids
from charrnn.sampling import BAN, REPETITION_WINDOW
from charrnn.vocab import UnknownCharactersError, shown

log = logging.getLogger("charrnn")


@dataclass
class Generation:
    """A started generation: the stream, its session, and what `done` will report."""

    stream: Stream
    session: Session
    lm: LoadedModel
    prime_chars: int
    started: float
    quota: str  # the client's generation slot (app/quotas.py)
    history: list[int]  # the last ids read before the first generated one (the session keeps them, and more)
    finalized: bool = False

    def result(self) -> GenerateResult:
        return GenerateResult(
            text="".join(self.stream.text),
            finish_reason=self.stream.finish_reason if self.stream.finish_reason in ("length", "stop") else "length",
            session_id=self.session.id,
            model=self.lm.name,
            prime_chars=self.prime_chars,
            generated_chars=len(self.stream.text),
            seconds=round(time.perf_counter() - self.started, 6),
            logprobs=None if self.stream.logprobs is None else [
                CharLogprobs(char=char, logprob=lp.logprob,
                             top_logprobs=[TopLogprob(char=c, logprob=x) for c, x in lp.top])
                for char, lp in zip(self.stream.text, self.stream.logprobs)],
        )


def make_session_store(settings: Settings, metrics: Metrics) -> SessionStore:
    if settings.session_store == "memory":
        return MemorySessionStore(settings.max_sessions, settings.session_ttl_s, metrics)
    from app.redis_store import RedisSessionStore

    return RedisSessionStore(settings.session_store, settings.session_ttl_s, settings.session_lock_ttl_s, metrics)


INSPECT_NICE = 10  # added to the inspect thread's nice value: contending for a CPU, it gets ~10% beside a decoder


def _loaded_libraries(name: str) -> list[str]:
    """Paths of the shared libraries this process has loaded whose file name contains `name` (Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    fields = (line.split(None, 5) for line in maps.splitlines())  # address perms offset dev inode path
    return sorted({f[5] for f in fields if len(f) == 6 and name in os.path.basename(f[5])})


def _start_inspect_thread() -> None:
    """Set up the inspect thread: one torch compute thread, and only the CPU time the decode loop leaves.

    Under OpenMP torch's thread count belongs to each thread, copied on its first torch call from the process
    default that app/main.py sets for the decode loop (CPUs - 1). `torch.set_num_threads(1)` here would also
    lower that default for decoders started later, so this sets the OpenMP count of this thread alone, in the
    libgomp torch loaded. The nice value is per thread on Linux; elsewhere it would apply to the whole process.
    Neither step may fail the thread: without them inspections still run, only less politely.
    """
    torch.get_num_threads()  # this thread's first torch call: it copies the process default now, not later
    try:
        for path in _loaded_libraries("libgomp"):
            ctypes.CDLL(path).omp_set_num_threads(1)
        if sys.platform == "linux":
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + INSPECT_NICE))
    except (OSError, AttributeError) as e:
        log.warning("inspect thread: could not limit its threads or priority: %s", e)
    log.debug("inspect thread: %d torch thread(s)", torch.get_num_threads())


def unknown_characters(lm: LoadedModel, what: str, text: str, hint: str = "") -> APIError:
    return APIError(422, "unknown_characters", f"{what} has characters not in the vocabulary of model {lm.name!r}: "
                                                f"{shown(lm.vocab.unknown(text))}{hint}")


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.registry = Registry(settings.model_store, settings.decode_precision)
        self.sessions = make_session_store(settings, self.metrics)
        self.quotas = Quotas(settings, self.metrics)
        # Loading checkpoints (rescans) runs here, off the event loop; steps and primes run in each model's
        # decode thread (app/decoder.py).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        # POST /inspect runs one at a time in its own thread (one torch thread, niced); at most
        # CHARRNN_INSPECT_QUEUE more wait their turn.
        self.inspector = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inspect",
                                            initializer=_start_inspect_thread)
        self.inspections = 0  # POST /inspect admitted: computing or waiting
        self.decoders: dict[str, Decoder] = {}  # by model file sha256
        self.pools: dict[str, StatePool] = {}  # session states, by model file sha256
        self.running = 0  # generations admitted and not yet finalized
        self.ready = False
        self.draining = False

    # --- models ---

    async def reload(self) -> ScanResult:
        """Rescan the model store, off the event loop."""
        result = await asyncio.get_running_loop().run_in_executor(self.executor, self.registry.scan)
        live = {lm.sha256 for lm in self.registry.models.values()}
        for sha, decoder in list(self.decoders.items()):
            if sha not in live:
                decoder.close()  # its running streams finish on the old weights
                del self.decoders[sha]
        for sha, pool in list(self.pools.items()):
            if sha not in live and pool.in_use == 0:
                del self.pools[sha]  # the last session of a replaced model is gone
        self.metrics.models_loaded.set(len(self.registry.models))
        self.ready = bool(self.registry.models)
        return result

    def default_model_name(self) -> str | None:
        if self.settings.default_model in self.registry.models:
            return self.settings.default_model
        return next(iter(sorted(self.registry.models)), None)

    def model_named(self, name: str | None) -> LoadedModel:
        """The model a request names (None: the default one), or a 404."""
        name = name or self.default_model_name()
        lm = self.registry.get(name) if name else None
        if lm is None:
            raise APIError(404, "model_not_found", f"no model named {name!r}; GET /models lists them")
        return lm

    def decoder_for(self, lm: LoadedModel) -> Decoder:
        decoder = self.decoders.get(lm.sha256)
        if decoder is None:
            decoder = Decoder(lm, self.metrics, self.settings.batching)
            self.decoders[lm.sha256] = decoder
        return decoder

    # --- generation ---

    def _check_limits(self, req: GenerateRequest) -> None:
        s = self.settings
        if len(req.prime) > s.max_prime_chars:
            raise invalid(f"prime has {len(req.prime)} characters; the limit is {s.max_prime_chars} "
                          "(CHARRNN_MAX_PRIME_CHARS)")
        if req.max_chars > s.max_chars:
            raise invalid(f"max_chars {req.max_chars} is above the limit of {s.max_chars} (CHARRNN_MAX_CHARS)")
        if not math.isfinite(req.temperature) or req.temperature > s.max_temperature:
            raise invalid(f"temperature {req.temperature} is above the limit of {s.max_temperature} "
                          "(CHARRNN_MAX_TEMPERATURE)")
        stops = req.stop or []
        if len(stops) > s.max_stop_strings:
            raise invalid(f"stop has {len(stops)} strings; the limit is {s.max_stop_strings} "
                          "(CHARRNN_MAX_STOP_STRINGS)")
        for stop in stops:
            if not stop:
                raise invalid("stop strings must not be empty")
            if len(stop) > s.max_stop_chars:
                raise invalid(f"a stop string has {len(stop)} characters; the limit is {s.max_stop_chars} "
                              "(CHARRNN_MAX_STOP_CHARS)")
        if req.repetition_window > s.max_repetition_window:
            raise invalid(f"repetition_window {req.repetition_window} is above the limit of "
                          f"{s.max_repetition_window} (CHARRNN_MAX_REPETITION_WINDOW)")

    @staticmethod
    def _logit_bias(req: GenerateRequest, lm: LoadedModel) -> dict[int, float] | None:
        """`logit_bias` by character id; 422 for characters the model does not know, or a bias that bans all."""
        if not req.logit_bias:
            return None
        keys = "".join(req.logit_bias)
        if lm.vocab.unknown(keys):
            raise unknown_characters(lm, "logit_bias", keys)
        bias = {lm.vocab.index[c]: b for c, b in req.logit_bias.items()}
        if sum(1 for b in bias.values() if b <= BAN) == len(lm.vocab):
            raise invalid(f"logit_bias bans every character of model {lm.name!r}: nothing is left to sample")
        return bias

    async def find_session(self, client: Client, session_id: str) -> Session | None:
        """The session, if it exists and belongs to the client's key: other keys' sessions look absent."""
        session = await self.sessions.get(session_id)
        if session is None or session.owner != client.owner:
            return None
        return session

    async def _take_slots(self, client: Client, new_session: bool) -> str:
        """Count the request against the server's and the client's limits; a quota token, or a 429."""
        if self.running >= self.settings.max_streams:
            raise APIError(429, "overloaded",
                           f"{self.running} generations are running, the limit (CHARRNN_MAX_STREAMS) is "
                           f"{self.settings.max_streams}; retry shortly", headers={"Retry-After": "1"})
        if new_session and (retry := await self.quotas.hit_session(client)) is not None:
            raise APIError(429, "too_many_sessions",
                           f"this client started too many sessions (CHARRNN_CLIENT_SESSIONS="
                           f"{self.settings.client_sessions}); continue one with session_id, or retry in {retry} s",
                           headers={"Retry-After": str(retry)})
        token = await self.quotas.start_stream(client)
        if token is None:
            raise APIError(429, "too_many_streams",
                           f"this client already has {self.settings.client_max_streams} generations running "
                           "(CHARRNN_CLIENT_MAX_STREAMS); retry when one ends", headers={"Retry-After": "1"})
        return token

    async def start(self, req: GenerateRequest, client: Client) -> Generation:
        """Validate everything, reserve a slot, prime the state and hand the stream to the model's decoder.

        Every refusal happens here, before a byte of the response is sent.
        """
        return (await self.start_many(req, client, 1))[0]

    async def start_many(self, req: GenerateRequest, client: Client, n: int) -> list[Generation]:
        """`n` generations from one prime (OpenAI's `n`): the prime is read once and its state copied into `n`
        streams, each a session of its own (choice 0 continues `req.session_id` if given; the others start new
        sessions from the same point). Choice 0 draws from `req.seed` exactly as a single generation does;
        choice j > 0 from a seed derived from it and j."""
        started = time.perf_counter()
        if self.draining:
            raise APIError(503, "shutting_down", "the server is shutting down; retry on another replica or later")
        if "max_chars" not in req.model_fields_set:  # the default (200) is clamped to a lower CHARRNN_MAX_CHARS
            req.max_chars = min(req.max_chars, self.settings.max_chars)
        if "repetition_window" not in req.model_fields_set:  # so is the default window
            req.repetition_window = min(req.repetition_window, self.settings.max_repetition_window)
        self._check_limits(req)

        session: Session | None = None
        if req.session_id is not None:
            session = await self.find_session(client, req.session_id)
            if session is None:
                raise APIError(404, "session_not_found",
                               f"no session {req.session_id!r}: it never existed, was deleted, or expired "
                               f"(idle sessions expire after CHARRNN_SESSION_TTL_S={self.settings.session_ttl_s:g} s)")
            if req.model is not None and req.model != session.model:
                raise APIError(409, "session_model_mismatch",
                               f"session {session.id} is bound to model {session.model!r}, not {req.model!r}")
            lm = self.registry.get(session.model)
            if lm is None or lm.sha256 != session.model_sha256:
                raise APIError(409, "model_changed",
                               f"model {session.model!r} was replaced or removed since this session started; "
                               "its state does not fit the new weights, so start a new session")
        else:
            lm = self.model_named(req.model)

        try:
            prime_ids = lm.vocab.encode(req.prime, skip_unknown=req.skip_unknown).tolist()
        except UnknownCharactersError:
            raise unknown_characters(lm, "prime", req.prime, "; send skip_unknown: true to drop them") from None
        logit_bias = self._logit_bias(req, lm)

        quotas: list[str] = []
        try:
            for j in range(n):
                quotas.append(await self._take_slots(client, new_session=session is None or j > 0))
            if session is not None and not await self.sessions.acquire(session):
                raise APIError(409, "session_busy", f"session {session.id} is already generating; one at a time")
        except SessionGone:
            for quota in quotas:
                await self.quotas.end_stream(quota)
            raise APIError(404, "session_not_found", f"session {req.session_id!r} was deleted or expired") from None
        except BaseException:
            for quota in quotas:
                await self.quotas.end_stream(quota)
            raise

        self.running += n
        sessions = [session] if session is not None else []
        try:
            if session is not None:
                ids, base = [session.next_input, *prime_ids], session.state
                history = [*(session.recent_ids() or [session.next_input]), *prime_ids]
            else:
                ids, base = start_ids(lm.vocab, prime_ids), None
                history = ids
            state = await self.decoder_for(lm).prime(ids[:-1], base)
            while len(sessions) < n:
                pool = self.pools.get(lm.sha256)
                if pool is None and self.sessions.keeps_states:
                    pool = self.pools[lm.sha256] = StatePool(state)
                new = Session.create(new_session_id(), lm.name, lm.sha256, pool, state, ids[-1], client.owner)
                await self.sessions.add(new)
                sessions.append(new)
        except BaseException:
            self.running -= n
            for quota in quotas:
                await self.quotas.end_stream(quota)
            for each in sessions:
                await self.sessions.save(each)  # releases it unchanged
            raise
        top_k = min(req.top_k, len(lm.vocab)) if req.top_k else None
        params = SamplingParams(req.temperature, top_k, req.top_p, req.max_chars, list(req.stop or []),
                                min_p=req.min_p, logit_bias=logit_bias, repetition_penalty=req.repetition_penalty,
                                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                repetition_window=req.repetition_window,
                                prime_tail=tuple(history[-req.repetition_window:]), logprobs=req.logprobs)
        history = history[-max(REPETITION_WINDOW, req.repetition_window):]
        generations = []
        for j, (each, quota) in enumerate(zip(sessions, quotas)):
            seed = req.seed if j == 0 or req.seed is None else f"{req.seed}/{j}"
            stream = Stream(state, ids[-1], params, seeded_generator(seed), lm.vocab.chars)
            self.decoder_for(lm).add(stream)
            self.metrics.streams_running.labels(model=lm.name).inc()
            generations.append(Generation(stream, each, lm, len(prime_ids), started, quota, history))
        return generations

    async def finalize(self, gen: Generation) -> None:
        """Store the session as of the last delivered character, and free the slot (idempotent)."""
        if gen.finalized:
            return
        gen.finalized = True
        stream = gen.stream
        if not stream.finished:
            stream.finish("cancelled")
        session = gen.session
        session.state = stream.state.materialize()  # a copy: the batch it lives in should not stay pinned
        session.next_input = stream.next_input
        session.generated_chars += len(stream.text)
        keep = max(REPETITION_WINDOW, stream.params.repetition_window)
        index = gen.lm.vocab.index
        session.remember([*gen.history, *(index[c] for c in stream.text[-keep:])][-keep:])
        self.running -= 1
        with anyio.CancelScope(shield=True):
            await self.quotas.end_stream(gen.quota)
        self.metrics.streams_running.labels(model=gen.lm.name).dec()
        self.metrics.generated_chars.labels(model=gen.lm.name).inc(len(stream.text))
        with anyio.CancelScope(shield=True):
            await self.sessions.save(session)

    # --- inspection ---

    async def inspect(self, req: InspectRequest) -> bytes:
        """Predictions and some units of one layer for every character of a text (the page's inspect view).

        The answer is JSON (an `InspectResult`), made in the inspect thread: its size grows with the units asked
        for, a number per character each, and neither building nor serialising it holds up the event loop.
        """
        s = self.settings
        limit = s.max_inspect_chars
        if len(req.text) > limit:
            raise invalid(f"text has {len(req.text)} characters; the limit is {limit} (CHARRNN_MAX_INSPECT_CHARS)")
        lm = self.model_named(req.model)
        cfg = lm.config
        layer = cfg.layers - 1 if req.layer is None else req.layer
        if layer >= cfg.layers:
            raise invalid(f"layer {layer} does not exist: model {lm.name!r} has layers 0..{cfg.layers - 1}")
        kind = req.kind or ("cell" if cfg.cell == "lstm" else "hidden")
        if kind == "cell" and cfg.cell != "lstm":
            raise invalid(f"model {lm.name!r} is a {cfg.cell.upper()}, which has no cell state; use kind 'hidden'")
        if req.units is not None:
            if len(req.units) > s.max_inspect_units:
                raise invalid(f"units has {len(req.units)} entries; the limit is {s.max_inspect_units} "
                              "(CHARRNN_MAX_INSPECT_UNITS)")
            missing = sorted({u for u in req.units if u >= cfg.hidden})
            if missing:
                raise invalid(f"no such units: {', '.join(map(str, missing[:10]))}; layer {layer} of model "
                              f"{lm.name!r} has units 0..{cfg.hidden - 1}")
        if lm.vocab.unknown(req.text):
            raise unknown_characters(lm, "text", req.text)
        ids = [lm.vocab.index[c] for c in req.text]
        if self.inspections > s.inspect_queue:
            raise APIError(429, "overloaded",
                           f"{self.inspections} inspections are computing or waiting: one computes at a time and "
                           f"at most {s.inspect_queue} wait (CHARRNN_INSPECT_QUEUE); retry shortly",
                           headers={"Retry-After": "1"})

        def run() -> bytes:
            t = trace(lm.engine, ids, layer, kind)
            suggestions = interesting_units(req.text, t.activations)
            shown = list(dict.fromkeys(req.units if req.units is not None else [x["unit"] for x in suggestions]))
            # float64 before rounding: a float32 0.123 prints as 0.12300000339746475
            rows = t.activations[:, shown].T.astype(np.float64).round(3)  # (units shown, T)
            predictions = None
            if req.predictions:
                chars = lm.vocab.chars
                predictions = [[{"char": chars[i], "p": round(p, 4)} for i, p in zip(row_ids, row_p)]
                               for row_ids, row_p in zip(t.top_ids.tolist(), t.top_probs.tolist())]
            result = InspectResult(model=lm.name, layer=layer, kind=kind, units=cfg.hidden,
                                   max_units=s.max_inspect_units, chars=list(req.text), predictions=predictions,
                                   units_shown=shown, activations=rows.tolist(), suggestions=suggestions)
            return result.model_dump_json().encode()

        loop = asyncio.get_running_loop()
        job = self.inspector.submit(run)
        self.inspections += 1  # until the job ends, or is cancelled while it waits
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._inspection_ended))
        return await asyncio.wrap_future(job)

    def _inspection_ended(self) -> None:
        self.inspections -= 1

    def begin_shutdown(self) -> None:
        """Stop admitting generations and end the open ones (each gets a final event)."""
        if self.draining:
            return
        self.draining = True
        self.ready = False
        for decoder in self.decoders.values():
            for stream in decoder.streams:
                stream.finish("shutdown", "the server is shutting down; continue this session later")
