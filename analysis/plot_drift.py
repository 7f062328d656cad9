"""The output drift probe per round, the re-alignment threshold and the re-alignment rounds (oda.trigger=drift).

    python analysis/plot_drift.py runs/NAME/run.h5 [...] --out figures      # -> figures/drift_<run name>.{png,pdf}

One figure per run. Line: `/rounds/drift_probe`, KL(M || M*) on the held-out probe batch after each round (round 0:
`/rounds` attr `drift_probe_0`, after pre-alignment). Steps: the threshold tau x the probe's value just after the
last alignment (`/rounds/drift_ref`; tau = `oda.drift_threshold` of the run's config): a probe above it after round t
makes round t + 1 re-align. Vertical lines: the re-aligned rounds (`/rounds/realigned`), with the probe's value
just after the re-alignment (x, before that round's training). For a run with oda.trigger=every the threshold is
drawn dashed: it was not used, it shows when a drift trigger would have fired.
"""
from __future__ import annotations

import numpy as np

from common import config, plot_cli, plt, reading, round_axis, run_label, run_name, save


def drift_series(f) -> dict:
    """Rounds 0..R with the probe and the threshold tau x reference, the re-aligned rounds, tau and the trigger."""
    oda = config(f).get("oda", {})
    tau = float(oda.get("drift_threshold", np.nan))
    r = f["rounds"]
    rounds = r["round"][:].astype(int)
    first = float(r.attrs.get("drift_probe_0", np.nan))
    probe = np.concatenate([[first], r["drift_probe"][:].astype(float)])
    ref = np.concatenate([[first], r["drift_ref"][:].astype(float)])
    return {"round": np.concatenate([[0], rounds]), "probe": probe, "threshold": tau * ref, "tau": tau,
            "realigned": rounds[r["realigned"][:] == 1], "trigger": str(oda.get("trigger", "every")),
            "max_interval": int(oda.get("max_interval", 0))}


def plot(f, out: str) -> list:
    with reading(f):
        d = drift_series(f)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(d["round"], d["probe"], "o-", color="C0", label="output drift probe KL(M \u2016 M*)")
    used = d["trigger"] == "drift"
    ax.step(d["round"], d["threshold"], where="post", color="C3", linestyle="-" if used else "--",
            label=f"\u03c4 \u00d7 value after the last alignment (\u03c4 = {d['tau']:g}" + ("" if used else ", unused")
            + ")")
    for j, r in enumerate(d["realigned"]):
        ax.axvline(r, color="gray", linestyle=":", linewidth=1.2, label="re-aligned round" if j == 0 else None)
    if len(d["realigned"]):  # the probe just after the re-alignment, before the round's training
        ax.plot(d["realigned"], d["threshold"][d["realigned"]] / d["tau"], "x", color="C3", markersize=7,
                label="just after the re-alignment")
    rule = f"trigger={d['trigger']}" + (f", max_interval={d['max_interval']}" if used and d["max_interval"] else "")
    ax.set(xlabel="round (0: after pre-alignment)", ylabel="KL on the held-out probe batch",
           title=f"{run_label(f)}  [{run_name(f)}]\n{rule}, {len(d['realigned'])} re-alignment(s)")
    ax.set_ylim(bottom=0)
    round_axis(ax, d["round"])
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return save(fig, out, f"drift_{run_name(f)}")


def main() -> int:
    return plot_cli(__doc__, "rounds/drift_probe", plot, per_run=True)  # run files from before the probe: skipped


if __name__ == "__main__":
    raise SystemExit(main())
