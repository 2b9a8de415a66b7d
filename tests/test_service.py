"""End-to-end tests of the HTTP service against a real `charrnn serve` on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from httpx_sse import connect_sse

from server import Server, generate, stream_events, streamed_text


@pytest.fixture(scope="module")
def server(model_store):
    srv = Server(model_store).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


# --- the contract of a stream ---


def test_stream_has_start_tokens_and_done(client):
    events = stream_events(client, {"prime": "ROMEO:", "max_chars": 40, "seed": 3})
    kinds = [e for e, _, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds[1:-1] == ["token"] * 40
    start, done = events[0][1], events[-1][1]
    assert start["model"] == "tiny" and len(start["session_id"]) >= 22  # >= 128 random bits
    tokens = [(d, i) for e, d, i in events if e == "token"]
    assert [d["index"] for d, _ in tokens] == list(range(40))
    assert [i for _, i in tokens] == [str(n) for n in range(40)]  # SSE id: the index
    assert done["text"] == streamed_text(events)
    assert done["finish_reason"] == "length" and done["generated_chars"] == 40 and done["prime_chars"] == 6
    assert done["session_id"] == start["session_id"] and done["seconds"] > 0


def test_keep_alive_pings_between_events_are_no_events(model_store):
    """A ping is a comment line between two events. With a blank line after it, clients that keep the last
    event id (httpx-sse, as the spec says) dispatched an empty event after every ping: `json.loads("")` broke
    the container check's stream through nginx 15 s in, at the first ping."""
    server = Server(model_store, {"CHARRNN_SSE_PING_S": "0.02"}).start()
    try:
        with server.client() as c:
            with c.stream("POST", "/generate", json={"prime": "ROMEO:", "max_chars": 600, "seed": 5}) as r:
                raw = b""
                for chunk in r.iter_raw():
                    raw += chunk
                    time.sleep(0.001)  # a slow reader: the stream lasts long enough for pings
            events = stream_events(c, {"prime": "ROMEO:", "max_chars": 600, "seed": 5})
    finally:
        server.stop()
    assert raw.count(b"\r\n: ping") >= 2, "no ping was sent between the events"
    assert b"\r\n\r\n: ping" in raw and b"\r\n: ping\r\n\r\n" not in raw  # after a blank line, and none after it
    kinds = [e for e, _, _ in events]
    assert kinds == ["start", *["token"] * 600, "done"]
    assert events[-1][1]["text"] == streamed_text(events)


def test_streamed_equals_done_equals_non_streamed_including_newlines_and_unicode(client):
    body = {"model": "lines", "prime": "first", "max_chars": 200, "seed": 11, "temperature": 0.5}
    events = stream_events(client, body)
    joined = streamed_text(events)
    assert joined == events[-1][1]["text"]
    assert joined == generate(client, **body)["text"]
    for special in ("\r\n", "\n\t", "é東", "  "):  # survive the event stream exactly
        assert special in joined


