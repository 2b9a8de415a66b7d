"""The OpenAI-compatible API, driven by the official `openai` SDK (sync and async) and checked on the wire."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from server import Server, generate, stream_events, streamed_text

KEY = "openai-key-0123456789abcdef"


@pytest.fixture(scope="module")
def server(model_store):
    srv = Server(model_store, env={"CHARRNN_MAX_N": "6"}).start()
    yield srv
    srv.stop()


@pytest.fixture
def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_list_and_one(sdk):
    models = sdk.models.list()
    assert [m.id for m in models] == ["lines", "tiny"]
    assert all(m.object == "model" and m.owned_by == "charrnn" and m.created > 0 for m in models)
    assert sdk.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.models.retrieve("nope")
    assert caught.value.body["code"] == "model_not_found"


def test_a_seeded_completion_equals_the_native_api(sdk, server):
    done = sdk.completions.create(model="tiny", prompt="ROMEO:", max_tokens=60, seed=11, temperature=0.9)
    with server.client() as c:
        native = generate(c, model="tiny", prime="ROMEO:", max_chars=60, seed=11, temperature=0.9)
    choice = done.choices[0]
    assert choice.text == native["text"] and choice.finish_reason == "length" and choice.index == 0
    assert done.object == "text_completion" and done.model == "tiny" and done.id.startswith("cmpl-")
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (6, 60, 66)
    # the choice is a session: /generate continues it exactly where the completion stopped
    session = choice.model_extra["session_id"]
    with server.client() as c:
        more = generate(c, session_id=session, max_chars=30, temperature=0)
        whole = generate(c, model="tiny", prime="ROMEO:", max_chars=60, seed=11, temperature=0.9)
        assert c.get(f"/sessions/{session}").json()["generated_chars"] == 90
    assert whole["text"] == choice.text and len(more["text"]) == 30


def test_streamed_chunks_and_usage_equal_the_whole_answer(sdk, server):
    first_chars = server.metric("charrnn_time_to_first_char_seconds_count")
    whole = sdk.completions.create(model="tiny", prompt="ROMEO:", max_tokens=80, seed=5)
    chunks = list(sdk.completions.create(model="tiny", prompt="ROMEO:", max_tokens=80, seed=5, stream=True,
                                         stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 80
    assert all(c.id == chunks[0].id and c.object == "text_completion" for c in chunks)
    # the same metrics as /generate: streams running, characters, and the streams' latency histograms
    assert server.metric("charrnn_time_to_first_char_seconds_count") == first_chars + 1


def test_n_choices_per_prompt_read_the_prompt_once(sdk, server):
    read = server.metric("charrnn_prime_batch_size_sum")  # primes read, summed over the slices
    sdk.completions.create(model="tiny", prompt="ROMEO:", max_tokens=5, n=4, seed=2)
    assert server.metric("charrnn_prime_batch_size_sum") == read + 1  # one prime read, not four
    done = sdk.completions.create(model="tiny", prompt=["ROMEO:", "JULIET:"], max_tokens=30, n=3, seed=2)
    assert [c.index for c in done.choices] == list(range(6))
    texts = [c.text for c in done.choices]
    assert len(set(texts)) > 1 and all(len(t) == 30 for t in texts)
    sessions = {c.model_extra["session_id"] for c in done.choices}
    assert len(sessions) == 6
    # choice 0 of each prompt is that prompt's single seeded completion; the others are repeatable too
    single = sdk.completions.create(model="tiny", prompt="JULIET:", max_tokens=30, seed=2)
    assert done.choices[3].text == single.choices[0].text
    again = sdk.completions.create(model="tiny", prompt=["ROMEO:", "JULIET:"], max_tokens=30, n=3, seed=2)
    assert [c.text for c in again.choices] == texts
    assert done.usage.prompt_tokens == 6 + 7 and done.usage.completion_tokens == 180


def test_stop_text_is_not_part_of_the_returned_text(sdk, server):
    with server.client() as c:
        native = generate(c, model="lines", prime="first", max_chars=60, temperature=0, stop=["line"])
    assert native["finish_reason"] == "stop" and native["text"].endswith("line")
    done = sdk.completions.create(model="lines", prompt="first", max_tokens=60, temperature=0, stop="line")
    assert done.choices[0].text == native["text"][: -len("line")] and done.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in sdk.completions.create(
        model="lines", prompt="first", max_tokens=60, temperature=0, stop=["line", "zzz"], stream=True))
    assert streamed == done.choices[0].text


def test_echo_and_zero_max_tokens(sdk):
    done = sdk.completions.create(model="tiny", prompt="ROMEO:", max_tokens=10, seed=1, echo=True)
    plain = sdk.completions.create(model="tiny", prompt="ROMEO:", max_tokens=10, seed=1)
    assert done.choices[0].text == "ROMEO:" + plain.choices[0].text
    empty = sdk.completions.create(model="tiny", prompt="ROMEO:", max_tokens=0, echo=True)
    assert empty.choices[0].text == "ROMEO:" and empty.usage.completion_tokens == 0


def test_errors_arrive_as_the_sdks_exceptions_in_openais_envelope(sdk, model_store):
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.completions.create(model="nope", prompt="x")
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(model="tiny", prompt="x", max_tokens=10**6)
    assert caught.value.body["param"] == "max_tokens" and "CHARRNN_MAX_CHARS" in caught.value.body["message"]
    assert caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(model="tiny", prompt="snow \u2603", max_tokens=3)
    assert caught.value.body["code"] == "unknown_characters"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(model="tiny", prompt="x", temperature="hot")
    assert caught.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        sdk.completions.create(model="tiny", prompt="x", n=7)  # above CHARRNN_MAX_N
    with pytest.raises(openai.BadRequestError):
        sdk.completions.create(model="tiny", prompt="x", extra_body={"unheard_of": 1})
    keyed = Server(model_store, env={"CHARRNN_API_KEYS": KEY}).start()
    try:
        with pytest.raises(openai.AuthenticationError) as caught:
            openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong-key-0123456789", max_retries=0).models.list()
        assert caught.value.body["type"] == "authentication_error"
        good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
        assert good.completions.create(model="tiny", prompt="a", max_tokens=3).usage.completion_tokens == 3
    finally:
        keyed.stop()


def test_the_async_client_streams_too(server):
    async def run() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        whole = await client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=40, seed=8)
        parts = [c.choices[0].text async for c in await client.completions.create(
            model="tiny", prompt="ROMEO:", max_tokens=40, seed=8, stream=True)]
        await client.close()
        return whole.choices[0].text, "".join(parts)

    whole, streamed = asyncio.run(run())
    assert whole == streamed and len(whole) == 40


def test_the_wire_format_is_what_curl_scripts_for_vllm_expect(server):
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 12, "stream": True, "seed": 3}
    with httpx.Client(base_url=server.url, timeout=30) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") or line.startswith(":") for line in lines)  # no named events
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == streamed_text(stream_events(
        httpx.Client(base_url=server.url, timeout=30), {"model": "tiny", "prime": "ROMEO:", "max_chars": 12,
                                                         "seed": 3}))
    assert set(chunks[0]) >= {"id", "object", "created", "model", "choices"}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = c.get("/v1/completions")
        assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_logprobs_are_the_native_apis_and_the_prompt_is_scored_exactly(sdk, server, model_store):
    from charrnn.checkpoint import load_model
    from charrnn.engine import Engine

    done = sdk.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, seed=4, logprobs=3)
    with server.client() as c:
        native = generate(c, model="tiny", prime="ROMEO:", max_chars=20, seed=4, logprobs=3)
    lp = done.choices[0].logprobs
    assert lp.tokens == list(native["text"]) and lp.text_offset == list(range(20))
    assert lp.token_logprobs == [x["logprob"] for x in native["logprobs"]]
    assert lp.top_logprobs == [{t["char"]: t["logprob"] for t in x["top_logprobs"]} for x in native["logprobs"]]
    streamed = list(sdk.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, seed=4, logprobs=3,
                                           stream=True))
    assert [x for c in streamed for x in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    # scoring a given text: echo with max_tokens 0; the first character has none, as in OpenAI
    scored = sdk.completions.create(model="tiny", prompt="ROMEO: Hark", max_tokens=0, echo=True, logprobs=2)
    got = scored.choices[0].logprobs
    assert scored.choices[0].text == "ROMEO: Hark" and got.tokens == list("ROMEO: Hark")
    model, vocab, _ = load_model(model_store / "tiny.safetensors")
    engine = Engine(model, precision=server_precision(server))
    rows, _ = engine.score([vocab.index[ch] for ch in "ROMEO: Hark"])
    expected = [None] + [rows[t, vocab.index[ch]].item() for t, ch in enumerate("OMEO: Hark")]
    assert got.token_logprobs == expected
    assert got.top_logprobs[0] is None and len(got.top_logprobs[1]) == 2
    assert max(got.top_logprobs[1].values()) == rows[0].max().item()


def server_precision(server) -> str:
    """The precision the test server decodes in (auto resolves to bf16 or fp32 by the CPU)."""
    from charrnn.engine import resolve_precision

    return resolve_precision("auto")


def test_sampling_controls_reach_the_decoder(sdk, server):
    base = dict(model="tiny", prompt="ROMEO:", max_tokens=60, seed=9, temperature=0.8)
    plain = sdk.completions.create(**base).choices[0].text
    with server.client() as c:
        for extra, native in (
                ({"presence_penalty": 1.5}, {"presence_penalty": 1.5}),
                ({"frequency_penalty": 2.0}, {"frequency_penalty": 2.0}),
                ({"extra_body": {"repetition_penalty": 3.0}}, {"repetition_penalty": 3.0}),
                ({"extra_body": {"min_p": 0.3}}, {"min_p": 0.3}),
                ({"logit_bias": {"e": -100}}, {"logit_bias": {"e": -100}})):
            text = sdk.completions.create(**base, **extra).choices[0].text
            assert text == generate(c, model="tiny", prime="ROMEO:", max_chars=60, seed=9, temperature=0.8,
                                    **native)["text"]
            assert text != plain, extra
    assert "e" not in sdk.completions.create(**base, logit_bias={"e": -100}).choices[0].text


def test_a_stream_whose_client_leaves_frees_its_slots(server):
    dropped = server.metric("charrnn_streams_dropped_total")
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 5000, "n": 2, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one chunk, then the client goes away without reading the rest
    deadline = time.monotonic() + 10
    while server.metric("charrnn_streams_running", 'model="tiny"') and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("charrnn_streams_running", 'model="tiny"') == 0
    assert server.metric("charrnn_streams_dropped_total") >= dropped + 1


def test_a_request_for_more_generations_than_a_client_may_run_is_a_400_not_a_429(server):
    # 6 prompts x n 6 = 36 generations at once, above CHARRNN_CLIENT_MAX_STREAMS (32) on an idle server:
    # retrying could never help, so no Retry-After
    body = {"model": "tiny", "prompt": ["ROMEO:"] * 6, "n": 6, "max_tokens": 2}
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 400 and "retry-after" not in r.headers
    error = r.json()["error"]
    assert error["param"] == "n" and "CHARRNN_CLIENT_MAX_STREAMS" in error["message"] and "36" in error["message"]
    r = httpx.post(server.url + "/v1/completions", json={**body, "n": 5})  # 30: within the limit
    assert r.status_code == 200 and len(r.json()["choices"]) == 30
