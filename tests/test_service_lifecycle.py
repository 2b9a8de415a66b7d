"""Service behaviour that needs its own server: limits, expiry, reload, readiness, shutdown, start commands."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
import time

from httpx_sse import connect_sse

from server import Server, generate, running, stream_events, streamed_text


def test_past_the_stream_cap_answers_429_with_retry_after(model_store):
    env = {"CHARRNN_MAX_STREAMS": "2", "CHARRNN_MAX_CHARS": "1000000"}
    with running(model_store, env) as server, server.client() as c:
        held = []
        try:
            for _ in range(2):  # two streams that the clients do not read: they stay open
                cm = connect_sse(c, "POST", "/generate", json={"prime": "a", "max_chars": 1_000_000})
                source = cm.__enter__()
                held.append(cm)
                assert source.response.status_code == 200
            t0 = time.monotonic()
            r = c.post("/generate", json={"prime": "a", "max_chars": 5, "stream": False})
            assert time.monotonic() - t0 < 2  # answered at once, not queued
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "overloaded" and "CHARRNN_MAX_STREAMS" in r.json()["error"]["message"]
            assert server.metric("charrnn_requests_rejected_total", 'reason="overloaded"') == 1
        finally:
            for cm in held:
                cm.__exit__(None, None, None)
        deadline = time.monotonic() + 10
        while server.metric("charrnn_streams_running", 'model="tiny"') and time.monotonic() < deadline:
            time.sleep(0.05)
        assert generate(c, prime="a", max_chars=5)["generated_chars"] == 5


def test_idle_sessions_expire_and_the_oldest_is_evicted_past_the_cap(model_store):
    with running(model_store, {"CHARRNN_SESSION_TTL_S": "1", "CHARRNN_MAX_SESSIONS": "2"}) as server, \
            server.client() as c:
        s1 = generate(c, prime="a", max_chars=2)["session_id"]
        s2 = generate(c, prime="b", max_chars=2)["session_id"]
        s3 = generate(c, prime="c", max_chars=2)["session_id"]
        assert c.get(f"/sessions/{s1}").status_code == 404  # least recently used, evicted
        assert c.get(f"/sessions/{s2}").status_code == 200 and c.get(f"/sessions/{s3}").status_code == 200
        assert server.metric("charrnn_sessions_evicted_total", 'why="lru"') == 1
        assert server.metric("charrnn_sessions_active") == 2
        time.sleep(1.6)
        r = c.post("/generate", json={"session_id": s3, "stream": False})
        assert r.status_code == 404 and "CHARRNN_SESSION_TTL_S" in r.json()["error"]["message"]
        deadline = time.monotonic() + 5  # the sweeper removes the other one without any request touching it
        while server.metric("charrnn_sessions_active") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.metric("charrnn_sessions_active") == 0


def test_reload_picks_up_new_changed_removed_and_skips_broken_files(model_store, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(model_store / "tiny.safetensors", store / "tiny.safetensors")
    with running(store) as server, server.client() as c:
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["tiny"]
        session = generate(c, prime="a", max_chars=5, temperature=0)["session_id"]

        # new file, a half-written one (truncated), junk, and a bad name
        shutil.copy(model_store / "lines.safetensors", store / "lines.safetensors")
        (store / "broken.safetensors").write_bytes((model_store / "tiny.safetensors").read_bytes()[:5000])
        (store / "junk.safetensors").write_bytes(b"\x00" * 100)
        (store / "bad name.safetensors").write_bytes(b"")
        report = c.post("/admin/reload").json()
        assert report["added"] == ["lines"] and report["unchanged"] == ["tiny"]
        assert set(report["errors"]) == {"broken.safetensors", "junk.safetensors", "bad name.safetensors"}
        assert "truncated" in report["errors"]["broken.safetensors"]
        assert c.get("/readyz").status_code == 200
        assert generate(c, model="lines", prime="first", max_chars=5)["model"] == "lines"

        # a changed file replaces the model; sessions of the old weights are refused, not silently reused
        shutil.copy(model_store / "lines.safetensors", store / "tiny.safetensors")
        report = c.post("/admin/reload").json()
        assert report["changed"] == ["tiny"]
        r = c.post("/generate", json={"session_id": session, "stream": False})
        assert r.status_code == 409 and r.json()["error"]["type"] == "model_changed"
        assert c.get("/models/tiny").json()["vocabulary"] == c.get("/models/lines").json()["vocabulary"]

        # removed
        (store / "lines.safetensors").unlink()
        report = c.post("/admin/reload").json()
        assert report["removed"] == ["lines"]
        assert c.get("/models/lines").status_code == 404
        assert generate(c, prime="first", max_chars=3)["model"] == "tiny"


def test_readyz_is_503_until_a_model_is_loaded(tmp_path, model_store):
    store = tmp_path / "empty"
    store.mkdir()
    server = Server(store).start(wait_ready=False)
    try:
        with server.client() as c:
            assert c.get("/healthz").status_code == 200
            r = c.get("/readyz")
            assert r.status_code == 503 and r.json()["status"] == "unavailable"
            r = c.post("/generate", json={"stream": False})
            assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found"
            shutil.copy(model_store / "tiny.safetensors", store / "tiny.safetensors")
            assert c.post("/admin/reload").json()["added"] == ["tiny"]
            assert c.get("/readyz").status_code == 200
    finally:
        server.stop()


def test_sigterm_ends_open_streams_with_a_final_event_and_exits(model_store):
    server = Server(model_store, {"CHARRNN_MAX_CHARS": "1000000", "CHARRNN_SHUTDOWN_GRACE_S": "3"}).start()
    events: list[tuple[str, dict]] = []

    def reader() -> None:
        with server.client(timeout=30) as c:
            with connect_sse(c, "POST", "/generate", json={"prime": "a", "max_chars": 1_000_000}) as source:
                for sse in source.iter_sse():
                    if sse.event != "token" or not any(e == "token" for e, _ in events):
                        events.append((sse.event, json.loads(sse.data)))

    thread = threading.Thread(target=reader)
    thread.start()
    deadline = time.monotonic() + 10
    while not any(e == "token" for e, _ in events) and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    code = server.stop(signal.SIGTERM, timeout=15)
    elapsed = time.monotonic() - t0
    thread.join(10)
    # uvicorn re-raises the signal after its graceful shutdown, so the exit status is "terminated by SIGTERM"
    assert code in (0, -signal.SIGTERM) and elapsed < 10
    assert "Traceback" not in server.log_path.read_text()
    kinds = [e for e, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "error"
    assert events[-1][1]["error"]["type"] == "shutting_down"


def test_uvicorn_app_main_app_starts_the_same_service(model_store):
    server = Server(model_store)
    server.command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
                      "--port", str(server.port), "--log-level", "warning"]
    server.start()
    try:
        with server.client() as c:
            events = stream_events(c, {"prime": "a", "max_chars": 10, "seed": 1})
            assert len(streamed_text(events)) == 10
    finally:
        server.stop()


def test_batching_off_gives_the_same_seeded_text(model_store):
    body = {"prime": "First", "max_chars": 60, "seed": 99}
    with running(model_store) as server, server.client() as c:
        batched = generate(c, **body)["text"]
    with running(model_store, {"CHARRNN_BATCHING": "off"}) as server, server.client() as c:
        assert generate(c, **body)["text"] == batched


def test_the_model_store_is_polled_when_an_interval_is_set(model_store, tmp_path):
    store = tmp_path / "polled"
    store.mkdir()
    shutil.copy(model_store / "tiny.safetensors", store / "tiny.safetensors")
    with running(store, env={"CHARRNN_RELOAD_INTERVAL_S": "0.3"}) as server, server.client() as c:
        shutil.copy(model_store / "lines.safetensors", store / ".lines.tmp")
        (store / ".lines.tmp").rename(store / "lines.safetensors")  # as the trainer writes: atomically
        deadline = time.monotonic() + 10
        while "lines" not in [m["name"] for m in c.get("/models").json()["models"]] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert generate(c, model="lines", prime="first", max_chars=5)["model"] == "lines"
        (store / "lines.safetensors").unlink()
        deadline = time.monotonic() + 10
        while c.get("/models/lines").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.get("/models/lines").status_code == 404


def test_a_malformed_checkpoint_never_stops_the_server(model_store, tmp_path):
    """A header that is valid JSON of the wrong shape: startup, /admin/reload and the poller all carry on."""
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(model_store / "tiny.safetensors", store / "tiny.safetensors")
    raw = json.dumps({"x": 1}).encode()
    (store / "odd.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    with running(store, {"CHARRNN_RELOAD_INTERVAL_S": "0.5"}) as server, server.client() as c:
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["tiny"]
        r = c.post("/admin/reload")
        assert r.status_code == 200 and set(r.json()["errors"]) == {"odd.safetensors"}
        assert str(tmp_path) not in r.text  # no paths of the server's machine in answers
        shutil.copy(model_store / "lines.safetensors", store / "lines.safetensors")
        deadline = time.monotonic() + 10  # the poller is still alive and picks up what comes later
        while "lines" not in [m["name"] for m in c.get("/models").json()["models"]]:
            assert time.monotonic() < deadline, "the model store poller stopped"
            time.sleep(0.2)
        assert generate(c, model="lines", prime="first", max_chars=3)["model"] == "lines"
    assert "Traceback" not in server.log_path.read_text()


def test_abandoned_non_streamed_requests_give_their_slots_back(model_store):
    """Requests with `stream: false` whose clients reset the connection stop generating at once."""
    import socket
    import struct

    env = {"CHARRNN_MAX_STREAMS": "8", "CHARRNN_MAX_CHARS": "100000"}
    with running(model_store, env) as server:
        body = json.dumps({"prime": "a", "max_chars": 100000, "stream": False}).encode()
        request = (f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        socks = []
        for _ in range(8):  # every slot taken, then the connections reset
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(request)
            socks.append(s)
        deadline = time.monotonic() + 10
        while server.metric("charrnn_streams_running", 'model="tiny"') < 8:
            assert time.monotonic() < deadline, "the 8 generations did not start"
            time.sleep(0.05)
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
            s.close()
        deadline = time.monotonic() + 5
        while server.metric("charrnn_streams_running", 'model="tiny"') > 0:
            assert time.monotonic() < deadline, "abandoned generations kept running"
            time.sleep(0.05)
        assert server.metric("charrnn_streams_dropped_total") == 8
        with server.client() as c:  # the slots are free for the next client
            assert generate(c, prime="a", max_chars=5)["generated_chars"] == 5
