"""How one unit behaves over the whole held-out text: correlation with each text property, and its mean
activation where a property holds and where it does not.

    .venv/bin/python tools/neuron_stats.py 0:cell:92 1:hidden:24

Reads the last 10% of tiny-shakespeare (the validation split) in chunks of 2,000 characters, each from the
zero state, as POST /inspect does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from charrnn.activations import text_features, trace
from charrnn.checkpoint import load_model
from charrnn.engine import Engine

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("units", nargs="+", help="layer:kind:unit")
    parser.add_argument("--model", type=Path, default=REPO / "model_store" / "shakespeare.safetensors")
    parser.add_argument("--chunk", type=int, default=2000)
    args = parser.parse_args()
    model, vocab, _ = load_model(args.model)
    engine = Engine(model)  # the server's engine and precision, as POST /inspect
    text = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    val = text[int(len(text) * 0.9):]
    chunks = [val[i:i + args.chunk] for i in range(0, len(val) - args.chunk + 1, args.chunk)]
    for spec in args.units:
        layer, kind, unit = spec.split(":")
        acts, feats = [], {}
        for chunk in chunks:
            acts.append(trace(engine, [vocab.index[c] for c in chunk], int(layer), kind).activations[:, int(unit)])
            for name, values in text_features(chunk).items():
                feats.setdefault(name, []).append(values)
        a = np.concatenate(acts)
        print(f"layer {layer} {kind} unit {unit}: {len(a):,} characters, mean {a.mean():+.3f}")
        for name, parts in feats.items():
            f = np.concatenate(parts)
            r = np.corrcoef(f, a)[0, 1]
            binary = set(np.unique(f)) <= {0.0, 1.0}
            split = f"  mean where true {a[f == 1].mean():+.3f}, false {a[f == 0].mean():+.3f}" if binary else ""
            print(f"  {name:<20} r = {r:+.3f}{split}")


if __name__ == "__main__":
    main()
