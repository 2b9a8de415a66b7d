"""Looking inside a model as it reads a text: next-character predictions and one layer's hidden units.

This is the post's "visualizing the predictions and the neuron firing": for every character of a text,
the model's top next-character guesses and the activation of every unit of a chosen layer, either the
LSTM cell `tanh(c)` or the output `h` (both lie in [-1, 1]). `interesting_units` ranks units by how
strongly they follow simple properties of the text (position in the line, inside quotes, ...), as a
starting point for finding a neuron that means something.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from charrnn.engine import Engine

KINDS = ("cell", "hidden")


@dataclass
class Trace:
    activations: np.ndarray  # (T, H) float32 in [-1, 1]: the chosen layer after each character
    top_ids: np.ndarray  # (T, k) int: most likely next characters after each character
    top_probs: np.ndarray  # (T, k) float32


def trace(engine: Engine, ids: list[int], layer: int, kind: str = "cell", top_k: int = 5) -> Trace:
    """Read `ids` from the model's start; return `layer`'s activations and the top-k predictions per character.

    The numbers are the served model's own: the engine that generates text computes them.
    """
    cfg = engine.config
    if not 0 <= layer < cfg.layers:
        raise ValueError(f"layer must be in 0..{cfg.layers - 1}, not {layer}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if kind == "cell" and cfg.cell != "lstm":
        raise ValueError(f"only an LSTM has a cell state; this model is a {cfg.cell.upper()}, use kind 'hidden'")
    h, c, logits = engine.trace(ids, layer)
    acts = torch.tanh(c) if kind == "cell" else h
    probs = torch.softmax(logits, dim=-1)
    top = probs.topk(min(top_k, probs.shape[1]), dim=-1)
    return Trace(acts.numpy().astype(np.float32), top.indices.numpy(), top.values.numpy().astype(np.float32))


def text_features(text: str) -> dict[str, np.ndarray]:
    """Simple per-character properties of a text that a unit might track."""
    n = len(text)
    feats = {name: np.zeros(n, dtype=np.float32) for name in
             ("position in line", "inside quotes", "inside brackets", "after punctuation", "newline",
              "uppercase", "position in word", "line ends with ':'")}
    col = word = depth = 0
    quoted = False
    for t, ch in enumerate(text):
        feats["position in line"][t] = col
        feats["position in word"][t] = word
        if ch == '"':
            quoted = not quoted
        feats["inside quotes"][t] = quoted
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        feats["inside brackets"][t] = depth > 0
        feats["after punctuation"][t] = t > 0 and text[t - 1] in ".,;:!?"
        feats["newline"][t] = ch == "\n"
        feats["uppercase"][t] = ch.isupper()
        col = 0 if ch == "\n" else col + 1
        word = 0 if ch.isspace() else word + 1
    start = 0
    for line in text.split("\n"):  # characters of a line that ends with ':' (a speaker's name in Shakespeare)
        feats["line ends with ':'"][start:start + len(line)] = line.endswith(":")
        start += len(line) + 1
    return feats


def interesting_units(text: str, acts: np.ndarray, limit: int = 8) -> list[dict]:
    """Units worth a look: per text feature the unit that correlates best with it, then the most variable ones."""
    found: list[dict] = []
    centered = acts - acts.mean(axis=0)
    spread = np.sqrt((centered**2).sum(axis=0)) + 1e-8
    for name, feat in text_features(text).items():
        f = feat - feat.mean()
        if not f.any():
            continue  # the feature is constant in this text
        r = (f @ centered) / (np.sqrt((f**2).sum()) * spread)
        unit = int(np.abs(r).argmax())
        found.append({"unit": unit, "reason": name, "score": round(float(r[unit]), 3)})
    found.sort(key=lambda s: -abs(s["score"]))
    found = found[: max(0, limit - 3)]
    variance = acts.var(axis=0)
    taken = {s["unit"] for s in found}
    busiest = [int(u) for u in np.argsort(-variance) if int(u) not in taken][:3]
    found += [{"unit": u, "reason": "high variance", "score": round(float(variance[u]), 3)} for u in busiest]
    return found
