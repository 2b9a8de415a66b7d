"""Sessions shared by replicas through a real Redis: two (or three) `charrnn serve` processes, one redis-server."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import redis
from httpx_sse import connect_sse

import torch

from app.redis_store import decode_state, encode_state
from server import Server, generate, stream_events, streamed_text


def test_state_bytes_round_trip_exactly():
    state = (torch.randn(2, 1, 48), torch.randn(2, 1, 48) * 30)
    data, shape = encode_state(state)
    assert shape == "2,2,48" and len(data) == 2 * 2 * 48 * 4
    back = decode_state(data, shape)
    assert all(torch.equal(a, b) for a, b in zip(state, back))
    with pytest.raises(ValueError, match="bytes"):
        decode_state(data[:-4], shape)


def replica(model_store, redis_server, **env) -> Server:
    return Server(model_store, env={"CHARRNN_SESSION_STORE": redis_server.url, **env}).start()


@pytest.fixture(scope="module")
def replicas(model_store, redis_server):
    a, b = replica(model_store, redis_server), replica(model_store, redis_server)
    yield a, b
    a.stop()
    b.stop()


def test_a_session_started_on_one_replica_continues_exactly_on_another(replicas):
    a, b = replicas
    with a.client() as ca, b.client() as cb:
        whole = generate(ca, prime="ROMEO:", max_chars=200, temperature=0)["text"]
        first = generate(ca, prime="ROMEO:", max_chars=100, temperature=0)
        second = generate(cb, session_id=first["session_id"], max_chars=100, temperature=0)
        assert first["text"] + second["text"] == whole
        third = streamed_text(stream_events(ca, {"session_id": first["session_id"], "max_chars": 50,
                                                 "temperature": 0}))
        assert third == generate(ca, prime="ROMEO:", max_chars=250, temperature=0)["text"][200:]
        info = cb.get(f"/sessions/{first['session_id']}").json()
        assert info["generated_chars"] == 250 and info["model"] == "tiny" and info["busy"] is False


def test_the_state_in_redis_is_compact_and_carries_model_and_hash(replicas, redis_server, model_store):
    a, _ = replicas
    with a.client() as ca:
        sid = generate(ca, prime="ROMEO:", max_chars=10)["session_id"]
        sha = ca.get("/models/tiny").json()["sha256"]
    r = redis.Redis.from_url(redis_server.url)
    saved = r.hgetall(f"charrnn:session:{sid}")
    assert saved[b"model"] == b"tiny" and saved[b"sha256"] == sha.encode()
    assert saved[b"shape"] == b"2,2,32" and len(saved[b"state"]) == 2 * 2 * 32 * 4  # h and c, fp32
    assert 0 < r.pttl(f"charrnn:session:{sid}") <= 3600 * 1000


def test_one_generation_per_session_across_replicas(replicas):
    a, b = replicas
    with a.client() as ca, b.client() as cb:
        sid = generate(ca, prime="ROMEO:", max_chars=5)["session_id"]
        with connect_sse(ca, "POST", "/generate", json={"session_id": sid, "max_chars": 5000}) as source:
            events = source.iter_sse()
            assert next(events).event == "start"
            assert next(events).event == "token"
            busy = cb.post("/generate", json={"session_id": sid, "max_chars": 5, "stream": False})
            assert busy.status_code == 409 and busy.json()["error"]["type"] == "session_busy"
            assert cb.get(f"/sessions/{sid}").json()["busy"] is True
        # the client left: A saves the state as of the last character sent and unlocks
        deadline = time.monotonic() + 10
        while cb.get(f"/sessions/{sid}").json()["busy"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert generate(cb, session_id=sid, max_chars=5)["session_id"] == sid


def test_a_crashed_replica_does_not_lock_the_session_forever(model_store, redis_server, replicas):
    _, b = replicas
    crashing = replica(model_store, redis_server, CHARRNN_SESSION_LOCK_TTL_S="1")
    try:
        with crashing.client() as cc, b.client() as cb:
            sid = generate(cc, prime="ROMEO:", max_chars=5, temperature=0)["session_id"]
            saved = generate(cb, session_id=sid, max_chars=20, temperature=0)["text"]
            opened = threading.Event()

            def hold_open():
                try:
                    with connect_sse(cc, "POST", "/generate", json={"session_id": sid, "max_chars": 5000}) as source:
                        for sse in source.iter_sse():
                            opened.set()
                except Exception:  # the stream breaks off when the replica is killed
                    pass

            threading.Thread(target=hold_open, daemon=True).start()
            assert opened.wait(10)
            assert cb.post("/generate", json={"session_id": sid, "max_chars": 5}).status_code == 409
            crashing.stop(signal.SIGKILL)  # no chance to save or unlock
            time.sleep(1.5)  # the lock's expiry
            after = generate(cb, session_id=sid, max_chars=10, temperature=0)
            # the state is the last one saved (after `saved`), so the text goes on from there
            whole = generate(cb, prime="ROMEO:", max_chars=35, temperature=0)["text"]
            assert whole == generate(cb, prime="ROMEO:", max_chars=5, temperature=0)["text"] + saved + after["text"]
    finally:
        crashing.stop()


def test_sessions_expire_with_their_ttl(model_store, redis_server):
    short = replica(model_store, redis_server, CHARRNN_SESSION_TTL_S="1")
    try:
        with short.client() as c:
            sid = generate(c, prime="ROMEO:", max_chars=5)["session_id"]
            assert c.get(f"/sessions/{sid}").status_code == 200
            time.sleep(1.5)
            r = c.post("/generate", json={"session_id": sid, "max_chars": 5})
            assert r.status_code == 404 and r.json()["error"]["type"] == "session_not_found"
    finally:
        short.stop()


def test_redis_down_then_back(replicas, redis_server):
    a, b = replicas
    with a.client() as ca, b.client() as cb:
        sid = generate(ca, prime="ROMEO:", max_chars=30, temperature=0)["session_id"]
        assert ca.get("/readyz").json()["status"] == "ready"
        redis_server.stop()  # saves its data, then exits
        try:
            # stateless generation still works, on both replicas
            assert generate(ca, prime="ROMEO:", max_chars=20)["generated_chars"] == 20
            assert len(streamed_text(stream_events(cb, {"prime": "MENENIUS:", "max_chars": 20}))) == 20
            # continuing needs the store: a clear 503
            r = cb.post("/generate", json={"session_id": sid, "max_chars": 5})
            assert r.status_code == 503 and r.json()["error"]["type"] == "session_store_unavailable"
            assert "Redis" in r.json()["error"]["message"] and r.headers["retry-after"]
            assert cb.get(f"/sessions/{sid}").status_code == 503
            ready = ca.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "degraded"
            assert "unreachable" in ready.json()["detail"]
            assert a.metric("charrnn_session_store_errors_total", 'op="get"') == 0
            assert b.metric("charrnn_session_store_errors_total", 'op="get"') >= 1
        finally:
            redis_server.start()  # same port, same folder: the saved sessions come back
        assert ca.get("/readyz").json()["status"] == "ready"
        continued = generate(cb, session_id=sid, max_chars=10, temperature=0)["text"]
        assert generate(ca, prime="ROMEO:", max_chars=40, temperature=0)["text"].endswith(continued)


def test_the_repetition_window_crosses_replicas_with_the_session(replicas):
    a, b = replicas
    controls = {"temperature": 0, "repetition_penalty": 1.3, "presence_penalty": 0.4}
    with a.client() as ca, b.client() as cb:
        whole = generate(ca, prime="ROMEO:", max_chars=160, **controls)["text"]
        first = generate(ca, prime="ROMEO:", max_chars=80, **controls)
        second = generate(cb, session_id=first["session_id"], max_chars=80, **controls)
        assert first["text"] + second["text"] == whole
