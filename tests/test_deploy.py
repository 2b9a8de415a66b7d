"""The deployment files, checked as far as this machine allows (it has no Docker engine).

- The Dockerfile passes hadolint; docker-compose.yml passes `docker-compose config` in every profile.
- The server is started with the command, environment and paths that the Dockerfile and the compose file
  give (parsed from them): it gets ready, streams from the bundled model, passes the image's HEALTHCHECK
  command, and stops inside compose's stop_grace_period. The only substitutions are the ones a container
  makes: container paths become the host folders that compose mounts there, the `redis` host becomes a
  local redis-server, and the listening address becomes a free 127.0.0.1 port.
- deploy/nginx.conf in a real nginx in front of two replicas: characters arrive one by one, and a session
  continues across the replicas behind it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import REPO
from server import Server, free_port, generate, stream_events, streamed_text

BIN = Path(sys.executable).parent


def dockerfile() -> dict:
    """The Dockerfile's instructions that matter here: ENV (merged), WORKDIR, CMD and HEALTHCHECK (exec form)."""
    text = (REPO / "Dockerfile").read_text()
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    parsed: dict = {"env": {}}
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            parsed["env"].update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
        elif word == "WORKDIR":
            parsed["workdir"] = rest.strip()
        elif word == "CMD":
            parsed["cmd"] = json.loads(rest)
        elif word == "HEALTHCHECK":
            parsed["healthcheck"] = json.loads(rest[rest.index("CMD") + 3:])
            parsed["healthcheck_options"] = rest[: rest.index("CMD")].split()
    return parsed


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def seconds(duration: str) -> float:
    return float(duration.rstrip("s"))


