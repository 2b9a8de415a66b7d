"""The post's experiments: one recipe per corpus (experiments/<corpus>.toml), trained and measured the same way.

    .venv/bin/python experiments/run.py train linux --data-dir DIR    # charrnn train with the recipe
    .venv/bin/python experiments/run.py measure linux --data-dir DIR  # samples and checks -> runs/experiments/
    .venv/bin/python experiments/run.py doc                            # docs/experiments.md from those results
    .venv/bin/python experiments/run.py doc linux                      # only linux's row and section redone

`DIR` holds the corpora (the file names are in the recipes; see docs/experiments.md for where they come
from). `train --gpu` applies the recipe's [gpu] table on top of [train]. Each run writes its checkpoint to
model_store/<name>.safetensors and its log to runs/<name>/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "runs" / "experiments"
ORDER = ["shakespeare", "paulgraham", "wikipedia", "latex", "linux", "babynames"]
SAMPLE_CHARS = 600
SEED = 1
TEMPERATURE_PRIME = "JULIET:\nO Romeo, Romeo"  # Shakespeare: one prime at four temperatures
SAMPLED_WITH_DROPOUT = {"wikipedia"}  # runs whose logged samples predate the engine (57836a5): dropout was on


def recipe(corpus: str) -> dict:
    return tomllib.loads((REPO / "experiments" / f"{corpus}.toml").read_text())


def train_command(corpus: str, data_dir: Path, gpu: bool, rerun: bool = False) -> list[str]:
    """`charrnn train` with the recipe. `rerun`: the same run under <name>-rerun, its checkpoint kept out of
    model_store/ (in runs/experiments/store/), to check that the recipe gives the committed model's loss."""
    r = recipe(corpus)
    options = {**r["train"], **(r.get("gpu", {}) if gpu else {})}
    name = r["name"] + ("-rerun" if rerun else "")
    # `-m charrnn` is the `charrnn` command, which re-executes itself under the allocator settings (up to 1.65x
    # for nn.LSTM here); `-m cli` would train without them, slower within the same --max-minutes.
    argv = [sys.executable, "-m", "charrnn", "train", "--data", str(data_dir / r["data"]), "--name", name,
            "--overwrite"]
    if rerun:
        argv += ["--model-store", str(RESULTS / "store")]
    for key, value in options.items():
        if isinstance(value, bool):  # a switch: --locked-dropout / --no-locked-dropout
            argv.append(f"--{key}" if value else f"--no-{key}")
        else:
            argv += [f"--{key}", str(value)]
    return argv


# --- measurements ---


def unigram_entropy(text: str) -> float:
    """Entropy of the character frequencies, nats per character: the loss of a model that ignores context."""
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log(c / n) for c in counts.values())


PAIRS = {")": "(", "]": "[", "}": "{"}


def bracket_check(text: str, code: bool) -> dict:
    """Closing brackets against the innermost open one; for C, string/char literals and comments are skipped.

    `matched`: closes the innermost open bracket; `mismatched`: another bracket is open (a real nesting
    error); `unopened`: nothing is open (in a piece cut from a longer text, it was opened before the piece).
    Brackets still open at the end are counted apart, since a piece can end anywhere.
    """
    stack: list[str] = []
    counts = {"matched": 0, "mismatched": 0, "unopened": 0}
    i = 0
    while i < len(text):
        ch = text[i]
        if code and text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = len(text) if end < 0 else end + 2
            continue
        if code and text.startswith("//", i):
            end = text.find("\n", i)
            i = len(text) if end < 0 else end + 1
            continue
        if code and ch in "\"'":
            j = i + 1
            while j < len(text) and text[j] != ch and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if not code and ch == "\\" and i + 1 < len(text):
            i += 2  # \{ and \} are literal braces in LaTeX
            continue
        if ch in "([{":
            stack.append(ch)
        elif ch in PAIRS:
            _close(stack, PAIRS[ch], counts)
        i += 1
    return {**counts, "open_at_end": len(stack)}


def _close(stack: list[str], opener: str, counts: dict) -> None:
    if not stack:
        counts["unopened"] += 1
    elif stack[-1] == opener:
        stack.pop()
        counts["matched"] += 1
    else:
        counts["mismatched"] += 1


def environment_check(text: str) -> dict:
    """\\begin{x} ... \\end{x}: the same counts as `bracket_check`, with environment names as brackets."""
    stack: list[str] = []
    counts = {"matched": 0, "mismatched": 0, "unopened": 0}
    for kind, env in re.findall(r"\\(begin|end)\{([^}\n]*)\}", text):
        if kind == "begin":
            stack.append(env)
        else:
            _close(stack, env, counts)
    return {**counts, "open_at_end": len(stack)}


