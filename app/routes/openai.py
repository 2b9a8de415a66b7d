"""OpenAI-compatible routes: `POST /v1/completions`, `GET /v1/models`, `GET /v1/models/{id}`.

The legacy completions API as vLLM serves it, so the `openai` SDK, LangChain and curl scripts written for
vLLM or llama.cpp talk to the service as they are. Generations run through the same service as
`POST /generate`: the same decoder, sessions, limits and metrics; with the same seed choice 0 is the same
text. Each choice is a session, named in `choices[i].session_id`, that `/generate` or another completion
(`session_id`) continues. Errors come in OpenAI's envelope (app/errors.py, for every path under /v1/).
"""

from __future__ import annotations

import asyncio
import calendar
import json
import secrets
import time
from collections.abc import AsyncIterator

import anyio
import torch
from fastapi import APIRouter, Path, Request, Response

from app.auth import Client
from app.errors import APIError
from app.openai_schemas import (Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, ModelCard,
                                ModelCards, OpenAIError, Usage)
from app.registry import LoadedModel
from app.routes.deps import ClientDep, ServiceDep
from app.schemas import MAX_MODEL_NAME, MODEL_NAME_PATTERN, GenerateRequest
from app.service import Generation, Service, unknown_characters
from app.sse import event_response
from charrnn.sampling import chosen_and_top

router = APIRouter(prefix="/v1", tags=["openai"])

ERRORS = {status: {"model": OpenAIError, "description": description} for status, description in {
    400: "Invalid parameters (OpenAI's `invalid_request_error`), characters not in the vocabulary.",
    404: "Unknown model or session.",
    409: "Session busy, or its model changed.",
    429: "Too many generations running (Retry-After given).",
    503: "Shutting down.",
}.items()}

STREAM_DOC = """\
`stream: true` answers `text/event-stream` of unnamed events: each `data:` is a Completion chunk with one
choice and the characters computed since the last chunk (one or more), the last chunk of a choice has its
`finish_reason`; with `stream_options.include_usage` a chunk with `usage` and no choices follows; then
`data: [DONE]`.
"""


def _card(lm: LoadedModel) -> ModelCard:
    created = lm.info.training.get("created")
    try:
        stamp = calendar.timegm(time.strptime(created[:19], "%Y-%m-%dT%H:%M:%S")) if created else 0  # UTC
    except ValueError:
        stamp = 0
    return ModelCard(id=lm.name, created=stamp)


@router.get("/models", response_model=ModelCards)
async def list_models(service: ServiceDep) -> ModelCards:
    return ModelCards(data=[_card(lm) for _, lm in sorted(service.registry.models.items())])


@router.get("/models/{model}", response_model=ModelCard, responses={404: ERRORS[404]})
async def get_model(service: ServiceDep,
                    model: str = Path(pattern=MODEL_NAME_PATTERN, max_length=MAX_MODEL_NAME)) -> ModelCard:
    lm = service.registry.get(model)
    if lm is None:
        raise APIError(404, "model_not_found", f"the model {model!r} does not exist; GET /v1/models lists them")
    return _card(lm)


