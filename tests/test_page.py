"""The browser page in a real headless Chromium (Debian's, driven by Playwright) against a real server."""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from server import Server

CHROMIUM = os.environ.get("CHARRNN_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(model_store):
    srv = Server(model_store).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: install Debian's chromium (see .ci/run)"
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                       args=FLAGS, viewport={"width": 1000, "height": 800})
        yield context
        context.close()


@pytest.fixture
def page(browser, server) -> Page:
    page = browser.new_page()
    page.goto(server.url + "/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    yield page
    page.close()


def output_text(page: Page) -> str:
    return page.locator("#output").inner_text()


def test_page_lists_models_and_shows_facts(page):
    assert page.locator("#model option").all_inner_texts() == ["lines", "tiny"]
    expect(page.locator("#model")).to_have_value("tiny")
    expect(page.locator("#model-facts")).to_contain_text("2×32 LSTM")
    expect(page.locator("#error")).to_be_hidden()


def test_generate_streams_characters_into_the_output(page, server, tmp_path):
    page.fill("#prime", "ROMEO:")
    page.fill("#length", "300")
    page.fill("#seed", "4")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("done (length, 300 characters)", timeout=20_000)
    assert len(output_text(page)) == len("ROMEO:") + 300
    assert output_text(page).startswith("ROMEO:")
    expect(page.locator("#ttfc")).to_contain_text("ms")
    expect(page.locator("#rate")).to_contain_text("chars/s")
    expect(page.locator("#count")).to_have_text("300")
    # the page shows exactly what the API gives for the same request
    with server.client() as c:
        same = c.post("/generate", json={"prime": "ROMEO:", "max_chars": 300, "seed": 4, "temperature": 0.8,
                                         "stream": False}).json()
    assert output_text(page) == "ROMEO:" + same["text"]
    page.screenshot(path=tmp_path / "generate.png")


def test_stop_ends_the_stream_and_the_server_frees_it(page, server):
    page.fill("#length", "5000")
    page.click("#generate")
    page.wait_for_function("document.getElementById('count').textContent > 20")
    assert server.metric("charrnn_streams_running", 'model="tiny"') == 1
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("stopped")
    deadline = time.monotonic() + 10
    while server.metric("charrnn_streams_running", 'model="tiny"') != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("charrnn_streams_running", 'model="tiny"') == 0
    length = len(output_text(page))
    time.sleep(0.5)
    assert len(output_text(page)) == length < len("ROMEO:\n") + 5000  # nothing arrives after Stop
    expect(page.locator("#continue")).to_be_enabled()


def test_continue_appends_to_the_same_session(page, server):
    page.fill("#prime", "MENENIUS:")
    page.fill("#length", "60")
    page.fill("#seed", "9")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("done")
    first = output_text(page)
    session = page.locator("#session").inner_text()
    page.click("#continue")
    expect(page.locator("#status")).to_contain_text("done (length, 60 characters)")
    assert output_text(page).startswith(first) and len(output_text(page)) == len(first) + 60
    assert page.locator("#session").inner_text() == session
    with server.client() as c:
        assert c.get(f"/sessions/{session}").json()["generated_chars"] == 120


def generate_on_page(page: Page, prime: str, length: int, seed: int) -> None:
    page.fill("#prime", prime)
    page.fill("#length", str(length))
    page.fill("#seed", str(seed))
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text(f"done (length, {length} characters)")


def same_with_logprobs(server, prime: str, length: int, seed: int) -> dict:
    """The non-streamed answer to the request the page sends (temperature left at the page's 0.8)."""
    with server.client() as c:
        return c.post("/generate", json={"prime": prime, "max_chars": length, "seed": seed, "temperature": 0.8,
                                         "logprobs": 5, "stream": False}).json()


def percent(logprob: float) -> str:  # as the page writes a probability
    p = math.exp(logprob)
    return "<0.1%" if p < 0.001 else f"{p * 100:.1f}%"


def shown(char: str) -> str:  # as JavaScript's JSON.stringify
    return json.dumps(char, ensure_ascii=False)


def test_hovering_a_generated_character_shows_the_apis_probabilities(page, server):
    generate_on_page(page, "ROMEO:", 80, 11)
    same = same_with_logprobs(server, "ROMEO:", 80, 11)
    spans = page.locator("#output span[data-i]")  # the generated characters; the prime is plain
    expect(spans).to_have_count(80)
    assert "".join(spans.all_text_contents()) == same["text"]
    assert page.locator("#output .prime").get_attribute("data-i") is None
    panel = page.locator("#char-info")
    for k in [k for k in (0, 1, 17, 79) if same["text"][k] != "\n"]:  # a lone newline has no box to hover
        spans.nth(k).hover()
        expected = same["logprobs"][k]
        mine = panel.locator("b")
        expect(mine).to_have_text(f"{shown(expected['char'])} {percent(expected['logprob'])}")
        assert float(mine.get_attribute("data-logprob")) == expected["logprob"]  # exactly the API's
        expect(panel).to_contain_text(f"(surprise {-expected['logprob']:.2f} nats)")
        items = panel.locator(".prediction")
        expect(items).to_have_count(5)
        assert items.all_text_contents() == [f" {shown(t['char'])} {percent(t['logprob'])} "
                                             for t in expected["top_logprobs"]]
        assert [float(x) for x in items.evaluate_all("els => els.map(e => e.dataset.logprob)")] == \
            [t["logprob"] for t in expected["top_logprobs"]]
        chosen = [t["char"] == expected["char"] for t in expected["top_logprobs"]]
        assert items.evaluate_all("els => els.map(e => e.classList.contains('chosen'))") == chosen
    page.locator("#output .prime").hover()  # the prime has no probabilities: the panel stays as it was
    expect(panel.locator(".prediction")).to_have_count(5)


def test_colour_by_surprise_shades_each_character_by_its_logprob(page, server):
    page.check("#surprise")  # on while streaming: each character is shaded as it arrives
    expect(page.locator("#surprise-legend")).to_be_visible()
    generate_on_page(page, "ROMEO:", 120, 5)
    surprise = [-t["logprob"] for t in same_with_logprobs(server, "ROMEO:", 120, 5)["logprobs"]]
    spans = page.locator("#output span[data-i]")

    def alphas() -> list[float]:  # background rgba(240, 120, 0, a), a = min(1, surprise / 4 nats), kept in 1/255ths
        colours = spans.evaluate_all("els => els.map(e => e.style.backgroundColor)")
        parsed = [re.fullmatch(r"rgba?\(240, 120, 0(?:, ([\d.]+))?\)", c) for c in colours]
        assert all(parsed), colours
        return [float(m[1] or 1) for m in parsed]

    assert alphas() == pytest.approx([min(1, s / 4) for s in surprise], abs=1 / 255)
    assert len(set(alphas())) > 10
    assert page.locator("#output .prime").evaluate("e => e.style.backgroundColor") == ""
    page.uncheck("#surprise")
    expect(page.locator("#surprise-legend")).to_be_hidden()
    assert set(spans.evaluate_all("els => els.map(e => e.style.backgroundColor)")) == {""}
    page.check("#surprise")  # and back, for characters already there
    assert alphas() == pytest.approx([min(1, s / 4) for s in surprise], abs=1 / 255)


def test_continue_appends_characters_with_their_probabilities(page, server):
    """Generated and continued characters carry the model's distribution: the same as /inspect predicts after
    reading the prime and everything generated before them."""
    generate_on_page(page, "MENENIUS:", 40, 9)
    page.click("#continue")
    expect(page.locator("#status")).to_contain_text("done (length, 40 characters)")
    spans = page.locator("#output span[data-i]")
    expect(spans).to_have_count(80)
    text = "".join(spans.all_text_contents())
    with server.client() as c:
        inspected = c.post("/inspect", json={"text": "MENENIUS:" + text, "layer": 0, "units": [0]}).json()
    predictions = inspected["predictions"]
    for k in [k for k in (0, 39, 40, 41, 79) if text[k] != "\n"]:
        spans.nth(k).hover()
        items = page.locator("#char-info .prediction")
        expect(items).to_have_count(5)
        logprobs = [float(x) for x in items.evaluate_all("els => els.map(e => e.dataset.logprob)")]
        expected = predictions[len("MENENIUS:") + k - 1]  # what the model expects after the character before
        chars = [json.loads(t.strip().rsplit(" ", 1)[0]) for t in items.all_text_contents()]
        assert chars == [p["char"] for p in expected]
        assert [math.exp(x) for x in logprobs] == pytest.approx([p["p"] for p in expected], abs=6e-5)


def test_without_probabilities_the_request_and_the_text_are_as_before(page, server):
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/generate") else None)
    page.uncheck("#logprobs")
    generate_on_page(page, "ROMEO:", 50, 3)
    assert "logprobs" not in bodies[0]
    with server.client() as c:
        same = c.post("/generate", json={"prime": "ROMEO:", "max_chars": 50, "seed": 3, "temperature": 0.8,
                                         "stream": False}).json()
    assert output_text(page) == "ROMEO:" + same["text"]
    page.locator("#output span[data-i]").nth(0).hover()
    expect(page.locator("#char-info")).to_contain_text("generated without log-probabilities")


def test_unknown_prime_characters_are_flagged_and_not_sent(page, server):
    requests = []
    page.on("request", lambda r: requests.append(r.url) if r.url.endswith("/generate") else None)
    page.fill("#prime", "snow \u2603 man")
    expect(page.locator("#prime-check")).to_be_visible()
    expect(page.locator("#prime-check")).to_contain_text("U+2603")
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("does not know")
    assert requests == []
    page.fill("#prime", "snow man")
    expect(page.locator("#prime-check")).to_be_hidden()


def test_server_errors_are_shown_readably(page):
    page.fill("#length", "999999")  # above CHARRNN_MAX_CHARS
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("CHARRNN_MAX_CHARS")
    expect(page.locator("#error")).to_contain_text("422 invalid_request")
    expect(page.locator("#generate")).to_be_enabled()


def test_inspect_renders_a_heat_map_with_predictions(page, tmp_path):
    page.click("#tab-inspect")
    text = "First Citizen:\nSpeak, speak.\n"
    page.fill("#inspect-text", text)
    page.select_option("#layer", "0")
    page.click("#inspect")
    spans = page.locator("#heatmap span")
    expect(spans).to_have_count(len(text))
    colours = set(spans.evaluate_all("els => els.map(e => e.style.backgroundColor)"))
    assert len(colours) > 5 and all(c.startswith("rgba(") for c in colours)
    expect(page.locator("#suggestions button").first).to_contain_text("unit")
    before = spans.evaluate_all("els => els.map(e => e.style.backgroundColor)")
    page.click("#unit-next")
    expect(page.locator("#inspect-result")).to_have_attribute("data-unit", page.input_value("#unit"))
    assert spans.evaluate_all("els => els.map(e => e.style.backgroundColor)") != before
    spans.nth(3).hover()
    expect(page.locator("#predictions .prediction")).to_have_count(5)
    expect(page.locator("#predictions")).to_contain_text('after "s"')
    page.screenshot(path=tmp_path / "inspect.png")


def test_inspect_fetches_a_unit_that_was_not_in_the_first_answer(page, server):
    """The first answer has the suggested units only; stepping to another asks for its block of units, once."""
    answers = []
    page.on("response", lambda r: answers.append(r) if r.url.endswith("/inspect") else None)
    page.click("#tab-inspect")
    text = "First Citizen:\nSpeak, speak.\n"
    page.fill("#inspect-text", text)
    page.select_option("#layer", "0")
    page.click("#inspect")
    expect(page.locator("#heatmap span")).to_have_count(len(text))
    shown = answers[0].json()["units_shown"]
    unit = min(set(range(32)) - set(shown))  # not in the first answer
    page.fill("#unit", str(unit))
    page.dispatch_event("#unit", "change")
    expect(page.locator("#inspect-result")).to_have_attribute("data-unit", str(unit))
    assert len(answers) == 2 and answers[1].request.post_data_json["predictions"] is False
    assert unit in answers[1].request.post_data_json["units"]
    with server.client() as c:  # the heat map is the API's values of that unit
        values = c.post("/inspect", json={"text": text, "layer": 0, "kind": "cell", "units": [unit]}).json()
    expected = page.evaluate("""values => values.map((v) => {
        const probe = document.createElement("span");
        probe.style.backgroundColor = heat(v);
        return probe.style.backgroundColor;
    })""", values["activations"][0])
    assert page.locator("#heatmap span").evaluate_all("els => els.map(e => e.style.backgroundColor)") == expected
    page.locator("#heatmap span").nth(3).hover()
    value = f"{values['activations'][0][3]:.3f}".replace("-0.000", "0.000")  # as JavaScript's toFixed(3)
    expect(page.locator("#predictions")).to_contain_text(f"(unit {unit}: {value})")
    page.click("#unit-prev")  # the same block: no new request
    expect(page.locator("#inspect-result")).to_have_attribute("data-unit", str(max(0, unit - 1)))
    assert len(answers) == 2


def test_with_api_keys_the_page_asks_for_one_and_keeps_it(browser, model_store):
    key = "page-key-0123456789abcdef"
    keyed = Server(model_store, env={"CHARRNN_API_KEYS": key}).start()
    try:
        page = browser.new_page()
        page.goto(keyed.url + "/")  # the page itself is open; the API answers 401 until a key is given
        expect(page.locator("#key-form")).to_be_visible()
        expect(page.locator("#error")).to_contain_text("authentication_error")
        page.fill("#api-key", "wrong-key-0123456789abcdef")
        page.click("#use-key")
        expect(page.locator("#key-form")).to_be_visible()
        page.fill("#api-key", key)
        page.click("#use-key")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(page.locator("#key-form")).to_be_hidden()
        page.fill("#prime", "ROMEO:")
        page.fill("#length", "40")
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("done (length, 40 characters)")
        page.reload()  # kept in the browser: no question the second time
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(page.locator("#key-form")).to_be_hidden()
        assert page.evaluate("localStorage.getItem('charrnn-api-key')") == key
        page.evaluate("localStorage.removeItem('charrnn-api-key')")
        page.close()
    finally:
        keyed.stop()
