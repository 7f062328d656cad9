"""Where a round's time goes, from `/timing` and `/rounds` of run files: phase shares per role, MPI share,
client time per local step, peak memory, bytes moved / LoRA payload, and what the emulator cache did (rows
found in memory, reloaded from its disk tier, computed by the emulator; the disk tier's peak per client rank).

    python analysis/timing.py runs/NAME/run.h5 [more runs]                 # steady state: rounds 2..R
    python analysis/timing.py runs/*/run.h5 --first 1                      # every round (incl. cache fill)

Rounds from `--first` on are summed (default 2: round 1 fills the emulator cache, later rounds are the
steady state between re-alignments; re-alignment rounds are included as they occur). Run files written
before /timing had the cache columns get no cache row.
"""
from __future__ import annotations

import argparse

import numpy as np
from common import attr_str, main_guard, open_runs, reading, run_label

# /timing/cache_<name>, rows per round and rank: fedsoda_mpi.timing.CACHE_ROWS (analysis/ reads run files without
# importing the package)
CACHE_ROWS = ("ram_rows", "disk_rows", "emulator_rows")
ROLE_PHASES = {"server": ("realign", "download", "upload", "aggregate", "evaluate", "idle", "other"),
               "clients": ("download", "emulator", "adapter", "upload", "idle", "other")}


def summary(f, first: int = 2) -> dict:
    """Totals over rounds >= `first` (all rounds if the run has fewer): per-role phase seconds per round,
    MPI share (the largest over ranks), client seconds per local step, peak RSS, moved/payload bytes."""
    t = f["timing"]
    phases = [p.decode() if isinstance(p, bytes) else str(p) for p in t.attrs["phases"]]
    rounds = t["round"][:]
    sel = rounds >= first if (rounds >= first).any() else np.ones_like(rounds, bool)
    ph = t["phase_s"][:][sel]  # [R, W, P]
    wall, mpi, steps, rss = (t[k][:][sel] for k in ("wall_s", "mpi_s", "local_steps", "peak_rss_mb"))
    n = int(sel.sum())
    per_round = {"server": dict(zip(phases, ph[:, 0].sum(0) / n)),
                 "clients": dict(zip(phases, ph[:, 1:].mean(1).sum(0) / n))}
    compute = ph[:, 1:, phases.index("emulator")] + ph[:, 1:, phases.index("adapter")]
    r = f["rounds"]
    keep = np.isin(r["round"][:], rounds[sel])
    moved = r["moved_bytes"][:][keep].sum() if "moved_bytes" in r else np.nan
    payload = r["payload_bytes"][:][keep].sum() if "payload_bytes" in r else np.nan
    return {"label": run_label(f), "ranks": ph.shape[1], "rounds": rounds[sel].tolist(), "phases": per_round,
            "wall_s": float(wall[:, 0].mean()), "mpi_share": float((mpi.sum(0) / wall.sum(0)).max()),
            "mpi_share_rank": int((mpi.sum(0) / wall.sum(0)).argmax()),
            "client_s_per_step": float(compute.sum() / max(steps[:, 1:].sum(), 1)),
            "client_rss_mb": float(rss[:, 1:].max()), "server_rss_mb": float(rss[:, 0].max()),
            "moved_over_payload": float(moved / payload) if payload else np.nan,
            "setup": {k: float(v) for k, v in t.attrs.items() if k.endswith("_s")},
            "method": attr_str(f, "method", "?"), "cache": cache_summary(t, sel)}


def cache_summary(t, sel: np.ndarray) -> dict | None:
    """The emulator cache on the client ranks: rows its fills found in memory, loaded from disk and computed,
    summed over the selected rounds, and the disk tier's peak MiB per client rank (over the whole run: a
    high-water mark). None when the run file has no cache columns (written before them, or a resume across
    that change left them shorter than /timing/round)."""
    names = [f"cache_{k}" for k in CACHE_ROWS] + ["cache_disk_peak_mb"]
    if not all(k in t and len(t[k]) == len(sel) for k in names):
        return None
    out = {k: float(t[f"cache_{k}"][:][sel][:, 1:].sum()) for k in CACHE_ROWS}
    out["disk_peak_mb"] = t["cache_disk_peak_mb"][:][:, 1:].max(0).tolist()
    return out


def phase_table(rows: list[dict]) -> str:
    """Markdown: per run and role, each phase's share (%) of the round wall time."""
    lines = []
    for role, names in ROLE_PHASES.items():
        lines += [f"\n{role}: share of the round's wall time (%)",
                  "| run | s / round | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
        for s in rows:
            p = s["phases"][role]
            lines.append(f"| {s['label']} | {s['wall_s']:.1f} | "
                         + " | ".join(f"{100 * p[k] / s['wall_s']:.1f}" for k in names) + " |")
    return "\n".join(lines)


def ratio_table(rows: list[dict]) -> str:
    """Markdown: MPI share, client s/step, peak RSS, moved/payload per run."""
    lines = ["| run | ranks | rounds | MPI share (max rank) | client s / local step | client peak RSS MiB | "
             "server peak RSS MiB | bytes moved / LoRA payload |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for s in rows:
        lines.append(f"| {s['label']} | {s['ranks']} | {s['rounds'][0]}-{s['rounds'][-1]} | "
                     f"{100 * s['mpi_share']:.2f}% (rank {s['mpi_share_rank']}) | {s['client_s_per_step']:.3f} | "
                     f"{s['client_rss_mb']:.0f} | {s['server_rss_mb']:.0f} | {s['moved_over_payload']:.5f} |")
    return "\n".join(lines)


def cache_table(rows: list[dict]) -> str:
    """Markdown: per run, the emulator cache's rows by source and the disk tier's peak per client rank ("" when
    no run has the cache columns)."""
    lines = ["| run | rows from memory | rows from disk | rows computed (emulator) | disk / (disk + computed) | "
             "disk peak MiB per client rank (max / mean) |", "|---|---:|---:|---:|---:|---:|"]
    for s in rows:
        c = s.get("cache")
        if c is None:
            continue
        reloads = c["disk_rows"] + c["emulator_rows"]
        share = f"{c['disk_rows'] / reloads:.3f}" if reloads else "-"
        peak = c["disk_peak_mb"]
        lines.append(f"| {s['label']} | {c['ram_rows']:.0f} | {c['disk_rows']:.0f} | {c['emulator_rows']:.0f} | "
                     f"{share} | {max(peak, default=0):.2f} / {np.mean(peak) if peak else 0:.2f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--first", type=int, default=2, help="first round summed (default 2: skip the cache fill)")
    args = ap.parse_args(argv)

    def go():
        rows = []
        for f in open_runs(args.runs, "timing/phase_s"):
            with reading(f):
                rows.append(summary(f, args.first))
        print(phase_table(rows))
        print()
        print(ratio_table(rows))
        cache = cache_table(rows)
        if cache:
            print(f"\nemulator cache (client ranks, rounds from {args.first})")
            print(cache)

    return main_guard(go)


if __name__ == "__main__":
    raise SystemExit(main())
