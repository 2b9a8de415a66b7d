"""POST /inspect and GET / against a real server: the numbers of the offline computation, and clean refusals."""

from __future__ import annotations

import numpy as np
import pytest

from charrnn.activations import text_features, trace
from charrnn.checkpoint import load_model
from charrnn.engine import Engine
from server import Server

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


@pytest.fixture(scope="module")
def server(model_store):
    srv = Server(model_store, env={"CHARRNN_MAX_INSPECT_CHARS": "300"}).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def test_inspect_returns_predictions_and_activations_of_the_model(client, model_store):
    r = client.post("/inspect", json={"model": "tiny", "text": TEXT, "layer": 0, "kind": "cell"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["layer"] == 0 and body["kind"] == "cell" and body["units"] == 32
    assert "".join(body["chars"]) == TEXT
    acts = np.array(body["activations"])
    assert acts.shape == (len(TEXT), 32) and np.abs(acts).max() <= 1
    model, vocab, _ = load_model(model_store / "tiny.safetensors")
    expected = trace(Engine(model), [vocab.index[c] for c in TEXT], 0, "cell")  # the server's precision
    assert np.allclose(acts, expected.activations, atol=5.1e-4)  # rounded to 3 decimals on the wire
    first = body["predictions"][0]
    assert [p["char"] for p in first] == [vocab.chars[i] for i in expected.top_ids[0]]
    assert all(len(row) == 5 for row in body["predictions"])
    assert all(a["p"] >= b["p"] for row in body["predictions"] for a, b in zip(row, row[1:]))
    reasons = [s["reason"] for s in body["suggestions"]]
    assert reasons.count("high variance") == 3 and set(reasons) <= {*text_features(TEXT), "high variance"}
    assert all(0 <= s["unit"] < 32 for s in body["suggestions"])


def test_inspect_defaults_to_the_last_layer_cell_state(client):
    body = client.post("/inspect", json={"text": "ab"}).json()
    assert body["model"] == "tiny" and body["layer"] == 1 and body["kind"] == "cell"


@pytest.mark.parametrize(
    "body, status, kind, fragment",
    [
        ({"text": ""}, 422, "invalid_request", "text"),
        ({"text": "a" * 301}, 422, "invalid_request", "CHARRNN_MAX_INSPECT_CHARS"),
        ({"text": "snow \u2603"}, 422, "unknown_characters", "U+2603"),
        ({"text": "ab", "layer": 2}, 422, "invalid_request", "layers 0..1"),
        ({"text": "ab", "kind": "gates"}, 422, "invalid_request", "kind"),
        ({"text": "ab", "model": "nope"}, 404, "model_not_found", "nope"),
        ({"text": "ab", "model": "../etc"}, 422, "invalid_request", "model"),
        ({"text": "ab", "extra": 1}, 422, "invalid_request", "extra"),
    ],
)
def test_inspect_refusals_are_clear_json(client, body, status, kind, fragment):
    r = client.post("/inspect", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == kind and fragment in err["message"]
    assert client.get("/healthz").status_code == 200


def test_the_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for src in ("/static/app.js", "/static/style.css"):
        assert src in page.text
        asset = client.get(src)
        assert asset.status_code == 200 and len(asset.content) > 500
    assert "http" not in client.get("/static/app.js").text.replace("http://", "")  # nothing from elsewhere
    assert client.get("/static/../app/main.py").status_code == 404
