"""POST /inspect and GET / against a real server: the numbers of the offline computation, what an answer may
cost, and clean refusals."""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from app.service import INSPECT_NICE, Service
from app.settings import Settings
from charrnn.activations import text_features, trace
from charrnn.checkpoint import load_model, save_model
from charrnn.engine import Engine
from charrnn.model import CharRNN, ModelConfig
from conftest import SHAKESPEARE
from server import Server

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
LONG = SHAKESPEARE.read_text(encoding="utf-8")[:2_000]  # the longest text the default settings allow


@pytest.fixture(scope="module")
def server(model_store):
    srv = Server(model_store).start()  # CHARRNN_MAX_INSPECT_CHARS: the default, 2,000
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def offline_trace(store, text: str, layer: int, kind: str):
    model, vocab, _ = load_model(store / "tiny.safetensors")
    return vocab, trace(Engine(model), [vocab.index[c] for c in text], layer, kind)  # the server's precision


def test_inspect_returns_predictions_and_activations_of_the_model(client, model_store):
    r = client.post("/inspect", json={"model": "tiny", "text": TEXT, "layer": 0, "kind": "cell"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["layer"] == 0 and body["kind"] == "cell" and body["units"] == 32
    assert body["max_units"] == 64
    assert "".join(body["chars"]) == TEXT
    shown = body["units_shown"]  # by default: the suggested units
    assert shown == list(dict.fromkeys(s["unit"] for s in body["suggestions"])) and 0 < len(shown) <= 8
    acts = np.array(body["activations"])
    assert acts.shape == (len(shown), len(TEXT)) and np.abs(acts).max() <= 1
    vocab, expected = offline_trace(model_store, TEXT, 0, "cell")
    assert np.allclose(acts, expected.activations[:, shown].T, atol=5.1e-4)  # rounded to 3 decimals on the wire
    first = body["predictions"][0]
    assert [p["char"] for p in first] == [vocab.chars[i] for i in expected.top_ids[0]]
    assert all(len(row) == 5 for row in body["predictions"])
    assert all(a["p"] >= b["p"] for row in body["predictions"] for a, b in zip(row, row[1:]))
    reasons = [s["reason"] for s in body["suggestions"]]
    assert reasons.count("high variance") == 3 and set(reasons) <= {*text_features(TEXT), "high variance"}
    assert all(0 <= s["unit"] < 32 for s in body["suggestions"])


def test_named_units_are_exactly_those_of_the_full_trace(client, model_store):
    units = [31, 0, 7, 7, 16]
    r = client.post("/inspect", json={"model": "tiny", "text": LONG, "layer": 1, "kind": "hidden", "units": units,
                                      "predictions": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["units_shown"] == [31, 0, 7, 16] and body["predictions"] is None  # in the order asked, once each
    _, expected = offline_trace(model_store, LONG, 1, "hidden")
    acts = np.array(body["activations"])
    assert acts.shape == (4, len(LONG))
    assert np.allclose(acts, expected.activations[:, [31, 0, 7, 16]].T, atol=5.1e-4)
    assert all(len(repr(v)) <= 6 for row in body["activations"] for v in row)  # 3 decimals, not 17 digits


def test_a_max_length_answer_is_bounded(client):
    """2,000 characters: the suggested units (at most 8) and 5 predictions per character, not every unit.

    Every unit of the 2 x 32 test model was 0.79 MB before; of the bundled 2 x 512 model, 14 MB."""
    r = client.post("/inspect", json={"model": "tiny", "text": LONG})
    assert r.status_code == 200, r.text
    # per character: up to 8 values of at most 7 bytes ("-0.123,"), 5 predictions of at most 26 bytes
    # ({"char":"\n","p":0.1234},), the character itself (at most 5 bytes)
    assert len(r.content) <= 2_000 * (8 * 7 + 5 * 26 + 5) + 2_000, len(r.content)
    body = r.json()
    assert len(body["chars"]) == 2_000 and len(body["units_shown"]) <= 8
    named = client.post("/inspect", json={"model": "tiny", "text": LONG, "units": list(range(32)),
                                          "predictions": False})
    assert named.status_code == 200 and len(named.content) <= 2_000 * (32 * 7 + 5) + 2_000, len(named.content)


def test_the_inspect_thread_computes_with_one_torch_thread_niced(tmp_path):
    """The decode loop keeps its threads (the process default); the inspect thread takes one, at low priority."""
    service = Service(Settings(model_store=tmp_path))
    base = os.getpriority(os.PRIO_PROCESS, 0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as app/main.py does for the decode loop, here with two
    try:
        inside = service.inspector.submit(torch.get_num_threads).result()
        nice = service.inspector.submit(os.getpriority, os.PRIO_PROCESS, 0).result()
        tid = service.inspector.submit(threading.get_native_id).result()
        with ThreadPoolExecutor(1) as fresh:  # a decoder started after the inspect thread
            later = fresh.submit(torch.get_num_threads).result()
    finally:
        service.inspector.shutdown()
        torch.set_num_threads(before)
    assert inside == 1 and later == 2
    if sys.platform == "linux":
        assert tid != threading.get_native_id() and nice == min(19, base + INSPECT_NICE)
        assert os.getpriority(os.PRIO_PROCESS, 0) == base  # this thread (and the process) unchanged


@pytest.fixture(scope="module")
def slow_server(model_store, tmp_path_factory):
    """A server with an untrained 2 x 512 LSTM (a 2,000-character inspection takes ~1 s) and no waiting room."""
    store = tmp_path_factory.mktemp("slow-store")
    _, vocab, _ = load_model(model_store / "tiny.safetensors")
    torch.manual_seed(0)
    save_model(store / "wide.safetensors", CharRNN(ModelConfig(len(vocab), layers=2, hidden=512)).eval(), vocab, {})
    srv = Server(store, env={"CHARRNN_INSPECT_QUEUE": "1", "CHARRNN_DEFAULT_MODEL": "wide"}).start()
    yield srv
    srv.stop()


def test_past_the_queue_inspections_are_refused_with_retry_after(slow_server):
    """One computes, CHARRNN_INSPECT_QUEUE=1 waits, the third of three at once gets 429; the slots come back."""
    barrier = threading.Barrier(3)

    def inspect(_):
        with slow_server.client(timeout=60) as c:
            barrier.wait(10)
            return c.post("/inspect", json={"text": LONG})

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(inspect, range(3)))
    assert sorted(r.status_code for r in answers) == [200, 200, 429], [r.text[:200] for r in answers]
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "overloaded" and "CHARRNN_INSPECT_QUEUE" in refused.text
    with slow_server.client() as c, ThreadPoolExecutor(2) as pool:  # both slots were given back
        again = pool.map(lambda text: c.post("/inspect", json={"text": text}), [LONG, "ab"])
        assert [r.status_code for r in again] == [200, 200]


def test_inspect_defaults_to_the_last_layer_cell_state(client):
    body = client.post("/inspect", json={"text": "ab"}).json()
    assert body["model"] == "tiny" and body["layer"] == 1 and body["kind"] == "cell"


@pytest.mark.parametrize(
    "body, status, kind, fragment",
    [
        ({"text": ""}, 422, "invalid_request", "text"),
        ({"text": "a" * 2_001}, 422, "invalid_request", "CHARRNN_MAX_INSPECT_CHARS"),
        ({"text": "snow \u2603"}, 422, "unknown_characters", "U+2603"),
        ({"text": "ab", "layer": 2}, 422, "invalid_request", "layers 0..1"),
        ({"text": "ab", "units": list(range(65))}, 422, "invalid_request", "CHARRNN_MAX_INSPECT_UNITS"),
        ({"text": "ab", "units": [3, 32, 40]}, 422, "invalid_request", "no such units: 32, 40; layer 1"),
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
