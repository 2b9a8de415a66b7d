"""Draw the loss curve of a run (train and validation loss per step) from its JSON-lines log."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(log_path: Path, png_path: Path) -> bool:
    """Draw the curve into `png_path`; False if matplotlib is not installed (the `train` extra)."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    train, val = [], []
    if Path(log_path).exists():
        for line in Path(log_path).read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry["type"] == "train":
                train.append((entry["step"], entry["loss"]))
            elif entry["type"] == "val":
                val.append((entry["step"], entry["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=0.8, alpha=0.7)
    if val:
        ax.plot(*zip(*val), label="val loss", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return True
