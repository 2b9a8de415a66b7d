"""Where a new text starts: the candidate start states compared, by the start metric (training/start.py).

    .venv/bin/python experiments/start.py train [--steps 1200] [--jobs 2]  # tiny-shakespeare, one budget
    .venv/bin/python experiments/start.py bundled --data-dir DIR          # every model of model_store/
    .venv/bin/python experiments/start.py echo                            # /v1 echo scoring, start vs zeros
    .venv/bin/python experiments/start.py table                           # the markdown tables

`train`: 2x256 models trained on tiny-shakespeare for the same number of steps from the same seed with one
thread each: a plain run (its start chosen among zeros, newlines, the mean line-start state and a state fitted
afterwards) and runs that learn the start with the model (`--learn-start P`, which adds that candidate). Each
run ends by choosing its start; its log's `start` entry holds every candidate's loss.

`bundled`: `charrnn choose-start` on each model of model_store/ with its corpus from DIR (the recipes name the
files), which measures the candidates and writes the best into the checkpoint. For the Shakespeare model it
also gives P(newline) right after speaker names, read from each candidate start.

`echo`: `charrnn serve` on 127.0.0.1 with the bundled Shakespeare model twice, as stored and with its start set
to zeros (what it served before), scoring ECHO_TEXTS held-out passages of ECHO_CHARS characters that begin at
line starts through `/v1/completions` with `echo`, `max_tokens: 0` and `logprobs: 0`: the mean -log p of every
character but each text's first, as a client scoring texts sees it.

Results go to runs/start/; docs/models.md ("Where a text starts") shows the tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "runs" / "start"
DATA = REPO / "data" / "tinyshakespeare.txt"
BASELINE = ["--layers", "2", "--hidden", "256", "--dropout", "0.2", "--lr", "2e-3", "--precision", "fp32",
            "--eval-every", "100", "--seed", "1337", "--threads", "1"]
VARIANTS = {
    "plain": [],
    "learn-start 0.05": ["--learn-start", "0.05"],
    "learn-start 0.25": ["--learn-start", "0.25"],
}
SPEAKERS = ["ROMEO:", "JULIET:", "KING RICHARD III:", "KING:", "QUEEN:", "DUKE:", "First Citizen:", "MENENIUS:",
            "GLOUCESTER:"]
KINDS = ["zero", "newline", "two-newlines", "mean-line-start", "learned", "tuned"]
ECHO_TEXTS = 100
ECHO_CHARS = 256


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def charrnn() -> str:
    return str(Path(sys.executable).parent / "charrnn")


def train(name: str, options: list[str], steps: int) -> dict:
    folder = OUT / slug(name)
    command = [charrnn(), "train", "--data", str(DATA), "--name", folder.name, "--run-dir", str(folder),
               "--model-store", str(OUT / "store"), "--overwrite", "--max-steps", str(steps), *BASELINE, *options]
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    entries = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    vals = [e for e in entries if e["type"] == "val"]
    start = [e for e in entries if e["type"] == "start"][-1]
    result = {"name": name, "options": options, "steps": steps, "best_val": min(v["val_loss"] for v in vals),
              "start": start, "seconds": round(time.monotonic() - started),
              "speakers": speaker_newlines(OUT / "store" / f"{folder.name}.safetensors", DATA)}
    (OUT / f"train-{folder.name}.json").write_text(json.dumps(result, indent=1))
    print(f"{name}: best val {result['best_val']:.4f}; start {start['kind']} {start['loss']:.4f}", flush=True)
    return result


def speaker_newlines(checkpoint: Path, data: Path) -> dict[str, dict[str, float]]:
    """P(newline) after each speaker name, read from each candidate start of the model (the stored one too)."""
    import torch

    from charrnn.checkpoint import load_model
    from training.data import split
    from training.start import candidates

    model, vocab, info = load_model(checkpoint)
    ids = torch.from_numpy(vocab.encode(data.read_text(encoding="utf-8")))
    train_ids, val_ids = split(ids, 0.1)
    states = {c.kind: c.state for c in candidates(model, train_ids, val_ids, vocab, learned=False, tune=False)}
    states["stored"] = tuple(s.detach() for s in model.start_state(1))
    out = {}
    with torch.inference_mode():
        for kind, state in states.items():
            out[kind] = {}
            for name in SPEAKERS:
                logits, _ = model(torch.from_numpy(vocab.encode(name)).long()[None], state)
                out[kind][name] = round(torch.softmax(logits[0, -1], -1)[vocab.index["\n"]].item(), 3)
    return out


def bundled(data_dir: Path) -> None:
    for recipe_path in sorted((REPO / "experiments").glob("*.toml")):
        recipe = tomllib.loads(recipe_path.read_text())
        name, data = recipe["name"], data_dir / recipe["data"]
        checkpoint = REPO / "model_store" / f"{name}.safetensors"
        started = time.monotonic()
        done = subprocess.run([charrnn(), "choose-start", str(checkpoint), "--data", str(data)], check=True,
                              capture_output=True, text=True)
        result = {"name": name, "start": json.loads(done.stdout), "seconds": round(time.monotonic() - started)}
        if name == "shakespeare":
            result["speakers"] = speaker_newlines(checkpoint, data)
        (OUT / f"bundled-{name}.json").write_text(json.dumps(result, indent=1))
        print(f"{name}: {result['start']['kind']} {result['start']['loss']:.4f} "
              f"(zero {result['start']['candidates']['zero']:.4f}), {result['seconds']} s", flush=True)


def echo() -> dict:
    import os
    import shutil
    import signal
    import socket
    import tempfile

    import httpx
    import torch

    from charrnn.checkpoint import load_model, read_metadata, save_model
    from training.data import split
    from training.start import passages

    source = REPO / "model_store" / "shakespeare.safetensors"
    model, vocab, info = load_model(source)
    ids = torch.from_numpy(vocab.encode(DATA.read_text(encoding="utf-8")))
    texts = [vocab.decode(row.tolist()) for row in passages(split(ids, 0.1)[1], vocab, ECHO_TEXTS, ECHO_CHARS - 1)]
    with tempfile.TemporaryDirectory() as store:
        shutil.copy(source, Path(store) / "shakespeare.safetensors")
        model.set_start(model.init_state(1))
        training = {k: v for k, v in info.training.items() if k != "weights_dtype"}
        save_model(Path(store) / "shakespeare-zero.safetensors", model, vocab, training,
                   dtype=info.training["weights_dtype"])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "CHARRNN_MODEL_STORE": store}
        server = subprocess.Popen([charrnn(), "serve", "--port", str(port), "--log-level", "warning"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            result = {"texts": len(texts), "chars": ECHO_CHARS,
                      "start": read_metadata(source).start["kind"]}
            with httpx.Client(base_url=url, timeout=120) as client:
                for name in ("shakespeare", "shakespeare-zero"):
                    total = count = 0
                    for text in texts:
                        r = client.post("/v1/completions", json={"model": name, "prompt": text, "max_tokens": 0,
                                                                 "echo": True, "logprobs": 0})
                        r.raise_for_status()
                        scored = r.json()["choices"][0]["logprobs"]["token_logprobs"][1:]
                        total -= sum(scored)
                        count += len(scored)
                    result[name] = round(total / count, 4)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    (OUT / "echo.json").write_text(json.dumps(result, indent=1))
    print(f"/v1 echo over {len(texts)} held-out texts of {ECHO_CHARS} characters: {result['shakespeare']:.4f} "
          f"nats/char from the stored start ({result['start']}), {result['shakespeare-zero']:.4f} from zeros")
    return result


def table() -> str:
    rows = []
    for prefix, title in (("train", "tiny-shakespeare, 2x256, one budget"), ("bundled", "bundled models")):
        results = [json.loads(p.read_text()) for p in sorted(OUT.glob(f"{prefix}-*.json"))]
        if not results:
            continue
        rows += [f"**{title}**", "", "| model | " + " | ".join(KINDS) + " | chosen |",
                 "|---|" + "---:|" * (len(KINDS) + 1)]
        for r in results:
            found = r["start"]["candidates"]
            label = r["name"] + (f" (best val {r['best_val']:.4f})" if "best_val" in r else "")
            rows.append(f"| {label} | " + " | ".join(f"{found[k]:.4f}" if k in found else "—" for k in KINDS)
                        + f" | {r['start']['kind']} |")
        rows.append("")
        speakers = [r for r in results if "speakers" in r]
        for r in speakers:
            rows += [f"P(newline) after a speaker name, {r['name']}:", "",
                     "| read from | " + " | ".join(SPEAKERS) + " | min |", "|---|" + "---:|" * (len(SPEAKERS) + 1)]
            for kind, ps in r["speakers"].items():
                rows.append(f"| {kind} | " + " | ".join(f"{ps[s]:.2f}" for s in SPEAKERS)
                            + f" | {min(ps.values()):.2f} |")
            rows.append("")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["train", "bundled", "echo", "table"])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="variant names to train (default: all)")
    parser.add_argument("--data-dir", type=Path, help="the corpora, for `bundled`")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.what == "train":
        variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda item: train(item[0], item[1], args.steps), variants.items()))
    elif args.what == "bundled":
        if args.data_dir is None:
            parser.error("bundled needs --data-dir")
        bundled(args.data_dir)
    elif args.what == "echo":
        echo()
        return
    print(table())


if __name__ == "__main__":
    main()
