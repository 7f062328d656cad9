"""analysis/ scripts on synthetic run files that follow the HDF5 contract of docs/design.md exactly."""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
R, N, L_E, N_MAX = 6, 4, 12, 4
GROUPS = [(1, 4), (6, 9)]  # n = 3, p = 2


def make_run(folder: Path, method: str, task: str, acc: float, re_align: bool = True) -> Path:
    """A finished run of R rounds, N clients (client 3 not sampled in odd rounds), eval every 3 rounds."""
    rng = np.random.default_rng(len(method))
    folder.mkdir(parents=True)
    path = folder / "run.h5"
    cfg = {"method": method, "data": {"task": task},
           "oda": {"pre_align": True, "re_align": re_align, "trigger": "drift" if re_align else "every",
                   "drift_threshold": 1.5, "max_interval": 0}}
    with h5py.File(path, "w") as f:
        f.attrs.update({"config_json": json.dumps(cfg), "method": method, "model": "smollm2-135m", "world_size": 3,
                        "n_clients": N, "versions_json": "{}", "git_commit": "abc"})
        dist = rng.uniform(0.1, 0.6, (N_MAX, L_E)).astype(np.float32) * np.arange(1, N_MAX + 1)[:, None] / N_MAX
        for n in range(1, N_MAX + 1):
            dist[n - 1, L_E - n:] = np.nan
        f["sgp/distance"] = dist
        f["sgp/groups"] = np.array(GROUPS, np.int32)
        f["sgp/kept_layers"] = np.array([k for k in range(L_E) if not any(t < k <= e for t, e in GROUPS)], np.int32)
        f["sgp/layer_map"] = np.array([(1, 1), (6, 3)], np.int32)
        f["oda/pre/loss"] = np.linspace(2, 1, 10, dtype=np.float32)
        f["oda/pre/loss_rep"] = np.linspace(1, 0.5, 10, dtype=np.float32)
        f["oda/pre/loss_kl"] = np.linspace(1, 0.5, 10, dtype=np.float32)
        realigned = np.array([0, 0, 1, 0, 0, 1] if re_align else [0] * R, np.int8)
        for key in ("round", "loss", "loss_rep", "loss_kl"):
            f[f"oda/re/{key}"] = np.array([3, 6], np.int32 if key == "round" else np.float32)
        loss = (2.0 + acc - 0.2 * np.arange(R)[:, None] + rng.uniform(-0.1, 0.1, (R, N))).astype(np.float32)
        loss[0::2, 3] = np.nan
        upload = np.where(np.isnan(loss), 0, 40_000).astype(np.int64)
        rows = {"round": np.arange(1, R + 1, dtype=np.int32), "wall_s": np.full(R, 3.5),
                "train_loss": loss, "n_samples": np.where(np.isnan(loss), 0, 64).astype(np.float32),
                "upload_bytes": upload, "download_bytes": 40_000 + 80_000 * realigned.astype(np.int64),
                "comm_params": np.full(R, 20_000, np.int64), "realigned": realigned,
                "eval_acc": np.array([np.nan, np.nan, acc - 0.1, np.nan, np.nan, np.nan], np.float32),
                # the output drift probe crosses 1.5 x its reference after rounds 2 and 5 (re-aligned: 3 and 6)
                "drift_probe": np.array([1.2, 1.6, 1.1, 1.3, 1.7, 1.0], np.float32),
                "drift_ref": np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.9] if re_align else [1.0] * R, np.float32)}
        for key, value in rows.items():
            f[f"rounds/{key}"] = value
        f["rounds"].attrs["drift_probe_0"] = 1.0
        f["drift/round"] = np.arange(1, R + 1, dtype=np.int32)
        since = np.array([1, 2, 0, 1, 2, 0]) if re_align else np.arange(R)  # rounds since the last re-alignment
        f["drift/distance"] = (0.05 + np.outer(since, [0.01, 0.02])).astype(np.float32)
        f.create_group("final").attrs.update({
            "accuracy": acc, "sub_accuracy": 0.5, "base_accuracy": 0.25, "trainable_params": 1_327_104,
            "comm_params_per_round": 2_654_208, "comm_bytes_per_round": 3 * 2**20, "client_model_bytes": 150 * 2**20,
            "full_model_bytes": 513 * 2**20, "task": task, "n_eval": 200})
    return path


@pytest.fixture
def runs(tmp_path):
    return [make_run(tmp_path / "runs" / "a", "fedsoda", "gsm8k", 0.635),
            make_run(tmp_path / "runs" / "b", "fedbiot", "gsm8k", 0.552, re_align=False)]


