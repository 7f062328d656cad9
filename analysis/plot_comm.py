"""Communication per round and cumulative, by method (the "# Commu. Params(/round)" column of Table 2, over time).

    python analysis/plot_comm.py runs/*/run.h5 --out figures      # -> figures/comm.{png,pdf}

Per round and client: the mean `/rounds/upload_bytes` over the clients sampled that round (upload > 0;
the adapter LoRA of Algorithm 2 line 19) plus `/rounds/download_bytes` (global adapter LoRA, and the
emulator LoRA in re-alignment rounds, lines 9-14). The one-time sub-LLM download is not included.
"""
from __future__ import annotations

import numpy as np

from common import byte_unit, labels, legend, plot_cli, plt, reading, round_axis, save


def bytes_per_round(f) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(round, upload per sampled client, download per client) in bytes."""
    rounds = f["rounds/round"][:]
    up = f["rounds/upload_bytes"][:].astype(float).reshape(len(rounds), -1)
    sampled = up > 0
    up_mean = np.where(sampled, up, 0.0).sum(1) / np.maximum(sampled.sum(1), 1)
    return rounds, up_mean, f["rounds/download_bytes"][:].astype(float)


def plot(files: list, out: str) -> list:
    data = []
    for f in files:
        with reading(f):
            data.append(bytes_per_round(f))
    peak = max((float(np.sum(u + d)) for _, u, d in data), default=1.0)
    scale, unit = byte_unit(max(peak, 1.0))
    fig, (ax_r, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
    for (rounds, up, down), label in zip(data, labels(files)):
        total = up + down
        line, = ax_r.plot(rounds, total / scale, "o-")
        ax_r.plot(rounds, up / scale, "^:", color=line.get_color(), alpha=0.7)
        ax_c.plot(rounds, np.cumsum(total) / scale, "o-", color=line.get_color(), label=label)
    ax_r.plot([], [], "ko-", label="upload + download")
    ax_r.plot([], [], "k^:", alpha=0.7, label="upload only")
    ax_r.set(xlabel="round", ylabel=f"{unit} per client", title="Bytes per round per client")
    ax_c.set(xlabel="round", ylabel=f"cumulative {unit} per client", title="Cumulative bytes per client")
    last = max(int(rounds[-1]) for rounds, _, _ in data)
    for ax in (ax_r, ax_c):
        round_axis(ax, [1, last])
        ax.set_ylim(bottom=0)
    ax_r.legend(loc="best", fontsize=8)
    fig.tight_layout()
    legend(fig, ax_c)
    return save(fig, out, "comm")


def main() -> int:
    return plot_cli(__doc__, "rounds/upload_bytes", plot)


if __name__ == "__main__":
    raise SystemExit(main())