def test_get_generate_streams_the_same_events(client):
    params = {"prime": "MENENIUS", "max_chars": 30, "seed": 5, "temperature": 0.8}
    events = stream_events(client, method="GET", params=params)
    assert streamed_text(events) == generate(client, **params)["text"]
    r = client.get("/generate", params={"prime": "x", "bogus": "1"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request"


def test_same_seed_same_text_and_other_seed_differs(client):
    a = generate(client, prime="The ", max_chars=80, seed=7)["text"]
    b = generate(client, prime="The ", max_chars=80, seed=7)["text"]
    c = generate(client, prime="The ", max_chars=80, seed=8)["text"]
    assert a == b and a != c


def test_stop_string_ends_generation(client):
    full = generate(client, model="lines", prime="first", max_chars=100, temperature=0)["text"]
    assert "line" in full
    cut = generate(client, model="lines", prime="first", max_chars=100, temperature=0, stop=["line"])
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full[: full.index("line") + len("line")]


# --- sessions ---


def test_greedy_200_equals_100_plus_100_continued(client):
    whole = generate(client, prime="First Citizen:", max_chars=200, temperature=0)
    first = generate(client, prime="First Citizen:", max_chars=100, temperature=0)
    second = generate(client, session_id=first["session_id"], max_chars=100, temperature=0)
    assert second["session_id"] == first["session_id"]
    assert first["text"] + second["text"] == whole["text"]


def test_streamed_continuation_equals_one_request(client):
    whole = generate(client, prime="A", max_chars=120, temperature=0)["text"]
    events = stream_events(client, {"prime": "A", "max_chars": 50, "temperature": 0})
    sid = events[0][1]["session_id"]
    rest = stream_events(client, {"session_id": sid, "max_chars": 70, "temperature": 0})
    assert streamed_text(events) + streamed_text(rest) == whole


def test_continuing_with_a_prime_feeds_it_after_the_generated_text(client):
    # the overfit `lines` model predicts with wide margins, so the two computation paths agree exactly
    first = generate(client, model="lines", prime="first", max_chars=10, temperature=0)
    cont = generate(client, session_id=first["session_id"], prime="\tt", max_chars=30, temperature=0)
    fresh = generate(client, model="lines", prime="first" + first["text"] + "\tt", max_chars=30, temperature=0)
    assert cont["prime_chars"] == 2
    assert cont["text"] == fresh["text"]
    assert cont["text"].startswith("ab\n")  # it really read the new prime: "\ttab\n"


def test_two_sessions_never_share_state(client):
    ref_a = generate(client, prime="MENENIUS:", max_chars=60, temperature=0)["text"]
    ref_b = generate(client, prime="Second Citizen:", max_chars=60, temperature=0)["text"]
    a = generate(client, prime="MENENIUS:", max_chars=20, temperature=0)
    b = generate(client, prime="Second Citizen:", max_chars=20, temperature=0)
    a2 = generate(client, session_id=a["session_id"], max_chars=20, temperature=0)
    b2 = generate(client, session_id=b["session_id"], max_chars=20, temperature=0)
    a3 = generate(client, session_id=a["session_id"], max_chars=20, temperature=0)
    b3 = generate(client, session_id=b["session_id"], max_chars=20, temperature=0)
    assert a["text"] + a2["text"] + a3["text"] == ref_a
    assert b["text"] + b2["text"] + b3["text"] == ref_b
    assert a["session_id"] != b["session_id"]


def test_session_info_and_delete(client):
    first = generate(client, prime="x", max_chars=25)
    sid = first["session_id"]
    generate(client, session_id=sid, max_chars=10)
    info = client.get(f"/sessions/{sid}").json()
    assert info["model"] == "tiny" and info["generated_chars"] == 35 and not info["busy"]
    assert info["last_used"] >= info["created"]
    assert client.delete(f"/sessions/{sid}").status_code == 204
    assert client.get(f"/sessions/{sid}").json()["error"]["type"] == "session_not_found"
    r = client.post("/generate", json={"session_id": sid, "stream": False})
    assert r.status_code == 404 and r.json()["error"]["type"] == "session_not_found"
    assert client.delete(f"/sessions/{sid}").status_code == 404


def test_session_is_bound_to_its_model(client):
    sid = generate(client, prime="a", max_chars=5)["session_id"]
    r = client.post("/generate", json={"session_id": sid, "model": "lines", "stream": False})
    assert r.status_code == 409 and r.json()["error"]["type"] == "session_model_mismatch"
    assert generate(client, session_id=sid, model="tiny", max_chars=3)["model"] == "tiny"


def test_one_generation_per_session_at_a_time(client, server):
    sid = generate(client, prime="a", max_chars=1)["session_id"]
    with server.client() as slow:
        with connect_sse(slow, "POST", "/generate", json={"session_id": sid, "max_chars": 5000}) as source:
            events = source.iter_sse()
            assert next(events).event == "start"
            r = client.post("/generate", json={"session_id": sid, "max_chars": 5, "stream": False})
            assert r.status_code == 409 and r.json()["error"]["type"] == "session_busy"
            assert client.delete(f"/sessions/{sid}").status_code == 409
    # the slot and the session are released once the client has gone
    deadline = time.monotonic() + 10
    while client.get(f"/sessions/{sid}").json()["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert generate(client, session_id=sid, max_chars=5)["generated_chars"] == 5


# --- batching ---


def test_seeded_output_is_identical_alone_and_among_16_concurrent_streams(server):
    body = {"prime": "Citizen", "max_chars": 150, "seed": 1234, "temperature": 1.0}
    with server.client() as c:
        alone = generate(c, **body)["text"]
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        with server.client() as c:
            mine = {**body, "seed": 1234} if i % 2 == 0 else {**body, "seed": 5000 + i, "top_k": 5}
            results[i] = streamed_text(stream_events(c, mine))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 16
    assert all(results[i] == alone for i in range(0, 16, 2))
    assert server.metric("charrnn_decode_batch_size_count") > 0
    # streams really were stepped together
    text = httpx.get(server.url + "/metrics").text
    batched = [line for line in text.splitlines() if line.startswith("charrnn_decode_batch_size_bucket")]
    le1 = next(float(line.split()[-1]) for line in batched if 'le="1.0"' in line)
    total = server.metric("charrnn_decode_batch_size_count")
    assert le1 < total  # some steps had more than one stream


# --- disconnects ---


def test_client_disconnect_frees_the_slot_and_keeps_the_session(server):
    dropped_before = server.metric("charrnn_streams_dropped_total")
    with server.client() as c:
        with connect_sse(c, "POST", "/generate", json={"prime": "a", "max_chars": 5000}) as source:
            received = 0
            for sse in source.iter_sse():
                if sse.event == "start":
                    sid = json.loads(sse.data)["session_id"]
                elif sse.event == "token":
                    received += 1
                    if received == 20:
                        break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.metric("charrnn_streams_running", 'model="tiny"') != 0:
        time.sleep(0.05)
    assert server.metric("charrnn_streams_running", 'model="tiny"') == 0
    assert server.metric("charrnn_streams_dropped_total") == dropped_before + 1
    with server.client() as c:
        info = c.get(f"/sessions/{sid}").json()
        assert not info["busy"] and 20 <= info["generated_chars"] < 5000
        assert generate(c, session_id=sid, max_chars=5)["generated_chars"] == 5


# --- errors: every refusal is JSON, before anything is streamed ---


@pytest.mark.parametrize(
    "body, status, kind, fragment",
    [
        ({"prime": "a", "bogus": 1}, 422, "invalid_request", "bogus"),
        ({"temperature": -1}, 422, "invalid_request", "temperature"),
        ({"temperature": 6.0}, 422, "invalid_request", "CHARRNN_MAX_TEMPERATURE"),
        ({"max_chars": 0}, 422, "invalid_request", "max_chars"),
        ({"max_chars": 10**6}, 422, "invalid_request", "CHARRNN_MAX_CHARS"),
        ({"prime": "a" * 10_001}, 422, "invalid_request", "CHARRNN_MAX_PRIME_CHARS"),
        ({"top_k": 0}, 422, "invalid_request", "top_k"),
        ({"top_p": 0}, 422, "invalid_request", "top_p"),
        ({"top_p": 1.5}, 422, "invalid_request", "top_p"),
        ({"seed": -1}, 422, "invalid_request", "seed"),
        ({"stop": [""]}, 422, "invalid_request", "stop strings must not be empty"),
        ({"stop": ["x"] * 9}, 422, "invalid_request", "CHARRNN_MAX_STOP_STRINGS"),
        ({"stop": ["x" * 65]}, 422, "invalid_request", "CHARRNN_MAX_STOP_CHARS"),
        ({"stream": "yes please"}, 422, "invalid_request", "stream"),
        ({"skip_unknown": 0}, 422, "invalid_request", "skip_unknown"),  # JSON bodies are strict: 0 is no boolean
        ({"max_chars": "5"}, 422, "invalid_request", "max_chars"),
        ({"model": "../etc/passwd"}, 422, "invalid_request", "model"),
        ({"model": "a..b"}, 422, "invalid_request", "model"),  # the checkpoint's rule: no such file can exist
        ({"model": "nosuchmodel"}, 404, "model_not_found", "nosuchmodel"),
        ({"session_id": "not a valid id!"}, 422, "invalid_request", "session_id"),
        ({"session_id": "A" * 32}, 404, "session_not_found", "CHARRNN_SESSION_TTL_S"),
        ({"prime": "héllo ✓"}, 422, "unknown_characters", "'é' (U+00E9), '✓' (U+2713)"),
    ],
)
def test_bad_requests_get_a_clear_json_error(client, body, status, kind, fragment):
    for stream in (True, False):
        r = client.post("/generate", json={**body, "stream": stream} if "stream" not in body else body)
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert error["type"] == kind and fragment in error["message"]


def test_non_finite_temperature_is_rejected(client):
    for raw in ('{"temperature": NaN}', '{"temperature": Infinity}', '{"temperature": 1e999}'):
        r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request", raw


def test_malformed_bodies(client):
    for raw in ("{not json", "[1, 2]", '"text"', ""):
        r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "error" in r.json(), raw
    r = client.post("/generate", content=b'{"prime": "\xff"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request"  # not UTF-8: not JSON text
    big = "{" + '"prime": "' + "a" * 1_100_000 + '"}'
    r = client.post("/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "CHARRNN_MAX_BODY_BYTES" in r.json()["error"]["message"]


def test_skip_unknown_drops_characters(client):
    r = generate(client, prime="héllo", skip_unknown=True, max_chars=5, seed=1)
    assert r["prime_chars"] == 4 and r["generated_chars"] == 5


def test_unknown_routes_and_methods_are_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = client.put("/generate")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
    assert r.headers["allow"] == "GET, POST"  # both routes of the path, not only the first that matched
    assert client.post("/sessions/" + "A" * 32).headers["allow"] == "DELETE, GET"


def test_server_stays_healthy_after_bad_input(client):
    assert client.get("/healthz").json() == {"status": "ok", "models": None, "detail": None}
    assert generate(client, prime="a", max_chars=3)["generated_chars"] == 3


# --- models, health, metrics ---


def test_models_list_and_detail(client):
    listing = client.get("/models").json()
    assert listing["default"] == "tiny"
    names = [m["name"] for m in listing["models"]]
    assert names == ["lines", "tiny"]
    tiny = client.get("/models/tiny").json()
    assert tiny["cell"] == "lstm" and tiny["layers"] == 2 and tiny["hidden"] == 32
    assert tiny["vocab_size"] == len(tiny["vocabulary"]) and "R" in tiny["vocabulary"]
    assert tiny["parameters"] > 0 and tiny["val_loss"] > 0 and tiny["trained_on"] == "slice.txt"
    assert tiny["created"] and len(tiny["sha256"]) == 64
    assert client.get("/models/nope").status_code == 404
    assert client.get("/models/..%2Fetc").status_code in (404, 422)


def test_readyz_and_metrics_names(client):
    assert client.get("/readyz").json()["status"] == "ready"
    generate(client, prime="a", max_chars=3)
    text = client.get("/metrics").text
    for name in ("charrnn_requests_total", "charrnn_streams_running", "charrnn_streams_dropped_total",
                 "charrnn_requests_rejected_total", "charrnn_generated_chars_total",
                 "charrnn_time_to_first_char_seconds", "charrnn_inter_char_seconds", "charrnn_decode_batch_size",
                 "charrnn_sessions_active", "charrnn_sessions_evicted_total", "charrnn_models_loaded"):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    assert 'charrnn_requests_total{route="/generate",status="200"}' in text
    assert "charrnn_models_loaded 2.0" in text


def test_openapi_documents_the_api(client):
    spec = client.get("/openapi.json").json()
    assert {"/generate", "/models", "/models/{name}", "/sessions/{session_id}", "/healthz", "/readyz",
            "/metrics", "/admin/reload"} <= set(spec["paths"])
    post = spec["paths"]["/generate"]["post"]
    assert "text/event-stream" in post["responses"]["200"]["content"]
    assert {"404", "409", "422", "429"} <= set(post["responses"])


# --- log-probabilities, penalties, bias and min_p ---


def reference(store, body: dict) -> dict:
    """What the server must answer, computed here with the engine and the sampler, one character at a time:
    the text, and per character its logprob entry when asked. The window is the documented one: the last
    `repetition_window` characters read or written before each step."""
    import random
    from collections import deque

    import torch

    from app.settings import Settings
    from charrnn.checkpoint import load_model
    from charrnn.engine import Engine, start_ids
    from charrnn.sampling import sample_next

    model, vocab, _ = load_model(store / f"{body.get('model', 'tiny')}.safetensors")
    engine = Engine(model, Settings().decode_precision)
    ids = start_ids(vocab, [vocab.index[c] for c in body.get("prime", "")])
    window = deque(ids, maxlen=body.get("repetition_window", 64))
    (state,), _ = engine.read([ids[:-1]], [None])
    rng, next_id, k = random.Random(body.get("seed")), ids[-1], body.get("logprobs")
    bias = {vocab.index[c]: b for c, b in body.get("logit_bias", {}).items()} or None
    text, logprobs = "", []
    for _ in range(body["max_chars"]):
        logits, state = engine.step(torch.tensor([next_id]), state)
        next_id = int(sample_next(logits, body.get("temperature", 1.0), body.get("top_k"), body.get("top_p"), rng,
                                  min_p=body.get("min_p"), logit_bias=bias, recent=list(window),
                                  repetition_penalty=body.get("repetition_penalty", 1.0),
                                  presence_penalty=body.get("presence_penalty", 0.0),
                                  frequency_penalty=body.get("frequency_penalty", 0.0)))
        window.append(next_id)
        text += vocab.chars[next_id]
        if k is not None:
            lp = torch.log_softmax(logits.float(), -1)[0]  # the model's own distribution
            top, top_ids = lp.sort(descending=True, stable=True)
            logprobs.append({"char": vocab.chars[next_id], "logprob": lp[next_id].item(),
                             "top_logprobs": [{"char": vocab.chars[i], "logprob": x}
                                              for i, x in zip(top_ids[:k].tolist(), top[:k].tolist())]})
    return {"text": text, **({"logprobs": logprobs} if k is not None else {})}


CONTROLLED = [
    {"prime": "ROMEO:", "max_chars": 60, "temperature": 0, "repetition_penalty": 1.8, "repetition_window": 8},
    {"prime": "ROMEO:", "max_chars": 60, "seed": 4, "presence_penalty": 1.5, "frequency_penalty": 0.7,
     "repetition_window": 16, "logprobs": 2},
    {"prime": "The ", "max_chars": 60, "seed": 9, "temperature": 1.3, "min_p": 0.2, "logit_bias": {"e": -100, "t": 2.5},
     "logprobs": 5},
    {"model": "lines", "prime": "first", "max_chars": 60, "temperature": 0, "frequency_penalty": 2.0,
     "repetition_window": 1024, "logprobs": 0},
]


def test_controls_and_logprobs_equal_the_engine_and_sampler_stepped_by_hand(client, model_store):
    for body in CONTROLLED:
        expected = reference(model_store, body)
        events = stream_events(client, body)
        tokens = [d for e, d, _ in events if e == "token"]
        assert streamed_text(events) == expected["text"], body
        result = generate(client, **body)
        assert result["text"] == expected["text"]
        if "logprobs" in body:
            assert [{k: t[k] for k in ("char", "logprob", "top_logprobs")} for t in tokens] == expected["logprobs"]
            assert result["logprobs"] == events[-1][1]["logprobs"] == expected["logprobs"]
            assert all(len(t["top_logprobs"]) == body["logprobs"] for t in tokens)
        else:
            assert "logprobs" not in result and all(set(t) == {"char", "index"} for t in tokens)


def test_each_control_changes_the_text_and_none_changes_the_default(client):
    plain = {"prime": "First Citizen:", "max_chars": 120, "seed": 3}
    text = generate(client, **plain)["text"]
    assert generate(client, **plain, repetition_penalty=1.0, presence_penalty=0, frequency_penalty=0.0,
                    min_p=0, logit_bias={})["text"] == text  # every control at its neutral value: today's text
    assert generate(client, **plain, logprobs=5)["text"] == text  # asking for logprobs changes nothing drawn
    for control in ({"repetition_penalty": 2.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                    {"min_p": 0.5}, {"logit_bias": {" ": -100}}):
        assert generate(client, **plain, **control)["text"] != text, control
    hot = generate(client, prime="a", max_chars=300, seed=1, temperature=2.0, logit_bias={" ": -100, "e": -100})
    assert " " not in hot["text"] and "e" not in hot["text"]
    window_1 = generate(client, **plain, frequency_penalty=2.0, repetition_window=1)["text"]
    window_64 = generate(client, **plain, frequency_penalty=2.0)["text"]
    assert window_1 != window_64


def test_controlled_streams_read_slowly_and_together_give_their_own_text(server, model_store):
    expected = [reference(model_store, body)["text"] for body in CONTROLLED]
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        with server.client() as c:
            body = CONTROLLED[i % len(CONTROLLED)]
            with connect_sse(c, "POST", "/generate", json=body) as source:
                chars = []
                for sse in source.iter_sse():
                    if sse.event == "token":
                        chars.append(json.loads(sse.data)["char"])
                        if i % 3 == 0:
                            time.sleep(0.002)  # a slow client: the stream runs ahead of it
            results[i] = "".join(chars)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(12)] == [expected[i % len(CONTROLLED)] for i in range(12)]


def test_get_generate_takes_the_controls_but_not_logit_bias(client):
    params = {"prime": "MENENIUS", "max_chars": 20, "seed": 5, "logprobs": 1, "repetition_penalty": 1.4,
              "repetition_window": 10, "min_p": 0.1, "presence_penalty": 0.5, "frequency_penalty": -0.5}
    events = stream_events(client, method="GET", params=params)
    assert streamed_text(events) == generate(client, **params)["text"]
    assert all(len(d["top_logprobs"]) == 1 for e, d, _ in events if e == "token")
    r = client.get("/generate", params={"prime": "x", "logit_bias": '{"a": 1}'})
    assert r.status_code == 422 and "logit_bias" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, kind, fragment",
    [
        ({"logprobs": 6}, "invalid_request", "logprobs"),
        ({"logprobs": -1}, "invalid_request", "logprobs"),
        ({"repetition_penalty": 0}, "invalid_request", "repetition_penalty"),
        ({"repetition_penalty": 101}, "invalid_request", "repetition_penalty"),
        ({"presence_penalty": 2.5}, "invalid_request", "presence_penalty"),
        ({"frequency_penalty": -3}, "invalid_request", "frequency_penalty"),
        ({"min_p": 1.5}, "invalid_request", "min_p"),
        ({"repetition_window": 0}, "invalid_request", "repetition_window"),
        ({"repetition_window": 1025}, "invalid_request", "CHARRNN_MAX_REPETITION_WINDOW"),
        ({"logit_bias": {"ab": 1}}, "invalid_request", "logit_bias"),
        ({"logit_bias": {"a": 101}}, "invalid_request", "logit_bias"),
        ({"logit_bias": ["a"]}, "invalid_request", "logit_bias"),
        ({"logit_bias": {"a": 1, "é": 2, "✓": -100}}, "unknown_characters",
         "logit_bias has characters not in the vocabulary of model 'tiny': 'é' (U+00E9), '✓' (U+2713)"),
    ],
)
def test_bad_controls_get_a_clear_json_error(client, body, kind, fragment):
    for stream in (True, False):
        r = client.post("/generate", json={**body, "stream": stream})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["type"] == kind and fragment in error["message"]


def test_a_bias_that_bans_every_character_is_refused(client):
    vocabulary = client.get("/models/tiny").json()["vocabulary"]
    r = client.post("/generate", json={"logit_bias": {c: -100 for c in vocabulary}, "stream": False})
    assert r.status_code == 422 and "bans every character of model 'tiny'" in r.json()["error"]["message"]
    almost = {c: -100 for c in vocabulary if c != "x"}
    assert set(generate(client, logit_bias=almost, max_chars=20)["text"]) == {"x"}


def test_greedy_with_logprobs_takes_the_top_character_and_keeps_the_text(client):
    plain = generate(client, prime="ROMEO:", max_chars=50, temperature=0)
    scored = generate(client, prime="ROMEO:", max_chars=50, temperature=0, logprobs=3)
    assert scored["text"] == plain["text"] and "logprobs" not in plain
    assert [e["char"] for e in scored["logprobs"]] == list(scored["text"])
    for entry in scored["logprobs"]:
        top = entry["top_logprobs"]
        assert top[0] == {"char": entry["char"], "logprob": entry["logprob"]}
        assert 0 >= top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]


@pytest.mark.parametrize("window", [None, 200])
def test_a_continued_session_is_penalized_as_one_long_generation(client, window):
    """The session keeps its last characters, so the repetition window reaches back across the join."""
    controls = {"temperature": 0, "repetition_penalty": 1.3, "presence_penalty": 0.4, "frequency_penalty": 0.2}
    if window:
        controls["repetition_window"] = window
    whole = generate(client, prime="First Citizen:", max_chars=240, **controls)["text"]
    first = generate(client, prime="First Citizen:", max_chars=120, **controls)
    second = generate(client, session_id=first["session_id"], max_chars=120, **controls)
    assert first["text"] + second["text"] == whole
    # and a prime sent on continuing joins the window too: the same as reading it inside one long prime
    third = generate(client, session_id=second["session_id"], prime="\nSecond", max_chars=60, **controls)
    at_once = generate(client, prime="First Citizen:" + whole + "\nSecond", max_chars=60, **controls)
    assert third["text"] == at_once["text"]