def script(name: str, *args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, str(ROOT / "analysis" / name), *map(str, args)], capture_output=True,
                         text=True, timeout=120, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return res


def assert_figure(out: Path, stem: str) -> None:
    for ext in ("png", "pdf"):
        assert (out / f"{stem}.{ext}").stat().st_size > 5000, f"{stem}.{ext} is missing or empty"


def test_plot_rounds(runs, tmp_path):
    script("plot_rounds.py", *runs, "--out", tmp_path / "fig")
    assert_figure(tmp_path / "fig", "rounds")


def test_plot_distance_profile_one_pair_per_run(runs, tmp_path):
    res = script("plot_distance_profile.py", *runs, "--out", tmp_path / "fig")
    assert_figure(tmp_path / "fig", "distance_profile_a")
    assert_figure(tmp_path / "fig", "distance_profile_b")
    assert len(res.stdout.split()) == 4


def test_plot_comm(runs, tmp_path):
    script("plot_comm.py", *runs, "--out", tmp_path / "fig")
    assert_figure(tmp_path / "fig", "comm")


def test_plot_drift_one_figure_per_run_and_the_threshold_steps(runs, tmp_path):
    res = script("plot_drift.py", *runs, "--out", tmp_path / "fig")
    assert_figure(tmp_path / "fig", "drift_a")
    assert_figure(tmp_path / "fig", "drift_b")
    assert len(res.stdout.split()) == 4
    sys.path.insert(0, str(ROOT / "analysis"))
    try:
        from plot_drift import drift_series
    finally:
        sys.path.remove(str(ROOT / "analysis"))
    with h5py.File(runs[0], "r") as f:
        d = drift_series(f)
    assert d["round"].tolist() == list(range(R + 1)) and d["tau"] == 1.5 and d["trigger"] == "drift"
    assert d["probe"][0] == 1.0 and d["probe"][1:].tolist() == pytest.approx([1.2, 1.6, 1.1, 1.3, 1.7, 1.0])
    assert d["threshold"].tolist() == pytest.approx([1.5] * 6 + [1.35]) and d["realigned"].tolist() == [3, 6]


