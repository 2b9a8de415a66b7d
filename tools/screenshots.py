"""Screenshots of the browser page for the docs, taken in headless Chromium against the bundled model.

    .venv/bin/python -m tools.screenshots                      # docs/page-generate.png, docs/inspect-*.png
    .venv/bin/python -m tools.screenshots --unit 1:cell:83@30000   # layer:kind:unit[@offset], repeatable

(from the project root, as a module: it borrows bench/'s server process.)

Starts `charrnn serve` on a free 127.0.0.1 port with model_store/, drives the page like a user would
(type a prime, Generate; paste a text, Inspect, pick a unit) and stops the server by its PID.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from bench.server_proc import ServerProcess

REPO = Path(__file__).resolve().parent.parent

CHROMIUM = os.environ.get("CHARRNN_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def held_out_text(chars: int, offset: int) -> str:
    """A piece of the last 10% of tiny-shakespeare (the validation split), starting at a line."""
    text = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    val = text[int(len(text) * 0.9):]
    start = val.index("\n\n", offset) + 2
    return val[start:start + chars]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unit", action="append", default=None, help="layer:kind:unit[@offset in the held-out text] to show [1:cell:83]")
    parser.add_argument("--chars", type=int, default=700, help="length of the inspected text")
    parser.add_argument("--offset", type=int, default=30_000, help="where in the held-out text it starts")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    units = args.unit or ["1:cell:83"]
    serve = [sys.executable, "-m", "cli", "serve", "--host", "127.0.0.1", "--log-level", "warning"]
    with ServerProcess(serve, env={"CHARRNN_MODEL_STORE": str(REPO / "model_store")}) as server, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 960, "height": 760})
        page.goto(server.url + "/")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")

        page.fill("#prime", "ROMEO:\n")
        page.fill("#length", "600")
        page.fill("#seed", "1")
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("done", timeout=60_000)
        page.screenshot(path=args.out / "page-generate.png")
        print("wrote", args.out / "page-generate.png")

        page.click("#tab-inspect")
        for spec in units:
            spec, _, offset = spec.partition("@")
            layer, kind, unit = spec.split(":")
            page.fill("#inspect-text", held_out_text(args.chars, int(offset or args.offset)))
            page.evaluate("document.getElementById('inspect-result').dataset.shown = ''")
            page.select_option("#layer", layer)
            page.select_option("#kind", kind)
            page.click("#inspect")
            expect(page.locator("#inspect-result")).to_have_attribute("data-shown", f"{layer}:{kind}")
            expect(page.locator("#heatmap span")).to_have_count(args.chars)
            page.fill("#unit", unit)
            page.dispatch_event("#unit", "change")
            # a unit outside the first answer is fetched (a block of units) before its heat map shows
            expect(page.locator("#inspect-result")).to_have_attribute("data-unit", unit)
            page.locator("#heatmap span").nth(40).hover()
            path = args.out / f"inspect-layer{layer}-{kind}-{unit}.png"
            page.screenshot(path=path, full_page=True)
            print("wrote", path)
        browser.close()


if __name__ == "__main__":
    main()
