"""The SGP distance profile (Algorithm 1) with the chosen groups, and the drift of the aligned layers.

    python analysis/plot_distance_profile.py runs/NAME/run.h5 [...] --out figures
        # -> figures/distance_profile_<run name>.{png,pdf}, one pair per run

Left: heatmap of `/sgp/distance[n-1, l] = d(x^l, x^{l+n})` (NaN where l + n is past the emulator),
the chosen groups (t_i, t_i + n) of `/sgp/groups` boxed at row n. Right: `/drift/distance` [K, p], the
angular distance between sub-LLM layer s_i and full-LLM layer t_i + n (the L_inter pair of ODA) per
round, with the re-alignment rounds (`/rounds/realigned` == 1) as vertical lines.
"""
from __future__ import annotations

import numpy as np
from matplotlib.patches import Rectangle
from matplotlib.patheffects import withStroke

from common import plot_cli, plt, reading, round_axis, run_label, run_name, save


def heatmap(ax, f) -> None:
    dist = np.ma.masked_invalid(f["sgp/distance"][:].astype(float))
    n_max, layers = dist.shape
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    im = ax.imshow(dist, cmap=cmap, aspect="auto", origin="lower", interpolation="nearest",
                   extent=(-0.5, layers - 0.5, 0.5, n_max + 0.5))
    plt.colorbar(im, ax=ax, label=r"angular distance $d(x^l, x^{l+n})$")
    groups = f["sgp/groups"][:] if "sgp/groups" in f else np.zeros((0, 2), int)
    for t, end in groups:
        ax.add_patch(Rectangle((t - 0.5, end - t - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        ax.text(t, end - t, f"{t}\u2192{end}", ha="center", va="center", color="white", fontsize=7,
                rotation=90 if layers > 14 else 0, fontweight="bold",
                path_effects=[withStroke(linewidth=2, foreground="black")])
    ax.set(xlabel="emulator layer l   (grey: l + n past the emulator)", ylabel="n (layers pruned after l)",
           title=f"SGP distance profile, the {len(groups)} chosen groups t\u2192t+n in red")
    ax.set_yticks(range(1, n_max + 1))
    ax.set_xticks(range(0, layers, -(-layers // 16)))
    ax.grid(False)


def drift(ax, f) -> None:
    d = f.get("drift/distance")
    if d is None or d.ndim < 2 or 0 in d.shape:
        ax.text(0.5, 0.5, "no drift data (no aligned layers)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    rounds = f["drift/round"][:]
    dist = d[:].astype(float)
    pairs = [(int(t), int(s)) for t, s in f["sgp/layer_map"][:]] if "sgp/layer_map" in f else []
    ns = [int(e - t) for t, e in f["sgp/groups"][:]] if "sgp/groups" in f else []
    for i in range(dist.shape[1]):
        name = f"sub {pairs[i][1]} \u2194 full {pairs[i][0] + ns[i]}" if i < min(len(pairs), len(ns)) else f"pair {i}"
        ax.plot(rounds, dist[:, i], "o-", markersize=4, label=name)
    if "rounds/realigned" in f:
        realigned = f["rounds/round"][:][f["rounds/realigned"][:] == 1]
        for j, r in enumerate(realigned):
            ax.axvline(r, color="gray", linestyle="--", linewidth=1, label="re-alignment" if j == 0 else None)
    ax.set(xlabel="round", ylabel="angular distance", title="Drift of aligned layers (sub-LLM vs full LLM)")
    round_axis(ax, rounds)
    ax.legend(loc="best", fontsize=8)


def plot(f, out: str) -> list:
    fig, (ax_h, ax_d) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    with reading(f):
        heatmap(ax_h, f)
        drift(ax_d, f)
    fig.suptitle(f"{run_label(f)}  [{run_name(f)}]")
    fig.tight_layout()
    return save(fig, out, f"distance_profile_{run_name(f)}")


def main() -> int:
    return plot_cli(__doc__, "sgp/distance", plot, per_run=True)  # methods without SGP have no profile


if __name__ == "__main__":
    raise SystemExit(main())