def test_plot_drift_skips_a_run_file_without_the_probe(runs, tmp_path):
    with h5py.File(runs[1], "a") as f:  # a run of a version before /rounds/drift_probe
        del f["rounds/drift_probe"]
    p = subprocess.run([sys.executable, str(ROOT / "analysis" / "plot_drift.py"), *map(str, runs), "--out",
                        str(tmp_path / "fig")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "skipping" in p.stderr and "no /rounds/drift_probe" in p.stderr, p.stderr
    assert (tmp_path / "fig" / "drift_a.png").is_file() and not (tmp_path / "fig" / "drift_b.png").exists()


def test_comm_bytes_per_round(tmp_path):
    sys.path.insert(0, str(ROOT / "analysis"))
    try:
        from plot_comm import bytes_per_round
    finally:
        sys.path.remove(str(ROOT / "analysis"))
    with h5py.File(make_run(tmp_path / "r", "fedsoda", "sst2", 0.9), "r") as f:
        rounds, up, down = bytes_per_round(f)
    assert rounds.tolist() == list(range(1, R + 1))
    assert up.tolist() == [40_000.0] * R  # mean over the SAMPLED clients only
    assert down.tolist() == [40_000, 40_000, 120_000, 40_000, 40_000, 120_000]


def test_table_markdown(runs, tmp_path):
    out = script("table.py", *runs, "--out", tmp_path / "fig").stdout.strip().splitlines()
    assert len(out) == 4  # header, separator, 2 runs
    header = [c.strip() for c in out[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in out[2:]]
    assert [r["method"] for r in rows] == ["fedsoda", "fedbiot"]
    assert rows[0] == {"model": "smollm2-135m", "method": "fedsoda", "task": "gsm8k", "pre-align": "yes",
                       "re-align": "yes", "accuracy (%)": "63.5", "sub-LLM acc. (%)": "50.0", "base acc. (%)": "25.0",
                       "eval n": "200", "# tr. params": "1.33M", "# comm. params/round": "2.65M",
                       "comm MiB/round": "3.000", "client model MiB": "150.0", "full model MiB": "513.0"}
    assert rows[1]["re-align"] == "no" and rows[1]["accuracy (%)"] == "55.2"
    assert (tmp_path / "fig" / "table.md").read_text().strip().splitlines() == out
    with h5py.File(runs[1], "a") as f:  # a FedSRD run names its aggregator and densities (upload / download)
        f["final"].attrs.update({"aggregator": "fedsrd", "upload_density": 0.25, "download_density": 0.1})
    out = script("table.py", *runs).stdout.strip().splitlines()
    assert "| fedbiot + fedsrd (0.25 / 0.1) |" in out[3] and "| fedsoda |" in out[2]


def test_table_latex_and_skips_unfinished(runs, tmp_path):
    with h5py.File(runs[1], "a") as f:
        del f["final"]
    res = script("table.py", *runs, "--latex")
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith(r"\begin{tabular}") and lines[-1] == r"\end{tabular}"
    body = lines[lines.index(r"\midrule") + 1:lines.index(r"\bottomrule")]
    assert body == [r"smollm2-135m & fedsoda & gsm8k & yes & yes & 63.5 & 50.0 & 25.0 & 200 & 1.33M & 2.65M & 3.000 "
                    r"& 150.0 & 513.0 \\"]
    assert "skipping" in res.stderr and "\\#" in lines[2]


def test_missing_file_is_one_line_error(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "analysis" / "plot_rounds.py"), str(tmp_path / "nope.h5")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip() == f"error: no run file at {tmp_path / 'nope.h5'}"


def test_timing_summary_and_tables(tmp_path):
    """analysis/timing.py on a /timing group with known numbers: shares, MPI share, s/step, moved/payload."""
    sys.path.insert(0, str(ROOT / "analysis"))
    import timing as T

    from fedsoda_mpi.timing import PHASES

    path = make_run(tmp_path / "run", "fedsoda", "sst2", 0.6)
    W, P = 3, len(PHASES)
    phase = np.zeros((R, W, P))
    phase[:, 0, PHASES.index("idle")] = 8.0
    phase[:, 0, PHASES.index("aggregate")] = 2.0
    phase[:, 1:, PHASES.index("adapter")] = 6.0
    phase[:, 1:, PHASES.index("emulator")] = 2.0
    phase[:, 1:, PHASES.index("idle")] = 2.0
    phase[0, 1:, PHASES.index("emulator")] = 50.0  # round 1 fills the cache: excluded by --first 2
    mpi = np.full((R, W), 0.1)
    mpi[:, 2] = 0.2  # rank 2 spends the most time in MPI: 0.2 / 10 s
    with h5py.File(path, "a") as f:
        f["timing/round"] = np.arange(1, R + 1, dtype=np.int32)
        f["timing/phase_s"] = phase
        f["timing/wall_s"] = np.full((R, W), 10.0)
        f["timing/mpi_s"] = mpi
        f["timing/local_steps"] = np.tile([0.0, 4.0, 4.0], (R, 1))
        f["timing/peak_rss_mb"] = np.tile([3000.0, 700.0, 750.0], (R, 1))
        f["timing/peak_gpu_mb"] = np.zeros((R, W))
        f["timing"].attrs["phases"] = list(PHASES)
        f["timing"].attrs["sgp_s"] = 12.5
        f["rounds/moved_bytes"] = np.full(R, 1010, np.int64)
        f["rounds/payload_bytes"] = np.full(R, 1000, np.int64)
    with h5py.File(path, "r") as f:
        s = T.summary(f, first=2)
    assert s["rounds"] == [2, 3, 4, 5, 6] and s["wall_s"] == 10.0
    assert s["phases"]["clients"]["adapter"] == 6.0 and s["phases"]["clients"]["emulator"] == 2.0
    assert s["phases"]["server"]["aggregate"] == 2.0
    assert s["mpi_share"] == pytest.approx(0.02) and s["mpi_share_rank"] == 2
    assert s["client_s_per_step"] == pytest.approx(2.0)  # (6 + 2) s / 4 steps per client rank
    assert s["client_rss_mb"] == 750 and s["server_rss_mb"] == 3000
    assert s["moved_over_payload"] == pytest.approx(1.01) and s["setup"] == {"sgp_s": 12.5}
    out = script("timing.py", path).stdout
    assert "| fedsoda / sst2 | 10.0 | 0.0 | 20.0 | 60.0 |" in out  # clients: download, emulator, adapter
    assert "2.00% (rank 2)" in out and "1.01000" in out
    assert "| 1-6 |" in script("timing.py", path, "--first", "1").stdout
    assert s["cache"] is None and "emulator cache" not in out  # a run file from before the cache columns


def test_timing_reports_the_emulator_cache(tmp_path):
    """/timing/cache_*: rows by source summed over the client ranks and selected rounds, the disk tier's peak
    per client rank (a high-water mark over the whole run), and the table analysis/timing.py prints."""
    sys.path.insert(0, str(ROOT / "analysis"))
    import timing as T

    from fedsoda_mpi.timing import PHASES

    path = make_run(tmp_path / "run", "fedsoda", "sst2", 0.6)
    W = 3
    with h5py.File(path, "a") as f:
        f["timing/round"] = np.arange(1, R + 1, dtype=np.int32)
        f["timing/phase_s"] = np.ones((R, W, len(PHASES)))
        for k in ("wall_s", "mpi_s", "local_steps", "peak_rss_mb", "peak_gpu_mb"):
            f[f"timing/{k}"] = np.ones((R, W))
        f["timing"].attrs["phases"] = list(PHASES)
        f["timing/cache_ram_rows"] = np.tile([0.0, 10.0, 20.0], (R, 1)).astype(np.float32)
        f["timing/cache_disk_rows"] = np.tile([0.0, 16.0, 0.0], (R, 1)).astype(np.float32)
        f["timing/cache_emulator_rows"] = np.tile([0.0, 16.0, 32.0], (R, 1)).astype(np.float32)
        peak = np.zeros((R, W))
        peak[:, 1], peak[:, 2] = np.linspace(1, 3, R), 2.0  # rank 1 grows to 3 MiB, rank 2 stays at 2 MiB
        f["timing/cache_disk_peak_mb"] = peak
        f["rounds/moved_bytes"] = np.full(R, 1000, np.int64)
        f["rounds/payload_bytes"] = np.full(R, 1000, np.int64)
    with h5py.File(path, "r") as f:
        c = T.summary(f, first=2)["cache"]
    assert c == {"ram_rows": 5 * 30.0, "disk_rows": 5 * 16.0, "emulator_rows": 5 * 48.0, "disk_peak_mb": [3.0, 2.0]}
    out = script("timing.py", path).stdout
    assert "| fedsoda / sst2 | 150 | 80 | 240 | 0.250 | 3.00 / 2.50 |" in out, out


# --- bad input: one line on stderr, exit code 2, no traceback (docs/reliability.md) ---------------------------

SCRIPTS = ("table.py", "plot_rounds.py", "plot_comm.py", "plot_distance_profile.py", "timing.py")
OUT_SCRIPTS = SCRIPTS[:4]  # timing.py only prints


def run_main(name: str, *args, monkeypatch, capsys) -> tuple[int, list[str]]:
    """Run analysis/<name>'s main() in this process (fast: no new interpreter); return (exit code, stderr lines)."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "analysis"))
    module = importlib.import_module(name.removesuffix(".py"))
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    code = module.main()
    return code, capsys.readouterr().err.strip().splitlines()


def bad_run_file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A bad run file of `kind` and the error line every script gives for it."""
    path = tmp_path / f"{kind}.h5"
    if kind == "text":
        path.write_text("round,loss\n1,0.5\n")
        return path, f"error: {path}: not an HDF5 file (expected a run.h5 written by fedsoda-mpi)"
    if kind == "truncated":
        full = make_run(tmp_path / "full", "fedsoda", "sst2", 0.8).read_bytes()
        path.write_bytes(full[:1000])
        return path, (f"error: {path}: truncated HDF5 file (1000 of {len(full)} bytes; "
                      "an interrupted copy or a full disk?)")
    if kind == "foreign":
        with h5py.File(path, "w") as f:
            f["rounds/round"] = np.arange(3)
            f.attrs["creator"] = "another program"
        return path, f"error: {path}: not a fedsoda-mpi run file (no root attribute config_json)"
    if kind == "missing":
        return path, f"error: no run file at {path}"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["text", "truncated", "foreign", "missing"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_run_file_is_one_line_error(name, kind, tmp_path, monkeypatch, capsys):
    path, message = bad_run_file(tmp_path, kind)
    assert run_main(name, path, monkeypatch=monkeypatch, capsys=capsys) == (2, [message])


def test_bad_config_json_is_not_a_run_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "run.h5"
    with h5py.File(path, "w") as f:
        f.attrs["config_json"] = "{not json"
    assert run_main("table.py", path, monkeypatch=monkeypatch, capsys=capsys) == (
        2, [f"error: {path}: not a fedsoda-mpi run file (root attribute config_json is not a JSON object)"])


# what each script reads that a run file of another version might lack, and how h5py names it
LACKING = {"table.py": ("final", "trainable_params", "can't locate attribute: 'trainable_params'"),
           "plot_rounds.py": ("rounds", "train_loss", "object 'train_loss' doesn't exist"),
           "plot_comm.py": ("rounds", "download_bytes", "object 'download_bytes' doesn't exist"),
           "plot_distance_profile.py": ("drift", "round", "object 'round' doesn't exist"),
           "timing.py": ("timing", "phases", "can't locate attribute: 'phases'")}


@pytest.mark.parametrize("name", SCRIPTS)
def test_run_file_lacking_a_dataset_names_file_and_dataset(name, tmp_path, monkeypatch, capsys):
    path = make_run(tmp_path / "run", "fedsoda", "sst2", 0.8)
    group, key, reason = LACKING[name]
    with h5py.File(path, "a") as f:
        f["timing/phase_s"] = np.zeros((R, 3, 7))
        if key in f[group].attrs:
            del f[group].attrs[key]
        elif key in f[group]:
            del f[group][key]
    out = [] if name == "timing.py" else ["--out", tmp_path / "fig"]
    code, err = run_main(name, path, *out, monkeypatch=monkeypatch, capsys=capsys)
    assert (code, err) == (2, [f"error: {path}: unexpected content ({reason}); "
                               "is it a run file of this fedsoda-mpi version?"])


def test_unfinished_run_is_still_skipped_with_a_warning(runs, tmp_path, monkeypatch, capsys):
    with h5py.File(runs[1], "a") as f:
        del f["final"]
    code, err = run_main("table.py", *runs, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and err == [f"warning: skipping {runs[1]}: no /final (unfinished or failed run?)"]


def test_distance_profile_of_a_run_without_sgp_says_its_method_records_none(runs, tmp_path, monkeypatch, capsys):
    """A finished FedPETuning run has no /sgp: the warning names its method, not an "unfinished or failed run"."""
    with h5py.File(runs[1], "a") as f:
        del f["sgp"]
        f.attrs["method"] = "fedpetuning"
    code, err = run_main("plot_distance_profile.py", *runs, "--out", tmp_path / "fig", monkeypatch=monkeypatch,
                         capsys=capsys)
    assert code == 0 and err == [f"warning: skipping {runs[1]}: no /sgp/distance (a finished fedpetuning run: its "
                                 "method does not record it)"]


@pytest.fixture
def unwritable_dir(tmp_path) -> Path:
    """A folder in which no file can be created: a mode-0555 folder, or /sys when running as root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                continue
        except OSError:
            return candidate
    pytest.skip("no unwritable folder here (root without a read-only /sys)")


@pytest.mark.parametrize("name", OUT_SCRIPTS)
def test_unusable_out_is_one_line_error_before_reading_runs(name, runs, tmp_path, unwritable_dir, monkeypatch,
                                                            capsys):
    afile = tmp_path / "figures.png"
    afile.write_text("not a folder")
    cases = {afile: f"error: --out {afile}: exists and is not a folder",
             afile / "sub": f"error: --out {afile / 'sub'}: cannot create the folder ({afile} is not a folder)",
             unwritable_dir: f"error: --out {unwritable_dir}: cannot write in the folder (Permission denied)",
             unwritable_dir / "new": (f"error: --out {unwritable_dir / 'new'}: cannot create the folder "
                                      f"({unwritable_dir}: Permission denied)")}
    for out, message in cases.items():
        assert run_main(name, *runs, "--out", out, monkeypatch=monkeypatch, capsys=capsys) == (2, [message])
    assert afile.read_text() == "not a folder"
    # a bad run file with a fine --out: the error, and no empty output folder left behind
    bad, message = bad_run_file(tmp_path, "text")
    assert run_main(name, bad, "--out", tmp_path / "new", monkeypatch=monkeypatch, capsys=capsys) == (2, [message])
    assert not (tmp_path / "new").exists()


def test_write_failure_while_saving_is_one_line_error(runs, tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    code, err = run_main("plot_comm.py", *runs, "--out", tmp_path / "fig", monkeypatch=monkeypatch, capsys=capsys)
    assert (code, err) == (2, [f"error: --out {tmp_path / 'fig'}: cannot write comm.png (No space left on device)"])


@pytest.mark.parametrize("name, kind, out", [("table.py", "text", None), ("plot_rounds.py", "truncated", None),
                                             ("plot_comm.py", None, "file")])
def test_issue_15_cases_give_no_traceback(name, kind, out, runs, tmp_path):
    """The three commands of issue 15 that printed tracebacks, run as a user would."""
    if kind:
        path, message = bad_run_file(tmp_path, kind)
        args = [path]
    else:
        (tmp_path / "taken").write_text("x")
        args = [*runs, "--out", tmp_path / "taken"]
        message = f"error: --out {tmp_path / 'taken'}: exists and is not a folder"
    res = subprocess.run([sys.executable, str(ROOT / "analysis" / name), *map(str, args)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.splitlines() == [message] and res.stdout == ""