def test_dockerfile_passes_hadolint():
    run = subprocess.run([str(BIN / "hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("profile", [None, "replicas", "train"])
def test_compose_file_is_valid(profile):
    extra = ["--profile", profile] if profile else []
    run = subprocess.run(["docker-compose", "-f", str(REPO / "docker-compose.yml"), *extra, "config", "-q"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr


def test_image_and_compose_agree():
    df, services = dockerfile(), compose()["services"]
    api = services["api"]
    assert df["cmd"][:2] == ["charrnn", "serve"] and "--workers" not in df["cmd"]  # one worker per container
    assert df["healthcheck"] == api["healthcheck"]["test"][1:]  # the same readiness probe
    assert "/readyz" in " ".join(df["healthcheck"]) and "curl" not in " ".join(df["healthcheck"])
    # graceful shutdown: our grace + uvicorn's 2 s margin fit inside compose's stop timeout
    grace = float(api["environment"]["CHARRNN_SHUTDOWN_GRACE_S"])
    assert grace + 2 < seconds(api["stop_grace_period"])
    # nginx waits longer than the keep-alive ping interval before calling a quiet stream dead
    nginx = (REPO / "deploy" / "nginx.conf").read_text()
    assert "proxy_buffering off;" in nginx
    read_timeout = float(re.search(r"proxy_read_timeout (\d+)s;", nginx).group(1))
    assert read_timeout > float(api["environment"]["CHARRNN_SSE_PING_S"])
    # the image keeps runs, tests and the repository out
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "tests", "data"} <= set(ignored)
    for service in ("replica", "train"):
        assert services[service]["profiles"]
    # the replicas run as the api does, and trust the client address that nginx (their only peer) sets
    assert services["replica"]["environment"] == {**api["environment"], "FORWARDED_ALLOW_IPS": "*"}
    assert "ports" not in services["replica"] and "proxy_set_header X-Forwarded-For $remote_addr;" in nginx


def as_on_this_machine(value: str, volumes: list[str], workdir: str, redis_url: str) -> str:
    """A container's value, with its paths and hosts replaced by what compose would have mounted or linked."""
    for volume in volumes:
        host, container = volume.split(":")[:2]
        if value == container or value.startswith(container + "/"):
            return str((REPO / host).resolve()) + value[len(container):]
    if value.startswith("redis://redis:6379"):
        return redis_url + value[len("redis://redis:6379/0"):]
    if value.startswith(workdir + "/"):
        return str(REPO / value[len(workdir) + 1:])
    return value


def test_the_server_runs_as_the_container_would(redis_server, tmp_path):
    df, api = dockerfile(), compose()["services"]["api"]
    port = free_port()
    env = {k: as_on_this_machine(str(v), api["volumes"], df["workdir"], redis_server.url)
           for k, v in {**df["env"], **api["environment"]}.items()}
    assert env["CHARRNN_MODEL_STORE"] == str(REPO / "model_store")
    cmd = list(df["cmd"])
    cmd[0] = str(BIN / cmd[0])  # the console script, as `pip install .` put it on the image's PATH
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    cmd[cmd.index("--port") + 1] = str(port)
    server = Server(REPO / "model_store", env=env, command=cmd, port=port, test_defaults=False,
                    log=tmp_path / "server.log").start(timeout=120)
    probe = [str(BIN / "python") if df["healthcheck"][0] == "python" else df["healthcheck"][0],
             *(part.replace(":8000/", f":{port}/") for part in df["healthcheck"][1:])]
    try:
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["status"] == "ready"
        with server.client() as c:
            assert c.get("/models").json()["default"] == "shakespeare"
            events = stream_events(c, {"prime": "ROMEO:", "max_chars": 100, "seed": 1})
            assert len(streamed_text(events)) == 100 and events[0][1]["model"] == "shakespeare"
        assert subprocess.run(probe, timeout=10).returncode == 0
        started = time.monotonic()
        # uvicorn shuts down cleanly, then re-raises SIGTERM, so the exit status is the signal's (143 in Docker)
        assert server.stop(signal.SIGTERM, timeout=30) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < seconds(compose()["services"]["api"]["stop_grace_period"])
        assert "Application shutdown complete" in (tmp_path / "server.log").read_text()
        assert subprocess.run(probe, timeout=10, capture_output=True).returncode != 0  # unhealthy once down
    finally:
        server.stop()


# --- nginx in front of two replicas ---


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    assert found, "nginx is missing: install Debian's nginx (tools/system-deps.sh)"
    return found


@pytest.fixture(scope="module")
def balanced(model_store, redis_server, tmp_path_factory):
    """deploy/nginx.conf with its upstreams pointed at two local replicas; yields (nginx url, replicas)."""
    env = {"CHARRNN_SESSION_STORE": redis_server.url, "FORWARDED_ALLOW_IPS": "*"}  # as docker-compose.yml
    replicas = [Server(model_store, env=env).start() for _ in range(2)]
    folder = tmp_path_factory.mktemp("nginx")
    port = free_port()
    site = (REPO / "deploy" / "nginx.conf").read_text()
    site, count = re.subn(r"server replica:8000;",
                          " ".join(f"server 127.0.0.1:{r.port};" for r in replicas), site)
    assert count == 1
    site = site.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    (folder / "site.conf").write_text(site)
    user = "user root;" if os.geteuid() == 0 else ""  # workers otherwise run as nobody, without access here
    temp = " ".join(f"{kind}_temp_path {folder}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                      "scgi"))
    (folder / "nginx.conf").write_text(
        f"{user}\ndaemon off;\nworker_processes 1;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log;\n"
        f"events {{ worker_connections 512; }}\n"
        f"http {{ access_log off; {temp} include {folder}/site.conf; }}\n")
    proc = subprocess.Popen([nginx_binary(), "-c", str(folder / "nginx.conf"), "-p", str(folder),
                             "-e", str(folder / "error.log")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert proc.poll() is None, (folder / "error.log").read_text()
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", replicas
    proc.terminate()
    proc.wait(10)
    for r in replicas:
        r.stop()


def test_characters_pass_through_nginx_one_by_one(balanced):
    url, _ = balanced
    arrivals: list[tuple[float, int]] = []  # (time, token events in this network read)
    with httpx.Client(base_url=url, timeout=30) as client:
        started = time.perf_counter()
        with client.stream("POST", "/generate", json={"prime": "ROMEO:", "max_chars": 300}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for chunk in response.iter_raw():
                arrivals.append((time.perf_counter() - started, chunk.count(b"event: token")))
    tokens = sum(n for _, n in arrivals)
    assert tokens == 300
    # unbuffered: the characters come in many small reads spread over the generation, not in a few big ones
    reads_with_tokens = [n for _, n in arrivals if n]
    assert len(reads_with_tokens) >= 100, f"{len(reads_with_tokens)} reads for 300 characters"
    assert max(reads_with_tokens) <= 20


def test_a_session_continues_through_nginx_whichever_replica_answers(balanced):
    url, replicas = balanced
    with httpx.Client(base_url=url, timeout=30) as client:
        whole = generate(client, prime="ROMEO:", max_chars=120, temperature=0)["text"]
        sid = generate(client, prime="ROMEO:", max_chars=40, temperature=0)["session_id"]
        parts = [generate(client, session_id=sid, max_chars=40, temperature=0)["text"] for _ in range(2)]
        first = whole[:40]
        assert first + "".join(parts) == whole
    served = [r.metric("charrnn_generated_chars_total", 'model="tiny"') for r in replicas]
    assert all(n > 0 for n in served)  # nginx spread the requests over both replicas


def test_replicas_see_the_address_nginx_saw_not_one_the_client_claims(balanced):
    """The replicas trust X-Forwarded-For (per-client limits count clients, not nginx); nginx replaces it."""
    url, replicas = balanced
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(4):
            r = client.get("/models", headers={"X-Forwarded-For": f"198.51.100.{i}", "X-Request-Id": f"xff-{i}"})
            assert r.status_code == 200
    time.sleep(0.3)
    lines = [json.loads(line) for r in replicas for line in r.log_path.read_text().splitlines()
             if line.startswith("{")]
    seen = {line["request_id"]: line["client"] for line in lines if line["request_id"].startswith("xff-")}
    assert seen == {f"xff-{i}": "address:127.0.0.1" for i in range(4)}