class InvalidParam(APIError):
    """A 400 that names the parameter, as OpenAI's `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(400, "invalid_request", message)
        self.param = param


class Choice:
    """One choice as it is sent: its text (without the stop string) and log-probabilities."""

    def __init__(self, index: int, gen: Generation | None, prefix: str, logprobs: int | None, stops: list[str]):
        self.index, self.gen, self.logprobs, self.stops = index, gen, logprobs, stops
        self.text = prefix  # the echoed prompt, if asked
        self.sent = 0  # characters of `text` already sent (streaming)
        # with `logprobs`: one entry per character of `text`, so a character's index is its offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        # The last characters may be (part of) a stop string, which is not sent: held until the choice ends.
        self.hold = max((len(s) for s in stops), default=0)

    def add(self, char: str, logprob: float | None = None, top: dict[str, float] | None = None) -> None:
        self.text += char
        if self.logprobs is not None:
            self.tokens.append(char)
            self.token_logprobs.append(logprob)
            self.top_logprobs.append(top)

    def finished_text(self) -> str:
        """The text with a stop string that ended it cut off, as OpenAI returns it."""
        if self.gen is not None and self.gen.stream.finish_reason == "stop":
            for stop in self.stops:
                if self.text.endswith(stop):
                    return self.text[: len(self.text) - len(stop)]
        return self.text

    def payload(self, upto: int, start: int = 0) -> CompletionLogprobs | None:
        if self.logprobs is None:
            return None
        return CompletionLogprobs(tokens=self.tokens[start:upto], token_logprobs=self.token_logprobs[start:upto],
                                  top_logprobs=self.top_logprobs[start:upto],
                                  text_offset=list(range(start, min(upto, len(self.tokens)))))

    @property
    def finish_reason(self) -> str | None:
        if self.gen is None:
            return "length"
        reason = self.gen.stream.finish_reason
        return reason if reason in ("length", "stop") else None


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _max_tokens(req: CompletionRequest) -> int:
    return 16 if req.max_tokens is None else req.max_tokens


def _generate_request(req: CompletionRequest, prompt: str) -> GenerateRequest:
    top_k = None if req.top_k in (None, -1, 0) else req.top_k
    return GenerateRequest(
        prime=prompt, temperature=req.temperature if req.temperature is not None else 1.0,
        max_chars=_max_tokens(req), model=req.model, session_id=req.session_id, seed=req.seed,
        top_k=top_k, top_p=None if req.top_p in (None, 1.0) else req.top_p, stop=_stops(req.stop) or None,
        logprobs=req.logprobs, min_p=req.min_p, logit_bias=req.logit_bias or None,
        repetition_penalty=req.repetition_penalty or 1.0, presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0)


def _check(service: Service, req: CompletionRequest) -> list[str]:
    """What the native API would refuse with its own field names, refused here with OpenAI's."""
    settings = service.settings
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    n = req.n or 1
    if not prompts:
        raise InvalidParam("prompt", "prompt: give a string or a non-empty list of strings")
    if n > settings.max_n or len(prompts) > settings.max_n:
        raise InvalidParam("n", f"{len(prompts)} prompts and n {n}: each may be at most {settings.max_n} "
                           "(CHARRNN_MAX_N)")
    # every choice is a generation running at once: more than a limit allows could never start, so no 429
    for limit, name in ((settings.client_max_streams, "CHARRNN_CLIENT_MAX_STREAMS"),
                        (settings.max_streams, "CHARRNN_MAX_STREAMS")):
        if limit and len(prompts) * n > limit:
            raise InvalidParam("n", f"{len(prompts)} prompts and n {n} are {len(prompts) * n} generations at once; "
                               f"at most {limit} may run at once ({name}): ask for fewer")
    if (longest := max(len(p) for p in prompts)) > settings.max_prime_chars:
        raise InvalidParam("prompt", f"the prompt has {longest} characters; the limit is "
                           f"{settings.max_prime_chars} (CHARRNN_MAX_PRIME_CHARS)")
    if _max_tokens(req) > settings.max_chars:
        raise InvalidParam("max_tokens", f"max_tokens {req.max_tokens} is above the limit of {settings.max_chars} "
                           "(CHARRNN_MAX_CHARS)")
    if req.session_id is None and service.registry.get(req.model) is None:
        raise APIError(404, "model_not_found", f"the model {req.model!r} does not exist; GET /v1/models lists them")
    return prompts


async def _start(service: Service, req: CompletionRequest, client: Client, prompts: list[str]) -> list[Choice]:
    """Start every choice (prompt-major, as OpenAI numbers them); on a refusal, release what was started."""
    n = req.n or 1
    stops = _stops(req.stop)
    choices: list[Choice] = []
    try:
        for p, prompt in enumerate(prompts):
            prefix = prompt if req.echo else ""
            if _max_tokens(req) == 0:  # nothing to generate: the prompt (if echoed) is the whole text
                lm = service.model_named(req.model)
                unknown = lm.vocab.unknown(prompt)
                if unknown:
                    raise unknown_characters(lm, "prompt", prompt)
                choices += [Choice(p * n + j, None, prefix, req.logprobs, stops) for j in range(n)]
                continue
            gens = await service.start_many(_generate_request(req, prompt), client, n)
            choices += [Choice(p * n + j, gen, prefix, req.logprobs, stops) for j, gen in enumerate(gens)]
        if req.echo and req.logprobs is not None:
            lm = choices[0].gen.lm if choices[0].gen is not None else service.model_named(req.model)
            for p, prompt in enumerate(prompts):
                if prompt:
                    scored = await _score(service, lm, prompt, req.logprobs)
                    for choice in choices[p * n : (p + 1) * n]:
                        choice.tokens, choice.token_logprobs, choice.top_logprobs = (list(x) for x in scored)
    except BaseException:
        await _finalize(service, choices)
        raise
    return choices


async def _score(service: Service, lm: LoadedModel, prompt: str, k: int):
    """An echoed prompt's characters, their log-probabilities (the first has none, as in OpenAI: it is read
    from the model's start with nothing before it) and each position's top k, by `Engine.score`, off the loop."""
    ids = [lm.vocab.index[c] for c in prompt]

    def run():
        rows, _ = lm.engine.score(ids)  # row t: the distribution of ids[t + 1]
        chosen, top, top_ids = chosen_and_top(rows[:-1], torch.tensor(ids[1:], dtype=torch.long), k)
        tops = [{lm.vocab.chars[i]: x for i, x in zip(r_ids, r_top)}
                for r_ids, r_top in zip(top_ids.tolist(), top.tolist())]
        return list(prompt), [None, *chosen.tolist()], [None, *tops]

    return await asyncio.get_running_loop().run_in_executor(service.executor, run)


async def _finalize(service: Service, choices: list[Choice]) -> None:
    with anyio.CancelScope(shield=True):
        for choice in choices:
            if choice.gen is not None:
                await service.finalize(choice.gen)


