"""Accuracy and training loss per federated round (Algorithm 2, lines 15-21), one line per run.

    python analysis/plot_rounds.py runs/*/run.h5 --out figures      # -> figures/rounds.{png,pdf}

Accuracy: `/rounds/eval_acc` where evaluated, the base model (`/base` accuracy) at round 0 and
the final full LLM + adapter (`/final` accuracy) at the last round. Loss: `/rounds/train_loss` [R, N]
averaged over the clients that trained (NaN = not sampled), with the min-max band over clients.
"""
from __future__ import annotations

import numpy as np

from common import labels, legend, plot_cli, plt, reading, round_axis, save


def accuracy_points(f) -> tuple[np.ndarray, np.ndarray]:
    """(round, accuracy) of every evaluation of the full LLM + adapter, base model at round 0."""
    rounds = f["rounds/round"][:].astype(float)
    acc = f["rounds/eval_acc"][:].astype(float)
    keep = ~np.isnan(acc)
    x, y = list(rounds[keep]), list(acc[keep])
    final = f["final"].attrs if "final" in f else {}
    base = f["base"].attrs.get("accuracy") if "base" in f else final.get("base_accuracy")  # /base: runs in progress
    if base is not None:
        x, y = [0.0] + x, [float(base)] + y
    if "accuracy" in final and len(rounds):
        x, y = x + [float(rounds[-1])], y + [float(final["accuracy"])]
    return np.array(x), np.array(y)


def loss_curve(f) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(round, mean, min, max) of the clients' training loss per round, ignoring clients that did not train."""
    rounds = f["rounds/round"][:].astype(float)
    loss = f["rounds/train_loss"][:].astype(float).reshape(len(rounds), -1)
    trained = ~np.all(np.isnan(loss), axis=1)
    loss = loss[trained]
    return rounds[trained], np.nanmean(loss, 1), np.nanmin(loss, 1), np.nanmax(loss, 1)


def plot(files: list, out: str) -> list:
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    last = 1
    for f, label in zip(files, labels(files)):
        with reading(f):
            (x, y), (r, mean, lo, hi) = accuracy_points(f), loss_curve(f)
            last = max(last, int(f["rounds/round"][-1]))
        line, = ax_acc.plot(x, 100 * y, "o-", label=label)
        ax_loss.plot(r, mean, "o-", color=line.get_color(), label=label)
        if len(r) > 1:
            ax_loss.fill_between(r, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        else:  # one round: the band is a bar
            ax_loss.errorbar(r, mean, yerr=[mean - lo, hi - mean], color=line.get_color(), capsize=5)
    ax_acc.set(xlabel="round", ylabel="accuracy of full LLM + adapter (%)", title="Accuracy (round 0 = base model)")
    ax_loss.set(xlabel="round", ylabel="client training loss",
                title="Training loss (mean, band = min-max over clients)")
    round_axis(ax_acc, [0, last])
    round_axis(ax_loss, [1, last])
    fig.tight_layout()
    legend(fig, ax_acc)
    return save(fig, out, "rounds")


def main() -> int:
    return plot_cli(__doc__, "rounds/round", plot)


if __name__ == "__main__":
    raise SystemExit(main())
