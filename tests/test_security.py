"""Keys, per-client limits, cross-site refusals, request ids: against real servers (and a real Redis)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from httpx_sse import connect_sse

from app.auth import KeyRing, fingerprint, load_keys
from server import Server, generate, running

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
ADMIN = "admin-0123456789abcdef"
OPEN = {("GET", "/healthz"), ("GET", "/readyz")}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_match_only_themselves_and_short_keys_are_refused(tmp_path):
    ring = KeyRing([KEY_A, KEY_B])
    assert ring.match(KEY_A) == fingerprint(KEY_A) and ring.match(KEY_B) == fingerprint(KEY_B)
    assert ring.match(KEY_A[:-1]) is None and ring.match(KEY_A + "x") is None and ring.match("") is None
    assert not KeyRing([])
    file = tmp_path / "keys"
    file.write_text(f"# team keys\n{KEY_B}\n\n")
    from pydantic import SecretStr

    assert load_keys(SecretStr(f" {KEY_A} ,"), file, "CHARRNN_API_KEYS") == [KEY_A, KEY_B]
    with pytest.raises(ValueError, match="at least 16"):
        load_keys(SecretStr("short"), None, "CHARRNN_API_KEYS")


@pytest.fixture(scope="module")
def keyed(model_store, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"{KEY_B}\n")
    env = {"CHARRNN_API_KEYS": KEY_A, "CHARRNN_API_KEYS_FILE": str(keys), "CHARRNN_ADMIN_KEYS": ADMIN}
    with running(model_store, env) as server:
        yield server


def _example_request(path: str, method: str) -> tuple[str, dict | None]:
    """The path with its parameters filled in, and a valid body where the operation takes one."""
    path = path.replace("{name}", "tiny").replace("{model}", "tiny").replace("{session_id}", "s" * 32)
    body = {"/generate": {"prime": "a", "max_chars": 2, "stream": False}, "/inspect": {"text": "ab"},
            "/v1/completions": {"model": "tiny", "prompt": "a", "max_tokens": 2}}.get(path)
    return path, (body if method == "POST" else None)


def test_with_keys_no_route_but_health_readiness_and_page_answers_without_one(keyed):
    with keyed.client() as c:
        spec = c.get("/openapi.json").json()
        operations = [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops]
        assert len(operations) >= 10
        for method, template in operations:
            path, body = _example_request(template, method)
            for headers in ({}, bearer("not-a-key-0123456789"), {"Authorization": KEY_A}):
                r = c.request(method, path, json=body, headers=headers)
                if (method, template) in OPEN:
                    assert r.status_code == 200, (method, path)
                else:
                    assert r.status_code == 401, (method, path, headers, r.text)
                    assert r.json()["error"]["type"] == "authentication_error"
                    assert r.headers["www-authenticate"] == "Bearer"
            if (method, template) not in OPEN:
                assert "HTTPBearer" in str(spec["paths"][template][method.lower()].get("security")), template
                assert "401" in spec["paths"][template][method.lower()]["responses"], template
            r = c.request(method, path, json=body, headers=bearer(ADMIN))  # an admin key is also an API key
            assert r.status_code in (200, 204, 404), (method, path, r.text)
        for page in ("/", "/static/app.js"):
            assert c.get(page).status_code == 200
        assert c.get("/models", headers=bearer(KEY_B)).status_code == 200  # the key from the file
    assert KEY_A not in keyed.log_path.read_text() and ADMIN not in keyed.log_path.read_text()


def test_admin_routes_need_an_admin_key(keyed):
    with keyed.client() as c:
        r = c.post("/admin/reload", headers=bearer(KEY_A))
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert c.post("/admin/reload").status_code == 401
        r = c.post("/admin/reload", headers=bearer(ADMIN))
        assert r.status_code == 200 and r.json()["unchanged"] == ["lines", "tiny"]


def test_without_admin_keys_admin_routes_answer_only_on_loopback(model_store):
    with running(model_store) as server, server.client() as c:
        assert c.post("/admin/reload").status_code == 200
        # uvicorn takes the client address from X-Forwarded-For when the peer is a trusted (loopback) proxy:
        # this is how a request from elsewhere reaches a server behind a proxy on the same host.
        for forwarded in ("203.0.113.7", "127.0.0.1"):  # through a proxy, or claiming to be local
            r = c.post("/admin/reload", headers={"X-Forwarded-For": forwarded})
            assert r.status_code == 403 and "loopback" in r.json()["error"]["message"]


def test_sessions_belong_to_the_key_that_made_them(keyed):
    with keyed.client(headers=bearer(KEY_A)) as a, keyed.client(headers=bearer(KEY_B)) as b:
        sid = generate(a, prime="ROMEO:", max_chars=5)["session_id"]
        assert b.get(f"/sessions/{sid}").status_code == 404
        r = b.post("/generate", json={"session_id": sid, "max_chars": 5, "stream": False})
        assert r.status_code == 404 and r.json()["error"]["type"] == "session_not_found"
        assert b.delete(f"/sessions/{sid}").status_code == 404
        assert a.get(f"/sessions/{sid}").json()["generated_chars"] == 5
        assert generate(a, session_id=sid, max_chars=5)["session_id"] == sid
        assert a.delete(f"/sessions/{sid}").status_code == 204


def test_one_client_cannot_evict_everyone_elses_sessions(model_store):
    """The reproduction: new sessions from one client used to push every earlier session out (LRU)."""
    env = {"CHARRNN_API_KEYS": f"{KEY_A},{KEY_B}", "CHARRNN_MAX_SESSIONS": "10",
           "CHARRNN_CLIENT_SESSIONS": "5/hour"}
    with running(model_store, env) as server, server.client(headers=bearer(KEY_A)) as a, \
            server.client(headers=bearer(KEY_B)) as b:
        mine = [generate(a, prime="a", max_chars=1)["session_id"] for _ in range(3)]
        refused = None
        for i in range(12):
            r = b.post("/generate", json={"prime": "b", "max_chars": 1, "stream": False})
            if r.status_code != 200:
                refused = r
                break
        assert refused is not None and refused.status_code == 429 and i == 5
        assert refused.json()["error"]["type"] == "too_many_sessions"
        assert "CHARRNN_CLIENT_SESSIONS" in refused.json()["error"]["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 3600
        for sid in mine:
            assert generate(a, session_id=sid, max_chars=1)["session_id"] == sid
        assert server.metric("charrnn_sessions_active", headers=bearer(KEY_A)) == 3 + 5
        assert server.metric("charrnn_sessions_evicted_total", 'why="lru"', headers=bearer(KEY_A)) == 0


def test_past_the_request_rate_a_client_gets_429_and_others_do_not(model_store):
    env = {"CHARRNN_API_KEYS": f"{KEY_A},{KEY_B}", "CHARRNN_CLIENT_RATE": "5/minute"}
    with running(model_store, env) as server, server.client() as c:
        statuses = [c.get("/models", headers=bearer(KEY_A)).status_code for _ in range(7)]
        assert statuses == [200] * 5 + [429] * 2
        r = c.get("/models/tiny", headers=bearer(KEY_A))
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert c.get("/models", headers=bearer(KEY_B)).status_code == 200
        assert all(c.get("/healthz").status_code == 200 for _ in range(10))  # health is never limited
        assert server.metric("charrnn_requests_rejected_total", 'reason="rate_limited"', headers=bearer(KEY_B)) == 3


def _hold_streams(c: httpx.Client, n: int, **headers) -> list:
    """n generations that the client does not read: they stay open (and keep their slots)."""
    held = []
    for _ in range(n):
        cm = connect_sse(c, "POST", "/generate", json={"prime": "a", "max_chars": 1_000_000}, headers=headers)
        source = cm.__enter__()
        held.append(cm)
        assert source.response.status_code == 200
    return held


def _release(held: list) -> None:
    for cm in held:
        cm.__exit__(None, None, None)


def test_a_client_has_at_most_its_share_of_running_generations(model_store):
    env = {"CHARRNN_API_KEYS": f"{KEY_A},{KEY_B}", "CHARRNN_CLIENT_MAX_STREAMS": "2",
           "CHARRNN_MAX_CHARS": "1000000"}
    with running(model_store, env) as server, server.client() as c:
        held = _hold_streams(c, 2, **bearer(KEY_A))
        try:
            r = c.post("/generate", json={"prime": "a", "max_chars": 2, "stream": False}, headers=bearer(KEY_A))
            assert r.status_code == 429 and r.json()["error"]["type"] == "too_many_streams"
            assert r.headers["retry-after"] == "1"
            r = c.post("/generate", json={"prime": "a", "max_chars": 2, "stream": False}, headers=bearer(KEY_B))
            assert r.status_code == 200
        finally:
            _release(held)
        deadline = time.monotonic() + 10
        while server.metric("charrnn_streams_running", 'model="tiny"', headers=bearer(KEY_B)) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        r = c.post("/generate", json={"prime": "a", "max_chars": 2, "stream": False}, headers=bearer(KEY_A))
        assert r.status_code == 200


def test_replicas_share_the_limits_through_redis(model_store, redis_server):
    env = {"CHARRNN_SESSION_STORE": redis_server.url, "CHARRNN_CLIENT_RATE": "6/minute",
           "CHARRNN_CLIENT_MAX_STREAMS": "1", "CHARRNN_MAX_CHARS": "1000000"}
    a, b = Server(model_store, env).start(), Server(model_store, env).start()
    try:
        with a.client() as ca, b.client() as cb:
            held = _hold_streams(ca, 1)  # request 1, on a
            try:
                r = cb.post("/generate", json={"prime": "a", "max_chars": 2, "stream": False})  # 2, on b
                assert r.status_code == 429 and r.json()["error"]["type"] == "too_many_streams"
            finally:
                _release(held)
            deadline = time.monotonic() + 10
            while a.metric("charrnn_streams_running", 'model="tiny"') and time.monotonic() < deadline:
                time.sleep(0.05)
            assert cb.post("/generate", json={"prime": "a", "max_chars": 2, "stream": False}).status_code == 200
            # requests 3, 4 (metric reads are requests too: count them) ...
            statuses = [c.get("/models").status_code for c in (ca, cb, ca, cb)]
            assert statuses[:2] == [200, 200] and 429 in statuses
            r = cb.get("/models")
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limited"
    finally:
        a.stop()
        b.stop()


def test_request_ids_are_echoed_and_logged_as_json(model_store):
    with running(model_store) as server, server.client() as c:
        r = c.get("/models", headers={"X-Request-Id": "trace-42.a:b"})
        assert r.headers["x-request-id"] == "trace-42.a:b"
        made = c.get("/models", headers={"X-Request-Id": "bad id\twith spaces"}).headers["x-request-id"]
        assert len(made) == 32 and made != "bad id\twith spaces"
        assert len(c.get("/healthz").headers["x-request-id"]) == 32
        c.get("/generate", params={"prime": "SECRET", "max_chars": 2})
        time.sleep(0.3)
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    by_id = {line["request_id"]: line for line in lines}
    assert by_id["trace-42.a:b"] | {"time": 0, "ms": 0} == {
        "time": 0, "ms": 0, "request_id": "trace-42.a:b", "client": "address:127.0.0.1", "method": "GET",
        "path": "/models", "status": 200, "bytes": by_id["trace-42.a:b"]["bytes"]}
    assert made in by_id
    assert not any("SECRET" in json.dumps(line) for line in lines)  # no query strings (a prime) in the log


def test_cross_site_writes_are_refused_unless_the_origin_is_allowed(model_store):
    body = json.dumps({"prime": "a", "max_chars": 2, "stream": False})
    with running(model_store, {"CHARRNN_CORS_ORIGINS": "https://app.example"}) as server, server.client() as c:
        # A form or fetch() from another site with a "simple" content type needs no preflight: refused anyway.
        for headers in ({"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
                        {"Origin": "https://evil.example"}):
            for method, path in (("POST", "/admin/reload"), ("POST", "/generate"), ("DELETE", "/sessions/" + "s" * 32)):
                r = c.request(method, path, content=body, headers={**headers, "Content-Type": "text/plain"})
                assert r.status_code == 403 and r.json()["error"]["type"] == "cross_origin_forbidden", (path, r.text)
        own = {"Origin": server.url, "Sec-Fetch-Site": "same-origin", "Content-Type": "application/json"}
        assert c.post("/generate", content=body, headers=own).status_code == 200
        allowed = {"Origin": "https://app.example", "Sec-Fetch-Site": "cross-site"}
        r = c.post("/generate", content=body, headers={**allowed, "Content-Type": "application/json"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        pre = c.options("/generate", headers={**allowed, "Access-Control-Request-Method": "POST",
                                              "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
        pre = c.options("/generate", headers={"Origin": "https://evil.example",
                                              "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
    with running(model_store) as server, server.client() as c:  # CORS off by default
        r = c.get("/models", headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