def _usage(choices: list[Choice], prompts: list[str]) -> Usage:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(len(c.gen.stream.text) for c in choices if c.gen is not None)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def _take(choice: Choice, char: str) -> None:
    """Add a character just taken from the choice's stream, with its log-probabilities if asked."""
    stream = choice.gen.stream
    if stream.logprobs is None:
        return choice.add(char)
    entry = stream.logprobs[len(stream.text) - 1]
    choice.add(char, entry.logprob, dict(entry.top))


async def _collect(choice: Choice) -> None:
    if choice.gen is None:
        return
    stream = choice.gen.stream
    while (char := await stream.next_char()) is not None:
        _take(choice, char)


@router.post("/completions", response_model=Completion, responses={
    200: {"description": STREAM_DOC, "content": {"text/event-stream": {"schema": {"type": "string"}}}}, **ERRORS})
async def completions(req: CompletionRequest, service: ServiceDep, request: Request, client: ClientDep):
    """OpenAI's legacy completions: `prompt` continued by `model`, `n` choices, streamed or not."""
    prompts = _check(service, req)
    choices = await _start(service, req, client, prompts)
    meta = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": req.model}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return event_response(_chunks(service, choices, meta, include_usage, prompts),
                              service.settings.sse_ping_s, service.settings.shutdown_grace_s)
    watcher = asyncio.create_task(_watch_disconnect(request, choices, service))
    try:
        await asyncio.gather(*(_collect(c) for c in choices))
    finally:
        watcher.cancel()
        await _finalize(service, choices)
    if any(c.gen is not None and c.gen.stream.finish_reason == "cancelled" for c in choices):
        return Response(status_code=499)
    for c in choices:
        if c.gen is not None and c.finish_reason is None:
            status = 503 if c.gen.stream.finish_reason == "shutdown" else 500
            raise APIError(status, "generation_failed", c.gen.stream.error or "generation ended early")
    body = Completion(**meta, choices=[_final_choice(c) for c in choices], usage=_usage(choices, prompts))
    return Response(body.model_dump_json(), media_type="application/json")


def _final_choice(c: Choice) -> CompletionChoice:
    text = c.finished_text()
    return CompletionChoice(index=c.index, text=text, logprobs=c.payload(len(text)), finish_reason=c.finish_reason,
                            session_id=c.gen.session.id if c.gen is not None else None)


async def _watch_disconnect(request: Request, choices: list[Choice], service: Service) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for c in choices:
        if c.gen is not None and not c.gen.stream.finished:
            service.metrics.streams_dropped.inc()
            c.gen.stream.finish("cancelled")


def _frame(payload: Completion | str) -> bytes:
    data = payload if isinstance(payload, str) else payload.model_dump_json()
    return b"data: " + data.encode() + b"\r\n\r\n"


async def _chunks(service: Service, choices: list[Choice], meta: dict, include_usage: bool,
                  prompts: list[str]) -> AsyncIterator[bytes]:
    """The stream: each choice's characters as they come, several to a chunk when several are ready."""
    queue: asyncio.Queue[tuple[Choice, bool]] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        stream = choice.gen.stream if choice.gen is not None else None
        if choice.text:
            await queue.put((choice, False))  # the echoed prompt
        if stream is not None:
            metrics, last = service.metrics, None
            while (char := await stream.next_char()) is not None:
                now = time.perf_counter()  # the same latency histograms as /generate's streams
                if last is None:
                    metrics.time_to_first_char.observe(now - choice.gen.started)
                else:
                    metrics.inter_char.observe(now - last)
                last = now
                _take(choice, char)
                while stream.pending and (more := await stream.next_char()) is not None:
                    _take(choice, more)  # already computed: taken without waiting
                await queue.put((choice, False))
        await queue.put((choice, True))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    ended = False
    try:
        open_choices = len(choices)
        while open_choices:
            choice, last = await queue.get()
            text = choice.finished_text() if last else choice.text
            upto = len(text) if last else max(choice.sent, len(text) - choice.hold)
            if upto > choice.sent or last:
                piece = CompletionChoice(index=choice.index, text=text[choice.sent:upto],
                                         logprobs=choice.payload(upto, choice.sent),
                                         finish_reason=choice.finish_reason if last else None,
                                         session_id=choice.gen.session.id if choice.gen is not None else None)
                if last:
                    if choice.gen is not None:
                        await service.finalize(choice.gen)
                    if piece.finish_reason is None:  # shutdown or failure after the stream began
                        stream = choice.gen.stream
                        kind = "shutting_down" if stream.finish_reason == "shutdown" else "generation_failed"
                        yield _frame(json.dumps({"error": {"message": stream.error or "generation ended early",
                                                           "type": "server_error", "param": None, "code": kind}}))
                        open_choices -= 1
                        continue
                choice.sent = upto
                yield _frame(Completion(**meta, choices=[piece]))
            if last:
                open_choices -= 1
        if include_usage:
            yield _frame(Completion(**meta, choices=[], usage=_usage(choices, prompts)))
        yield _frame("[DONE]")
        ended = True
    finally:
        for task in tasks:
            task.cancel()
        if not ended:
            service.metrics.streams_dropped.inc()
        await _finalize(service, choices)
