"""The server answers as /openapi.json says: schemathesis against a real `charrnn serve`, every operation of the
document (streamed and not), every check that applies. No 5xx, and no answer the document does not describe.

    .venv/bin/python -m pytest tests/test_openapi_conformance.py -s    # -s prints the request count

Bounded by count, not time: at most 100 generated cases per operation in each phase (coverage, fuzzing,
stateful) with a fixed seed, so each run sends the same few thousand requests; about 20 s on two CPUs. The
schemathesis process is killed after 5 minutes whatever happens.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

from server import Server

HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
# Low limits keep each generated stream short; the document publishes them, so schemathesis stays inside.
LIMITS = {"CHARRNN_MAX_CHARS": "40", "CHARRNN_MAX_PRIME_CHARS": "200", "CHARRNN_MAX_INSPECT_CHARS": "100"}
# Thousands of requests from one address: per-client limits off (their 429s are declared, but would be most
# answers), and no access log line per request.
QUIET = {"CHARRNN_CLIENT_RATE": "", "CHARRNN_CLIENT_SESSIONS": "", "CHARRNN_ACCESS_LOG": "false"}

# Stateful testing follows the links the document declares: POST /generate -> GET and DELETE /sessions/{id},
# which is what use_after_free and ensure_resource_availability need. Schemathesis would also infer a link
# (GET /models -> GET /models/{name}) and then start only there: a POST whose body may name a session it
# never saw created counts as unlikely to succeed, so no session would ever be made.
CONFIG = """\
[phases.stateful.inference]
algorithms = []
"""

COMMAND = [
    "run",
    # Every check: the response checks (not_a_server_error, status_code_conformance, content_type_conformance,
    # response_headers_conformance, response_schema_conformance, which reads each event of a stream),
    # negative_data_rejection, missing_required_header, unsupported_method and allow_header_conformance (405
    # with Allow), use_after_free and ensure_resource_availability; ignored_auth and object_level_authorization
    # find no security scheme to test on a server without keys. positive_data_acceptance gives way to the
    # hooks' version, which lets a 422 through only where it names the model's vocabulary or layers.
    "--checks", "all",
    "--exclude-checks", "positive_data_acceptance",
    "--max-examples", "100",
    "--seed", "1",
    "--workers", "2",
    "--generation-database", "none",
    "--request-timeout", "10",
    "--continue-on-failure",
    "--no-color",
]


def requests_by_status(url: str) -> dict[str, int]:
    """Requests the server answered, by status, from its own counter (charrnn_requests_total)."""
    counts: dict[str, int] = {}
    for status, value in re.findall(r'^charrnn_requests_total\{.*status="(\d+)"\} (\S+)$',
                                    httpx.get(url + "/metrics").text, flags=re.M):
        counts[status] = counts.get(status, 0) + int(float(value))
    return counts


def test_every_answer_is_one_the_openapi_document_describes(model_store, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    server = Server(model_store, env={**LIMITS, **QUIET}).start()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), *COMMAND,
             server.url + "/openapi.json"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        answered = requests_by_status(server.url)
    finally:
        server.stop()
    summary = run.stdout[run.stdout.rfind("SUMMARY"):]
    print(f"\nschemathesis: {sum(answered.values())} requests, by status {dict(sorted(answered.items()))}\n{summary}")
    assert run.returncode == 0, run.stdout[-30_000:] + run.stderr[-5_000:]
    assert not [status for status in answered if status.startswith("5")], answered
    assert sum(answered.values()) > 1_000, answered  # it really ran
    for status in ("200", "204", "400", "404", "405", "422"):  # and reached every kind of answer that matters
        assert answered.get(status), (status, answered)


def test_the_document_states_the_running_limits(tmp_path):
    from app.main import create_app
    from app.settings import Settings

    settings = Settings(model_store=tmp_path, max_chars=40, max_prime_chars=200, max_temperature=2.5,
                        max_stop_strings=3, max_stop_chars=9, max_inspect_chars=100)
    doc = create_app(settings).openapi()
    schemas = doc["components"]["schemas"]
    body = schemas["GenerateRequest"]["properties"]
    query = {p["name"]: p["schema"] for p in doc["paths"]["/generate"]["get"]["parameters"]}
    for fields in (body, query):
        assert fields["max_chars"]["maximum"] == 40 and fields["max_chars"]["default"] == 40  # 200 clamped
        assert fields["prime"]["maxLength"] == 200 and fields["temperature"]["maximum"] == 2.5
        stop = next(s for s in fields["stop"]["anyOf"] if s.get("type") == "array")
        assert stop["maxItems"] == 3 and stop["items"] == {"type": "string", "minLength": 1, "maxLength": 9}
        seed = next(s for s in fields["seed"]["anyOf"] if s.get("type") == "integer")
        assert seed["maximum"] == 2**63 - 1 and isinstance(seed["maximum"], int)
    assert schemas["InspectRequest"]["properties"]["text"]["maxLength"] == 100
    assert "x-limited-by" not in str(doc) and "HTTPValidationError" not in str(doc)

    post = doc["paths"]["/generate"]["post"]["responses"]
    assert {"200", "400", "404", "409", "413", "422", "429", "500", "503"} <= set(post)
    events = post["200"]["content"]["text/event-stream"]["schema"]["oneOf"]
    payloads = {e["properties"]["event"]["const"]: e["properties"]["data"]["contentSchema"]["$ref"] for e in events}
    assert payloads == {"start": "#/components/schemas/StartEvent", "token": "#/components/schemas/TokenEvent",
                        "done": "#/components/schemas/GenerateResult", "error": "#/components/schemas/ErrorResponse"}
    assert {"StartEvent", "TokenEvent", "GenerateResult", "ErrorResponse"} <= set(schemas)
    get = doc["paths"]["/generate"]["get"]["responses"]
    assert list(get["200"]["content"]) == ["text/event-stream"]  # GET always streams