def totals(checks: list[dict]) -> dict:
    out = {key: sum(c[key] for c in checks) for key in ("matched", "mismatched", "unopened", "open_at_end")}
    closings = out["matched"] + out["mismatched"]
    out["match_rate"] = out["matched"] / closings if closings else None
    out["samples"] = len(checks)
    out["samples_without_mismatch"] = sum(c["mismatched"] == 0 for c in checks)
    return out


def measure(corpus: str, data_dir: Path, n_checks: int) -> dict:
    import torch

    from charrnn.checkpoint import load_model
    from charrnn.engine import Engine

    torch.set_num_threads(2)
    r = recipe(corpus)
    text = (data_dir / r["data"]).read_text(encoding="utf-8")
    path = REPO / "model_store" / f"{r['name']}.safetensors"
    model, vocab, info = load_model(path)
    engine = Engine(model)  # the server's inference path and precision
    training = info.training
    train_cfg = training.get("train_config", {})

    def sample(temperature: float, length: int = SAMPLE_CHARS, seed: int = SEED, prime: str | None = None) -> str:
        return "".join(engine.generate(vocab, r["prime"] if prime is None else prime, length,
                                       temperature=temperature, seed=seed))

    result = {
        "corpus": corpus, "name": r["name"], "data_file": r["data"], "chars": len(text), "vocab": len(vocab),
        "unigram_nats": unigram_entropy(text), "parameters": model.num_parameters(),
        "config": model.config.to_dict(), "recipe": r["train"], "gpu": r.get("gpu", {}),
        "val_frac": train_cfg.get("val_frac"), "steps": training.get("steps"), "epoch": training.get("epoch"),
        "best_val_loss": training.get("best_val_loss"), "best_val_bpc": training.get("best_val_bpc"),
        "train_seconds_at_best": training.get("train_seconds"), "checkpoint_mb": path.stat().st_size / 1e6,
        "prime": r["prime"],
        "samples": {"argmax": sample(0.0), "0.5": sample(0.5), "1.0": sample(1.0)},
        "measured": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
    }
    run_file = RESULTS / f"{corpus}.train.json"
    if run_file.exists():
        result["run"] = json.loads(run_file.read_text())
    rerun = RESULTS / "store" / f"{r['name']}-rerun.safetensors"
    if rerun.exists():
        facts = load_model(rerun)[2].training
        result["rerun"] = {**json.loads((RESULTS / f"{corpus}.rerun.json").read_text()),
                           "best_val_loss": facts["best_val_loss"], "best_val_bpc": facts["best_val_bpc"],
                           "steps": facts["steps"], "train_seconds_at_best": facts["train_seconds"]}
        log = REPO / "runs" / f"{r['name']}-rerun" / "log.jsonl"  # its samples show the training
    else:
        log = REPO / "runs" / r["name"] / "log.jsonl"
    if log.exists():
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        result["evolution"] = [{"step": e["step"], "text": e["text"]} for e in entries if e["type"] == "sample"]
        result["val_curve"] = [(e["step"], e["val_loss"]) for e in entries if e["type"] == "val"]
    if corpus == "shakespeare":
        result["temperature_prime"] = TEMPERATURE_PRIME
        result["temperatures"] = {str(t): sample(t, 400, prime=TEMPERATURE_PRIME) for t in (0.0, 0.5, 1.0, 1.5)}
    if corpus == "babynames":
        known = set(text.split())
        names: list[str] = []
        seed = 0
        while len(names) < n_checks:
            lines = sample(1.0, 2000, seed=seed, prime="\n").split("\n")[:-1]  # the last line may be cut
            names += [n for n in lines if n]
            seed += 1
        names = names[:n_checks]
        result["names"] = {"sampled": len(names), "novel": sum(n not in known for n in names),
                           "distinct": len(set(names)), "examples_novel": [n for n in names if n not in known][:40]}
    if corpus in ("latex", "linux"):
        code = corpus == "linux"
        samples = [r["prime"] + sample(t, 2000, seed=s) for t in (0.5, 1.0) for s in range(n_checks // 2)]
        # real text of the same length that starts like the samples (with the prime), from the held-out end
        val = text[len(text) - int(len(text) * r["train"].get("val-frac", 0.1)):]
        starts = [m.start() for m in re.finditer(re.escape(r["prime"]), val)][:: 3][: len(samples)]
        real = [val[i: i + len(samples[0])] for i in starts]
        result["brackets"] = {"samples": totals([bracket_check(s, code) for s in samples]),
                              "real": totals([bracket_check(s, code) for s in real])}
        if corpus == "latex":
            result["environments"] = {"samples": totals([environment_check(s) for s in samples]),
                                      "real": totals([environment_check(s) for s in real])}
    return result


# --- the doc ---

# Remarks that go with the measured results (numbers in braces are filled in from them).
NOTES = {
    "wikipedia": "The weakest model here: 1,522 distinct characters (1,401 of them occur fewer than 100 times) and "
                 "{epoch:.1f} epochs in the budget. It has learned the markup (`[[links]]`, tags, indentation) and the shape of words "
                 "more than the words themselves; argmax settles into a run of spaces.",
    "latex": "Less than one epoch ({epoch:.2f}) fits the budget, yet the loss is the lowest of the six: the "
             "Stacks project's LaTeX repeats its macros and phrases a lot. Argmax loops on \"the same as\".",
    "linux": "Less than one epoch ({epoch:.2f}) fits the budget.",
    "babynames": "The best checkpoint is early (the text is small, and later steps overfit it); the run went on "
                 "to its epoch limit.",
}


def fence(text: str) -> list[str]:
    return ["```", text.replace("```", "'''"), "```"]


def check_table(check: dict) -> list[str]:
    """Markdown rows of a bracket or environment check: the samples against the held-out text."""
    rows = ["| text | matched | mismatched | unopened | matched / (matched + mismatched) | pieces without a mismatch "
            "| open at the end |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, t in (("samples", check["samples"]), ("held-out text", check["real"])):
        rate = "—" if t["match_rate"] is None else f"{t['match_rate']:.1%}"
        rows.append(f"| {label} | {t['matched']:,} | {t['mismatched']:,} | {t['unopened']:,} | {rate} | "
                    f"{t['samples_without_mismatch']} / {t['samples']} | {t['open_at_end']:,} |")
    return rows + [""]


def gpu_runs(corpus: str) -> str:
    """What the recipe's comment says its GPU runs gave, or that there were none."""
    text = (REPO / "experiments" / f"{corpus}.toml").read_text()
    return "its runs: the recipe's comment" if "Run once" in text or "Runs:" in text else "not run yet"


def render(results: dict[str, dict]) -> str:
    out = ["# The post's experiments: six corpora, six models", "",
           "Every number and sample here was produced by `experiments/run.py` (commands below) on this project's",
           "2-core CPU machine; the date is given per section. Samples are generated with seed 1 from the prime",
           "shown. The trivial baseline is the unigram entropy of the corpus: the loss of a model that knows the",
           "character frequencies but no context.", "",
           "```sh",
           "for c in shakespeare paulgraham wikipedia latex linux babynames; do",
           "  .venv/bin/python experiments/run.py train $c --data-dir DIR    # DIR: the folder with the corpora",
           "  .venv/bin/python experiments/run.py measure $c --data-dir DIR",
           "done",
           ".venv/bin/python experiments/run.py doc",
           "```", "",
           "| corpus | chars | vocab | model | params | train time | val loss nats (bits) / char | unigram baseline |",
           "|---|---:|---:|---|---:|---:|---:|---:|"]
    for corpus in ORDER:
        r = results.get(corpus)
        if r is None:
            out.append(f"| {corpus} | not measured | | | | | | |")
            continue
        c = r["config"]
        seconds = r.get("run", {}).get("seconds") or r["train_seconds_at_best"]
        seconds_note = "" if r.get("run") else " *"
        out.append(f"| {corpus} | {r['chars']:,} | {r['vocab']:,} | {c['layers']}x{c['hidden']} {c['cell'].upper()} | "
                   f"{r['parameters']:,} | {seconds / 60:.1f} min{seconds_note} | {r['best_val_loss']:.3f} ({r['best_val_bpc']:.3f}) | "
                   f"{r['unigram_nats']:.3f} ({r['unigram_nats'] / math.log(2):.3f}) |")
    out += ["", "Train time is the wall-clock time of the `train` command; * marks the time the best checkpoint "
            "took, for a model not retrained here. Validation losses are those of the best checkpoint.", ""]
    # The same models measured by other protocols (`charrnn evaluate`), written by hand beside the recipes.
    out += (REPO / "experiments" / "evaluation.md").read_text(encoding="utf-8").rstrip().splitlines()
    for corpus in ORDER:
        r = results.get(corpus)
        if r is None:
            continue
        c = r["config"]
        run = r.get("run", {})
        out += ["", f"## {corpus}", "",
                f"Measured {r['measured']} ({r['machine']}). Data: `{r['data_file']}`, {r['chars']:,} characters, "
                f"vocabulary {r['vocab']:,}; the last {r['val_frac']:.0%} is held out for validation.", "",
                f"- Recipe: `experiments/{corpus}.toml` ({', '.join(f'{k} {v}' for k, v in r['recipe'].items())}).",
                f"- Model: {c['layers']} x {c['hidden']} {c['cell'].upper()}, embedding {c['embed']}, "
                f"{r['parameters']:,} parameters, checkpoint {r['checkpoint_mb']:.1f} MB.",
                f"- Training: best checkpoint at step {r['steps']:,} (epoch {r['epoch']:.2f}), after "
                f"{r['train_seconds_at_best'] / 60:.1f} min of training"
                + (f"; the whole run took {run['seconds'] / 60:.1f} min wall-clock" if run else "") + ".",
                f"- Validation loss: **{r['best_val_loss']:.3f} nats/char ({r['best_val_bpc']:.3f} bits/char)** against "
                f"{r['unigram_nats']:.3f} nats ({r['unigram_nats'] / math.log(2):.3f} bits) for the unigram baseline.",
                f"- On a GPU: `train --gpu` uses {', '.join(f'{k} {v}' for k, v in recipe(corpus).get('gpu', {}).items())} "
                f"({gpu_runs(corpus)}).", ""]
        if corpus == "shakespeare" and not run:
            samples = ("the rerun below logged samples during training" if "rerun" in r else
                       "so there are no samples during training here: wikipedia's below show how a model's text "
                       "evolves, and the previous 2 x 512 model's are in this page's git history, up to commit "
                       "1454cd0")
            out += ["This is the bundled model. It was trained once with the recipe's settings (`charrnn train` "
                    f"with the flags above, without `--sample-every`; {samples}); its run, loss curve and what "
                    "it costs the server are in docs/models.md.", ""]
        if "rerun" in r:
            rr = r["rerun"]
            out += [f"The recipe was run again on {rr['date']} (`experiments/run.py train {corpus} --rerun`, the "
                    "same settings under another name, outside `model_store/`): best validation loss "
                    f"**{rr['best_val_loss']:.3f} nats/char ({rr['best_val_bpc']:.3f} bits)** at step "
                    f"{rr['steps']:,}, after {rr['train_seconds_at_best'] / 60:.1f} min; the whole run took "
                    f"{rr['seconds'] / 60:.1f} min. Its samples are the ones shown under *Samples during "
                    "training* below.", ""]
        if corpus in NOTES:
            out += [NOTES[corpus].format(**r), ""]
        for label in ("argmax", "0.5", "1.0"):
            title = "argmax (temperature 0)" if label == "argmax" else f"temperature {label}"
            out += [f"**{title}**, prime {json.dumps(r['prime'])}:", ""] + fence(r["prime"] + r["samples"][label]) + [""]
        if "names" in r:
            n = r["names"]
            out += [f"**Novel names**: of {n['sampled']:,} names sampled at temperature 1.0, **{n['novel']:,} "
                    f"({n['novel'] / n['sampled']:.0%}) are not in the training list** ({n['distinct']:,} distinct). "
                    "The post reports about 90%. Some of the new ones:", "",
                    ", ".join(n["examples_novel"]), ""]
        if "brackets" in r:
            b = r["brackets"]
            what = "`()`, `[]`, `{}` outside strings and comments" if corpus == "linux" else "`{}` (not `\\{`), `[]`, `()`"
            out += [f"**Brackets** ({what}), in {b['samples']['samples']} samples of 2,000 characters after the "
                    "prime (half at temperature 0.5, half at 1.0) and, for comparison, up to as many pieces of the "
                    "held-out text of the same length that start with the prime. A closing bracket is *matched* "
                    "when it closes the innermost open one, *mismatched* when another one is open (a nesting "
                    "error), *unopened* when none is (in a piece of real text: opened before the piece); a piece "
                    "can end anywhere, so brackets still open at its end are not errors:", ""]
            out += check_table(b)
        if "environments" in r:
            e = r["environments"]
            out += ["**`\\begin{x}` ... `\\end{x}`** in the same pieces, counted the same way:", ""] + check_table(e)
        if r.get("evolution"):
            wanted = [100, 300, 500, 700, 1200, 2000]
            steps = {e["step"]: e["text"] for e in r["evolution"]}
            last = max(steps)
            shown = [s for s in wanted if s in steps] + ([last] if last not in wanted else [])
            run_name = r["name"] + ("-rerun" if "rerun" in r else "")
            last_step = r["rerun"]["steps"] if "rerun" in r else r["steps"]
            out += ["### Samples during training", "",
                    f"The trainer's `--sample-every {r['recipe'].get('sample-every')}` option logged a sample "
                    "(temperature 1, no prime) every that many steps to `runs/"
                    f"{run_name}/log.jsonl`; here those at steps {', '.join(map(str, shown))} (its best checkpoint "
                    f"is at step {last_step:,}). "
                    + ("The trainer of that run drew them with dropout still on (fixed since: the inference engine "
                       "draws them, without dropout), so they are noisier than the model was at each step."
                       if corpus in SAMPLED_WITH_DROPOUT else
                       "The trainer draws them with the server's inference engine, without dropout."), ""]
            for s in shown:
                out += [f"**step {s}**", ""] + fence(steps[s]) + [""]
        if "temperatures" in r:
            out += ["### Temperature", "",
                    f"The same prime, {json.dumps(r['temperature_prime'])}, at four temperatures (seed 1). At 0 the model "
                    "always takes its most likely character, and the text falls into loops; higher temperatures "
                    "give more variety and, at 1.5, more mistakes.", ""]
            for t, text in r["temperatures"].items():
                label = "0 (argmax)" if float(t) == 0 else t
                out += [f"**temperature {label}**", ""] + fence(r["temperature_prime"] + text) + [""]
    return "\n".join(out) + "\n"


def sections(page: str) -> tuple[list[str], dict[str, list[str]]]:
    """A page's lines before the first corpus section, and each corpus's section (its `## corpus` heading on)."""
    head: list[str] = []
    parts: dict[str, list[str]] = {}
    current = head
    for line in page.splitlines():
        if line.startswith("## ") and line[3:].strip() in ORDER:
            current = parts.setdefault(line[3:].strip(), [])
        current.append(line)
    return head, parts


def splice(old: str, new: str, corpus: str) -> str:
    """`new` (rendered from one corpus's results) with every other corpus's row and section taken from `old`,
    so that one model can be measured again without the other five's results on this machine."""
    old_head, old_parts = sections(old)
    new_head, new_parts = sections(new)
    old_rows: dict[str, str] = {}  # each corpus's first row: the summary table's (the protocols table follows)
    for line in old_head:
        for c in ORDER:
            if line.startswith(f"| {c} | "):
                old_rows.setdefault(c, line)
    head = []
    for line in new_head:
        other = next((c for c in ORDER if c != corpus and line.startswith(f"| {c} | ")), None)
        head.append(old_rows.get(other, line) if other and line.startswith(f"| {other} | not measured |") else line)
    body = [line for c in ORDER for line in (new_parts if c == corpus else old_parts).get(c, [])]
    return "\n".join(head + body) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["train", "measure", "doc"])
    parser.add_argument("corpus", nargs="?", choices=ORDER)
    parser.add_argument("--data-dir", type=Path, default=REPO / "data" / "corpora")
    parser.add_argument("--gpu", action="store_true", help="train with the recipe's [gpu] settings")
    parser.add_argument("--rerun", action="store_true", help="train as <name>-rerun, outside model_store/")
    parser.add_argument("--checks", type=int, default=1000, help="names sampled / 2,000-char pieces (latex, linux: /50)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.action == "train":
        argv = train_command(args.corpus, args.data_dir, args.gpu, args.rerun)
        print(" ".join(argv[1:]), flush=True)
        started = time.monotonic()
        subprocess.run(argv, check=True, cwd=REPO)
        (RESULTS / f"{args.corpus}.{'rerun' if args.rerun else 'train'}.json").write_text(json.dumps(
            {"seconds": round(time.monotonic() - started, 1), "command": ["charrnn", *argv[3:]],
             "date": datetime.date.today().isoformat()}, indent=2))
    elif args.action == "measure":
        checks = args.checks if args.corpus == "babynames" else max(2, args.checks // 50)
        result = measure(args.corpus, args.data_dir, checks)
        (RESULTS / f"{args.corpus}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
        print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "evolution", "temperatures")},
                         indent=1, ensure_ascii=False)[:3000])
    else:
        results = {c: json.loads((RESULTS / f"{c}.json").read_text()) for c in ORDER
                   if (RESULTS / f"{c}.json").exists() and args.corpus in (None, c)}
        page = REPO / "docs" / "experiments.md"
        if args.corpus is None:
            page.write_text(render(results), encoding="utf-8")
        elif args.corpus not in results:
            sys.exit(f"no results for {args.corpus}: run `measure {args.corpus}` first")
        else:
            page.write_text(splice(page.read_text(encoding="utf-8"), render(results), args.corpus), encoding="utf-8")
        print(f"wrote docs/experiments.md ({', '.join(results)})")


if __name__ == "__main__":
    main()
