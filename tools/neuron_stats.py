"""How one unit behaves over the whole held-out text: correlation with each text property, and its mean
activation where a property holds and where it does not. With --search, the units of every layer and kind
that follow a property best.

    .venv/bin/python tools/neuron_stats.py 1:cell:83 1:cell:376
    .venv/bin/python tools/neuron_stats.py --search "position in line" --search "line ends with ':'"

Reads the last 10% of tiny-shakespeare (the validation split) in chunks of 2,000 characters, each from the
model's start state, as POST /inspect does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from charrnn.activations import KINDS, text_features, trace
from charrnn.checkpoint import load_model
from charrnn.engine import Engine

REPO = Path(__file__).resolve().parent.parent
FEATURES = list(text_features(""))


def read(engine: Engine, index: dict[str, int], chunks: list[str], layer: int, kind: str) -> np.ndarray:
    """(characters, units): one layer's activations over all chunks, each read from the model's start."""
    return np.concatenate([trace(engine, [index[c] for c in chunk], layer, kind).activations for chunk in chunks])


def correlations(feature: np.ndarray, acts: np.ndarray) -> np.ndarray:
    """Pearson r of every unit (column of acts) with the feature, in float64 as np.corrcoef."""
    f = feature - feature.mean(dtype=np.float64)
    a = acts - acts.mean(axis=0, dtype=np.float64)
    return (f @ a) / (np.sqrt((f**2).sum()) * np.sqrt((a**2).sum(axis=0)) + 1e-12)


def search(engine: Engine, index: dict[str, int], chunks: list[str], feats: dict[str, np.ndarray],
           names: list[str], top: int) -> None:
    feats = {name: feats[name] for name in names}
    found: dict[str, list[tuple[float, str]]] = {name: [] for name in names}
    kinds = KINDS if engine.config.cell == "lstm" else ("hidden",)
    for layer in range(engine.config.layers):
        for kind in kinds:
            acts = read(engine, index, chunks, layer, kind)
            for name, f in feats.items():
                found[name] += [(float(r), f"{layer}:{kind}:{u}") for u, r in enumerate(correlations(f, acts))]
    for name, units in found.items():
        print(f"{name}: the {top} units of {len(units):,} that follow it best")
        for r, spec in sorted(units, key=lambda x: -abs(x[0]))[:top]:
            print(f"  {spec:<14} r = {r:+.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("units", nargs="*", help="layer:kind:unit")
    parser.add_argument("--search", action="append", default=[], choices=FEATURES, metavar="FEATURE",
                        help=f"rank every unit by |r| with this property, repeatable: {', '.join(FEATURES)}")
    parser.add_argument("--top", type=int, default=5, help="units listed per searched property")
    parser.add_argument("--model", type=Path, default=REPO / "model_store" / "shakespeare.safetensors")
    parser.add_argument("--chunk", type=int, default=2000)
    args = parser.parse_args()
    if not args.units and not args.search:
        parser.error("name a unit (layer:kind:unit) or a property to --search")
    model, vocab, _ = load_model(args.model)
    engine = Engine(model)  # the server's engine and precision, as POST /inspect
    text = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    val = text[int(len(text) * 0.9):]
    chunks = [val[i:i + args.chunk] for i in range(0, len(val) - args.chunk + 1, args.chunk)]
    feats = {name: np.concatenate([text_features(chunk)[name] for chunk in chunks]) for name in FEATURES}
    if args.search:
        search(engine, vocab.index, chunks, feats, args.search, args.top)
    layers: dict[tuple[int, str], np.ndarray] = {}  # units of one layer and kind share one read
    for spec in args.units:
        layer, kind, unit = spec.split(":")
        if (int(layer), kind) not in layers:
            layers[int(layer), kind] = read(engine, vocab.index, chunks, int(layer), kind)
        a = layers[int(layer), kind][:, int(unit)]
        print(f"layer {layer} {kind} unit {unit}: {len(a):,} characters, mean {a.mean():+.3f}")
        for name, f in feats.items():
            if f.min() == f.max():
                print(f"  {name:<20} constant over this text")
                continue
            r = np.corrcoef(f, a)[0, 1]
            if set(np.unique(f)) <= {0.0, 1.0}:
                detail = f"mean where true {a[f == 1].mean():+.3f}, false {a[f == 0].mean():+.3f}"
            else:  # a count (position in line or word): the mean at some of its values
                detail = "mean at " + ", ".join(f"{v} {a[f == v].mean():+.2f}" for v in range(0, 60, 10)
                                                if (f == v).sum() >= 100)
            print(f"  {name:<20} r = {r:+.3f}  {detail}")


if __name__ == "__main__":
    main()
