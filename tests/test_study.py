"""Studies (fedsoda_mpi/study.py): expansion of the shipped study files, lr selection on validation rows,
summaries of a run file, bad study files. No model, no MPI: the end-to-end route is in test_integration."""
import json
import math

import h5py
import numpy as np
import pytest
import yaml

from fedsoda_mpi import study as S
from fedsoda_mpi import study_expand as E
from fedsoda_mpi import study_reuse as R
from fedsoda_mpi import study_select as L
from fedsoda_mpi import study_summaries as M
from fedsoda_mpi.config import load_config
from fedsoda_mpi.stats import unbits
from fedsoda_mpi.study_tables import Table, TableRow
from tests.conftest import ROOT

TOY = {"name": "toy", "job": "jobs/smollm2_sst2_iid.yaml", "overrides": {"fed.rounds": 4, "eval.every": 2},
       "grid": {"methods": ["fedsoda", "fedot"], "tasks": ["sst2"], "seeds": [0, 1, 2], "lr": [1e-3, 3e-3]},
       "variants": [{"group": "ablation", "name": "no_pre", "method": "fedsoda", "tasks": ["sst2"],
                     "overrides": {"oda.pre_align": False}},
                    {"group": "gsm", "name": "main", "methods": ["fedsoda", "fedot"], "tasks": ["gsm8k"],
                     "seeds": [0], "lr_task": "sst2"},
                    {"group": "noniid", "name": "dir", "method": "fedot", "tasks": ["sst2"],
                     "splits": ["dirichlet-0.5"], "lr_split": "iid", "seeds": [0]}]}


def _write(tmp_path, spec) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_shipped_studies_expand_and_validate():
    cpu = E.load(ROOT / "studies/cpu_smollm2.yaml")
    assert len(cpu.stage("grid")) == 4 * 2 * 3 + 2 * 2 and len(cpu.stage("seeds")) == 4 * 2 * 2  # methods x tasks x ...
    assert {r.lr for r in cpu.stage("grid") if r.method == "fedsoda"} == {3e-4, 1e-3, 3e-3, 1e-2, 3e-2}  # lr_extend
    assert {r.method for r in cpu.stage("grid")} == {"fedsoda", "fedpetuning", "fedot", "fedbiot"}
    assert sum("eval.base=true" in r.overrides for r in cpu.runs) == 3  # once per task: sst2, boolq, gsm8k
    drift = cpu.stage("drift")  # FedSODA SST-2, 3 seeds, tau = 1.1 without and with max_interval 5, selected lr
    assert len(drift) == 2 * 3 and all("oda.trigger=drift" in r.overrides and r.lr is None for r in drift)
    assert {r.variant for r in drift} == {"drift_tau1.1", "drift_tau1.1_max5"}
    assert all("oda.drift_threshold=1.1" in r.overrides for r in drift)
    paper = E.load(ROOT / "studies/paper.yaml")
    grid = paper.stage("grid")
    assert len(grid) == 4 * 3 * 3 * 3 * 3 and {r.lr for r in grid} == {1e-5, 5e-5, 1e-4}  # every seed at every lr
    assert {r.model for r in grid} == {"llama3", "qwen2", "mistral"} and all(r.np == 11 for r in paper.runs)
    assert all(r.job == f"jobs/{r.model}_{r.task}_iid.yaml" for r in paper.runs)
    assert {r.split for r in paper.stage("noniid")} == {"dirichlet-0.1", "dirichlet-0.5", "dirichlet-1.0"}
    assert all(r.key[3] == "iid" for r in paper.stage("noniid"))  # at the IID-selected lr
    assert len({r.id for r in paper.runs}) == len(paper.runs)


def test_run_arguments_set_method_task_split_seed_and_lr(tmp_path):
    st = E.load(_write(tmp_path, TOY))
    run = next(r for r in st.runs if r.stage == "noniid")
    args = run.args(0.002, tmp_path / "r")
    assert args[:2] == ["--config", "jobs/smollm2_sst2_iid.yaml"]
    for want in ("method=fedot", "data.task=sst2", "data.split=dirichlet", "data.dirichlet_beta=0.5", "seed=0",
                 "fed.lr=0.002", "fed.rounds=4", f"output.dir={tmp_path / 'r'}", "resume=auto"):
        assert want in args
    cfg = load_config(args[1], args[2:])
    assert cfg.method == "fedot" and cfg.fed.mu == 0.0 and cfg.data.dirichlet_beta == 0.5 and cfg.fed.lr == 0.002


def _summary(run, val, acc=0.8):
    return {"run": run.id, "variant": run.variant, "val_accuracy": val, "accuracy": acc}


def test_selection_uses_validation_only_and_waits_for_the_whole_grid(tmp_path):
    st = E.load(_write(tmp_path, TOY))
    grid = {(r.method, r.lr): r for r in st.stage("grid")}
    res = tmp_path / "results"
    res.mkdir()
    # fedsoda: 3e-3 is better on validation although 1e-3 has the better TEST accuracy (never looked at)
    for (method, lr), val, acc in ((("fedsoda", 1e-3), 0.70, 0.95), (("fedsoda", 3e-3), 0.75, 0.60),
                                   (("fedot", 1e-3), 0.60, 0.5)):
        (res / f"{grid[method, lr].id}.json").write_text(json.dumps(_summary(grid[method, lr], val, acc)))
    chosen = L.write_selection(st, res)
    assert chosen == {("fedsoda", "sst2", "smollm2", "iid"): 3e-3}  # fedot's grid is incomplete: no choice yet
    assert json.loads((res / f"{grid['fedsoda', 3e-3].id}.json").read_text())["variant"] == "main"
    assert json.loads((res / f"{grid['fedsoda', 1e-3].id}.json").read_text())["variant"] == "lr=0.001"
    sel = json.loads((res / "selection.json").read_text())["selected"]
    assert sel[0]["lr"] == 3e-3 and sel[0]["val_accuracy"] == {"0.001/s0": 0.70, "0.003/s0": 0.75}
    seeds1 = next(r for r in st.stage("seeds") if r.method == "fedsoda" and r.seed == 1)
    assert L.lr_for(seeds1, chosen) == 3e-3
    gsm = {r.method: r for r in st.stage("gsm")}
    assert L.lr_for(gsm["fedsoda"], chosen) == 3e-3 and L.lr_for(gsm["fedot"], chosen) is None
    (res / f"{grid['fedot', 3e-3].id}.json").write_text(json.dumps(_summary(grid["fedot", 3e-3], 0.60)))
    chosen = L.select(st, M.summaries(res))
    assert chosen[("fedot", "sst2", "smollm2", "iid")] == 1e-3  # a tie goes to the smaller lr
    noniid = st.stage("noniid")[0]
    assert L.lr_for(noniid, chosen) == 1e-3


def test_task_args_of_an_array_index(tmp_path, capsys):
    path = _write(tmp_path, TOY)
    st = E.load(path)
    res = tmp_path / "results"
    assert S.main(["args", path, "grid", "1", "--results", str(res), "--runs", str(tmp_path / "runs")]) == 0
    assert f"output.dir={tmp_path / 'runs' / st.stage('grid')[1].id}" in capsys.readouterr().out
    assert S.main(["args", path, "seeds", "0", "--results", str(res)]) == 2  # no selection yet
    assert "no selected lr" in capsys.readouterr().err
    assert S.main(["args", path, "grid", "99", "--results", str(res)]) == 2
    assert "out of range" in capsys.readouterr().err


@pytest.mark.parametrize("spec,message", [
    ({"name": "x"}, "at least: name, grid"),
    ({**TOY, "grdi": {}}, "unknown key"),
    ({**TOY, "grid": {**TOY["grid"], "select_seeds": [7]}}, "select_seeds"),
    ({**TOY, "grid": {**TOY["grid"], "splits": ["shards"]}}, "dirichlet-<beta>"),
    ({**TOY, "variants": [{"name": "v", "method": "fedsoda", "tasks": ["sst2"], "overrides": {"fed.rouns": 2}}]},
     "did you mean 'fed.rounds'"),
    ({**TOY, "variants": [{"name": "v", "method": "fedsoda", "tasks": ["sst2"], "lr_form": "x"}]}, "unknown key"),
    ({**TOY, "variants": [TOY["variants"][0], TOY["variants"][0]]}, "appears twice"),
    ({**TOY, "overrides": {"fed.rounds": 5, "eval.every": 2}}, "eval.every that divides"),
    ({**TOY, "overrides": {"fed.lr": 0.01}}, "'fed.lr' is set by the study for each run"),
    ({**TOY, "overrides": {"seed": 5}}, "'seed' is set by the study"),
    ({**TOY, "variants": [{"name": "v", "method": "fedbiot", "tasks": ["sst2"]}]}, "which the grid does not run"),
    ({**TOY, "variants": [{"name": "v", "method": "fedsoda", "tasks": ["sst2"], "seeds": [0], "np": 2},
                          {"name": "w", "method": "fedsoda", "tasks": ["sst2"], "seeds": [0]}]}, "different ranks"),
    ({**TOY, "grid": {**TOY["grid"], "lr": []}}, "grid.lr: must not be empty"),
    ({**TOY, "grid": {**TOY["grid"], "lr_extend": {"fedbiot": [1e-2]}}}, "grid.lr_extend: expected a mapping from"),
    ({**TOY, "grid": {**TOY["grid"], "lr_extend": {"fedsoda": [3e-3]}}}, "not already in grid.lr"),
    ({**TOY, "grid": {**TOY["grid"], "lr_extend": {"fedsoda": ["fast"]}}}, "expected learning rates"),
    ({**TOY, "tables": {"t": {"ref": "main fedsoda", "rows": [["main fedsoda", "F"], ["no_pr", "N"]]}}},
     "tables.t.rows: 'no_pr' is neither a variant of this study nor 'main <method>'"),
    ({**TOY, "tables": {"t": {"ref": "main fedbiot", "rows": [["main fedsoda", "F"]]}}}, "tables.t.ref"),
    ({**TOY, "tables": {"t": {"rows": [["no_pre", "N"]]}}}, "tables.t: expected the keys ref and rows"),
    ({**TOY, "tables": {"t": {"ref": "no_pre", "rows": [["no_pre"]]}}}, "expected [row, label]"),
    ({**TOY, "tables": {"t": {"ref": "no_pre", "rows": [["no_pre", "N"]], "group": "ablatoin"}}},
     "tables.t.group: 'ablatoin' is not a variant group"),
])
def test_bad_study_files_fail_with_one_line(tmp_path, capsys, spec, message):
    assert S.main(["list", _write(tmp_path, spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsoda-mpi: study error:") and message in err and err.count("\n") == 1


def test_a_study_declares_its_report_tables(tmp_path):
    """`tables`: rows in order ([variant or "main <method>", label]) and the reference row, kept by the loader."""
    spec = {**TOY, "tables": {"t": {"ref": "main fedsoda", "rows": [["main fedsoda", "F"], ["no_pre", "w/o pre"]],
                                    "group": "ablation"}}}
    rows = (TableRow("main fedsoda", ("F",), "main fedsoda"), TableRow("no_pre", ("w/o pre",), "main fedsoda"))
    assert E.load(_write(tmp_path, spec)).tables == {"t": Table("main fedsoda", rows, "ablation")}
    assert E.load(_write(tmp_path, TOY)).tables == {}


def test_summary_of_a_run_file(tmp_path):
    """summarize() reads only /final, /base, /rounds, /oda/pre, /sgp and the root attributes."""
    st = E.load(_write(tmp_path, TOY))
    run = st.stage("grid")[0]
    with h5py.File(tmp_path / "run.h5", "w") as f:
        cfg = load_config(None, ["fed.rounds=2", "fed.clients=2", "data.max_train_per_client=16",
                                   "eval.dtype=bfloat16"]).to_dict()
        f.attrs.update({"config_json": json.dumps(cfg), "world_size": 3, "git_commit": "abc"})
        f["final"] = np.zeros(0)
        f["final"].attrs.update({"accuracy": 0.81, "sub_accuracy": 0.7, "val_accuracy": 0.79, "n_eval": 872,
                                 "n_val": 300,
                                 "comm_bytes_per_round": 2.5e6, "client_model_bytes": 10, "full_model_bytes": 30,
                                 "trainable_params": 5})
        f.create_group("base").attrs.update({"accuracy": float("nan"), "n": 0})
        r = f.create_group("rounds")
        r["round"], r["eval_acc"] = np.array([1, 2]), np.array([np.nan, 0.79], np.float32)
        r["train_loss"] = np.array([[1.0, 3.0], [np.nan, np.nan]], np.float32)
        r["realigned"], r["wall_s"] = np.array([0, 1], np.int8), np.array([2.0, 3.0])
    out = M.summarize(run, tmp_path, 1e-3, "toy")
    assert out["accuracy"] == 0.81 and out["val_accuracy"] == 0.79 and out["base_accuracy"] is None
    assert out["eval_acc"] == [None, pytest.approx(0.79)] and out["train_loss"] == [2.0, None]
    assert out["kl_after"] is None and out["commit"] == "abc" and out["lr"] == 1e-3 and out["n_eval"] == 872
    assert out["settings"]["sgp_p"] == 4 and out["settings"]["mu"] == 0.01 and out["eval_rounds_on"] == "val"
    assert len(json.dumps(out)) < 4096
    assert not math.isnan(out["wall_s"])
    assert out["sgp_candidates"] == [] and out["public_self"] == {} and out["kl_on"] == "wikitext2"
    # re-alignments and the emulator LoRA's size (what a drift trigger saves); a run file from before them: None, []
    assert out["realignments"] == 1 and out["emulator_lora_bytes"] is None and out["drift_probe"] == []
    assert out["settings"]["trigger"] == "every" and out["settings"]["max_interval"] == 0
    with h5py.File(tmp_path / "run.h5", "a") as f:
        f["final"].attrs["emulator_lora_bytes"] = 786432
        f["rounds/drift_probe"] = np.array([3.0, 3.25], np.float32)
    out = M.summarize(run, tmp_path, 1e-3, "toy")
    assert out["emulator_lora_bytes"] == 786432 and out["drift_probe"] == [3.0, 3.25]
    assert out["pred_counts"] is None and out["label_counts"] is None  # a run file from before they were recorded
    with h5py.File(tmp_path / "run.h5", "a") as f:
        f["final"].attrs.update({"pred_counts": [872, 0], "sub_pred_counts": [400, 472], "label_counts": [428, 444]})
    out = M.summarize(run, tmp_path, 1e-3, "toy")
    assert out["pred_counts"] == [872, 0] and out["sub_pred_counts"] == [400, 472] and out["label_counts"] == [428, 444]
    assert out["eval_s"] is None  # a run file from before the final evaluation was timed
    with h5py.File(tmp_path / "run.h5", "a") as f:
        f["final"].attrs["eval_s"] = 12.345
        f.require_group("timing").attrs["base_eval_s"] = 6.78
    out = M.summarize(run, tmp_path, 1e-3, "toy")
    assert out["eval_s"] == 12.3 and out["base_eval_s"] == 6.8
    assert out["correct"] is None and out["sub_correct"] is None  # a label task: no per-question record
    assert out["base_pred_counts"] is None  # a run file from before the base model's answers were counted
    answered = np.array([1, 0, 0, 1, 1, 0, 0, 0, 1, 1], np.int8)  # GSM8K: which test questions were answered right
    with h5py.File(tmp_path / "run.h5", "a") as f:
        f["final"].attrs.update({"correct": answered, "sub_correct": np.zeros(10, np.int8)})
    out = M.summarize(run, tmp_path, 1e-3, "toy")
    assert out["correct"] == "98c0" and out["sub_correct"] == "0000"  # 1001 1000 | 11(00 0000)
    assert unbits(out["correct"], 10) == answered.astype(bool).tolist()
    assert out["base_correct"] is None  # no base model evaluation recorded in this run file
    with h5py.File(tmp_path / "run.h5", "a") as f:
        f.require_group("base").attrs["correct"] = answered[::-1]
    assert M.summarize(run, tmp_path, 1e-3, "toy")["base_correct"] == "c640"  # 1100 0110 | 01(00 0000)
    json.dumps(out)  # plain ints, not numpy


def test_summary_carries_the_chosen_n_p_candidates_and_both_kls(tmp_path):
    """sgp.auto + data.public=self: the summary's (n, p) are the run's chosen ones (/sgp attributes), not the
    config's; the candidates, KL on the held-out WikiText-2 slice and on generated text, the generation settings."""
    st = E.load(_write(tmp_path, TOY))
    run = st.stage("grid")[0]
    with h5py.File(tmp_path / "run.h5", "w") as f:
        cfg = load_config(None, ["sgp.auto=true", "sgp.remove_layers=12", "data.public=self"]).to_dict()
        f.attrs.update({"config_json": json.dumps(cfg), "world_size": 3, "git_commit": "abc"})
        f.create_group("final").attrs.update({"accuracy": 0.8, "sub_accuracy": 0.7, "val_accuracy": 0.79, "n_eval": 872,
                                              "n_val": 300, "comm_bytes_per_round": 1.0, "client_model_bytes": 10,
                                              "full_model_bytes": 30, "trainable_params": 5})
        r = f.create_group("rounds")
        r["round"], r["eval_acc"], r["train_loss"] = np.array([1]), np.array([0.79]), np.array([[1.0]])
        r["realigned"], r["wall_s"] = np.array([0], np.int8), np.array([2.0])
        f["sgp/groups"] = np.array([[1, 13]], np.int32)
        f["sgp/candidates"] = np.array([[1, 12, 1.02], [6, 2, np.inf], [12, 1, 0.22]])
        f["sgp"].attrs.update({"auto": True, "n": 12, "p": 1, "remove_layers": 12, "removed": 12, "max_distance": 0.0})
        f.create_group("oda/pre").attrs.update({"kl_before": 6.5, "kl_after": 5.5, "kl_on": "wikitext2",
                                                "kl_before_self": 3.0, "kl_after_self": 2.0})
        f.create_group("public").attrs.update({"mode": "self", "temperature": 0.8, "max_new_tokens": 64, "seed": 0,
                                               "n_public": 64, "n_heldout": 16, "generate_s": 30.0,
                                               "kl_on": "wikitext2"})
    out = M.summarize(run, tmp_path, 1e-3, "toy")
    assert (out["settings"]["sgp_n"], out["settings"]["sgp_p"]) == (12, 1)  # the config still says n=3, p=4
    assert out["settings"]["sgp_auto"] is True and out["settings"]["sgp_remove_layers"] == 12
    assert out["sgp_candidates"] == [[1, 12, 1.02], [6, 2, None], [12, 1, 0.22]]
    assert (out["kl_before"], out["kl_after"], out["kl_on"], out["kl_before_self"], out["kl_after_self"]) == \
        (6.5, 5.5, "wikitext2", 3.0, 2.0)
    assert out["public_self"]["temperature"] == 0.8 and out["public_self"]["n_public"] == 64
    assert out["settings"]["public"] == "self"
    json.dumps(out, allow_nan=False)


@pytest.mark.mpi
@pytest.mark.slow
def test_local_route_runs_selects_and_summarizes(tiny_model_dir, tmp_path):
    """`study run`: a 2-lr grid of one method under real mpirun, then the selected-lr seed run; each leaves a
    summary, and the seed run's config carries the lr chosen on validation rows (on the tiny model folder:
    the route is wiring)."""
    import subprocess
    import sys

    spec = {"name": "tiny", "job": "jobs/smollm2_sst2_iid.yaml", "np": 2, "base_eval": "once",
            "overrides": {"fed.rounds": 1, "fed.clients": 1, "fed.local_steps": 1, "data.max_train_per_client": 4,
                          "data.val_size": 8, "eval.every": 1, "eval.max_examples": 8, "data.public_samples": 4,
                          "oda.pre_epochs": 0, "oda.re_align": False, "model.name": str(tiny_model_dir)},
            "grid": {"methods": ["fedsoda"], "tasks": ["sst2"], "seeds": [0, 1], "lr": [1e-3, 3e-3]}}
    path = _write(tmp_path, spec)
    res, runs = tmp_path / "results", tmp_path / "runs"
    p = subprocess.run([sys.executable, "-m", "fedsoda_mpi.study", "run", path, "--results", str(res), "--runs",
                        str(runs)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    done = M.summaries(res)
    assert sorted(done) == sorted(r.id for r in E.load(path).runs)
    sel = json.loads((res / "selection.json").read_text())["selected"][0]
    seed1 = done["seeds-fedsoda-sst2-smollm2-iid-s1"]
    assert seed1["lr"] == sel["lr"] and seed1["variant"] == "main" and seed1["n_val"] == 8 and seed1["n_eval"] == 8
    grid = [s for s in done.values() if s["stage"] == "grid"]
    other_lr = [x for x in (1e-3, 3e-3) if x != sel['lr']][0]
    assert sorted(s["variant"] for s in grid) == sorted(["main", f"lr={other_lr:g}"])
    assert sum(s["base_accuracy"] is not None for s in done.values()) == 1
    assert sum(s["base_eval_s"] is not None for s in done.values()) == 1  # timed where the base was evaluated
    based = [s for s in done.values() if s["base_pred_counts"]]  # and its answers per class recorded there
    assert len(based) == 1 and sum(based[0]["base_pred_counts"]) == 8
    assert all(s["eval_s"] > 0 for s in done.values())  # the final test evaluation, full model and sub-LLM
    assert sum(seed1["pred_counts"]) == sum(seed1["label_counts"]) == 8 and sum(seed1["sub_pred_counts"]) == 8
    with h5py.File(runs / seed1["run"] / "run.h5", "r") as f:
        cfg = json.loads(f.attrs["config_json"])
        assert cfg["fed"]["lr"] == sel["lr"] and cfg["seed"] == 1
        assert f["data/val_index"].shape == (8,) and f["data"].attrs["val_seed"] == 2508
    again = subprocess.run([sys.executable, "-m", "fedsoda_mpi.study", "run", path, "--results", str(res), "--runs",
                            str(runs)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and "mpirun" not in again.stdout  # everything done: nothing is run again


def test_a_failed_grid_run_is_ranked_last_and_a_pending_key_has_no_main(tmp_path, capsys):
    """A grid run that failed (failed summary, no val_accuracy) never blocks the selection and is never chosen;
    grid runs of a key whose selection became pending lose their "main" label; `args` runs a failed run again (the
    Slurm route retries it like `study run`) and exits 3 for a done one."""
    path = _write(tmp_path, TOY)
    st = E.load(path)
    grid = {(r.method, r.lr): r for r in st.stage("grid")}
    res = tmp_path / "results"
    res.mkdir()
    (res / f"{grid['fedsoda', 1e-3].id}.json").write_text(json.dumps(_summary(grid["fedsoda", 1e-3], 0.6)))
    failed = M.failed_summary(grid["fedsoda", 3e-3], 3e-3, "toy", 1)
    (res / f"{grid['fedsoda', 3e-3].id}.json").write_text(json.dumps(failed))
    assert L.write_selection(st, res) == {("fedsoda", "sst2", "smollm2", "iid"): 1e-3}
    assert failed["status"] == "failed" and failed["val_accuracy"] is None and failed["variant"] == ""
    (res / f"{grid['fedsoda', 1e-3].id}.json").write_text(json.dumps(M.failed_summary(grid["fedsoda", 1e-3], 1e-3,
                                                                                     "toy", 1)))
    assert L.write_selection(st, res) == {}  # every lr failed: nothing to select
    index = str(st.stage("grid").index(grid["fedsoda", 1e-3]))
    assert S.main(["args", path, "grid", index, "--results", str(res), "--runs", str(tmp_path / "runs")]) == 0
    assert "fed.lr=0.001" in capsys.readouterr().out  # the failed run's arguments: it runs again
    assert (res / f"{grid['fedsoda', 1e-3].id}.json").exists()  # (its failed summary stays until it succeeds)
    # a key that was selected becomes pending (here: its summaries replaced): its grid runs lose "main"
    (res / f"{grid['fedsoda', 1e-3].id}.json").write_text(json.dumps({**_summary(grid["fedsoda", 1e-3], 0.6),
                                                                      "variant": "main"}))
    (res / f"{grid['fedsoda', 3e-3].id}.json").unlink()
    L.write_selection(st, res)
    assert json.loads((res / f"{grid['fedsoda', 1e-3].id}.json").read_text())["variant"] == ""
    assert S.main(["args", path, "grid", index, "--results", str(res)]) == S.DONE_EXIT


def test_an_lr_added_to_one_method_supersedes_its_runs_at_the_old_selection(tmp_path, capsys):
    """grid.lr_extend adds lr 1e-2 to FedSODA's grid only; when it wins on validation, a seeds run summarized at the
    old selection (3e-3) is stale: `list` says so, `args` moves its summary to superseded/ and its run folder aside
    (nothing measured is deleted) and gives the arguments at 1e-2; a summary at the selected lr stays done."""
    spec = {**TOY, "grid": {**TOY["grid"], "lr_extend": {"fedsoda": [1e-2]}}}
    path = _write(tmp_path, spec)
    st = E.load(path)
    lrs = {m: sorted(r.lr for r in st.stage("grid") if r.method == m) for m in ("fedsoda", "fedot")}
    assert lrs == {"fedsoda": [1e-3, 3e-3, 1e-2], "fedot": [1e-3, 3e-3]}
    grid = {(r.method, r.lr): r for r in st.stage("grid")}
    res, runs = tmp_path / "results", tmp_path / "runs"
    res.mkdir()
    for lr, val in ((1e-3, 0.6), (3e-3, 0.7)):
        (res / f"{grid['fedsoda', lr].id}.json").write_text(
            json.dumps({**_summary(grid["fedsoda", lr], val), "lr": lr}))
    seeds = [r for r in st.stage("seeds") if r.method == "fedsoda"]
    for r in seeds:  # both ran at the selection of the old grid, 3e-3
        (res / f"{r.id}.json").write_text(json.dumps({**_summary(r, 0.7), "lr": 3e-3}))
    (runs / seeds[0].id).mkdir(parents=True)
    (runs / seeds[0].id / "run.h5").write_text("the old run")
    assert S.main(["list", path, "--results", str(res)]) == 0
    assert f"done  {seeds[0].id}  lr=selected (pending)" in capsys.readouterr().out  # 1e-2 unfinished: not stale yet
    (res / f"{grid['fedsoda', 1e-2].id}.json").write_text(json.dumps({**_summary(grid["fedsoda", 1e-2], 0.8),
                                                                        "lr": 1e-2}))
    (res / f"{seeds[1].id}.json").write_text(json.dumps({**_summary(seeds[1], 0.7), "lr": 1e-2}))
    assert S.main(["list", path, "--results", str(res)]) == 0
    out = capsys.readouterr().out
    assert f"stale  {seeds[0].id}  lr=0.01" in out and f"done  {seeds[1].id}  lr=0.01" in out
    index = st.stage("seeds").index(seeds[0])
    assert S.main(["args", path, "seeds", str(index), "--results", str(res), "--runs", str(runs)]) == 0
    cap = capsys.readouterr()
    assert "fed.lr=0.01" in cap.out and "starts over" in cap.out
    assert not (res / f"{seeds[0].id}.json").exists() and not (runs / seeds[0].id).exists()
    assert json.loads((res / "superseded" / f"{seeds[0].id}.lr0.003.json").read_text())["lr"] == 3e-3
    assert (runs / f"{seeds[0].id}.lr0.003" / "run.h5").read_text() == "the old run"
    assert S.main(["args", path, "seeds", str(st.stage("seeds").index(seeds[1])), "--results", str(res)]) == S.DONE_EXIT


def test_run_filters_select_by_stage_task_and_variant(tmp_path, capsys):
    """`study run --stage/--task/--variant` pass a run only when it meets every given filter; an unknown stage, task
    or variant name is refused before anything runs (exit 2, the study's names listed)."""
    st = E.load(_write(tmp_path, TOY))
    picked = [r.id for r in st.runs if E.wanted(r, variants=["no_pre"])]
    assert picked and all(r.variant == "no_pre" for r in st.runs if r.id in picked)
    assert all(r.variant == "no_pre" for r in st.runs if E.wanted(r, stages=["ablation"], variants=["no_pre"]))
    assert not [r for r in st.runs if E.wanted(r, stages=["grid"], variants=["no_pre"])]
    assert len([r for r in st.runs if E.wanted(r)]) == len(st.runs)
    for flag, name in (("--variant", "no_such"), ("--stage", "abaltion"), ("--task", "sst-2")):
        rc = S.main(["run", _write(tmp_path, TOY), "--results", str(tmp_path / "res"), "--runs",
                     str(tmp_path / "runs"), "--stage", "grid", flag, name])
        assert rc == 2 and f"{flag} {name}: not a {flag[2:]} of" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("spec,message", [
    ({**TOY, "np": 1}, "study.np: must be an integer >= 2 (the server rank plus at least one client rank), got 1"),
    ({**TOY, "np": "three"}, "study.np: must be an integer >= 2"),
    ({**TOY, "threads": 0}, "study.threads: must be an integer >= 1"),
    ({**TOY, "variants": [{**TOY["variants"][0], "np": 1}]}, "variants.no_pre.np: must be an integer >= 2"),
    ({**TOY, "grid": {**TOY["grid"], "seeds": [0, 0]}}, "grid.seeds: 0 is given twice; give each value once"),
    ({**TOY, "grid": {**TOY["grid"], "seeds": [0, "x"]}},
     "grid.seeds: expected seeds, integers in [0, 2**32), got 'x'"),
    ({**TOY, "variants": [{**TOY["variants"][0], "seeds": [1, 1]}]}, "variants.no_pre.seeds: 1 is given twice"),
    ({**TOY, "grid": {**TOY["grid"], "methods": ["fedsoda", "fedsoda"]}},
     "grid.methods: 'fedsoda' is given twice"),
    ({**TOY, "grid": {**TOY["grid"], "lr": ["abc"]}},
     "grid.lr: expected learning rates, finite numbers > 0, got 'abc'"),
    ({**TOY, "grid": {**TOY["grid"], "lr": [1e-3, -1]}},
     "grid.lr: expected learning rates, finite numbers > 0, got -1"),
    ({**TOY, "grid": {**TOY["grid"], "lr": [1e-3, 0.001]}}, "grid.lr: 0.001 is given twice"),
    ({**TOY, "variants": [{**TOY["variants"][0], "lr": "fast"}]},
     "variants.no_pre.lr: expected learning rates, finite numbers > 0 (or 'selected'), got 'fast'"),
])
def test_study_settings_are_checked_when_loaded(tmp_path, capsys, spec, message):
    """np (>= 2: `np: 1` was accepted, failed at launch and then counted as done), seeds and other axis values
    (unique: `seeds: [0, 0]` blamed the variant names) and learning rates (numbers: `lr: [abc]` gave a ValueError
    traceback) are checked when the study is loaded: one line, exit 2."""
    assert S.main(["list", _write(tmp_path, spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsoda-mpi: study error: ") and message in err and err.count("\n") == 1, err


def test_a_failed_run_is_listed_as_failed_and_run_again(tmp_path, capsys, monkeypatch):
    """A failed run is `failed` in `study list` (it was `done`), and `study run` starts it again (it did nothing and
    exited 0); the failure line quotes the run's own error and names only files that exist."""
    spec = {**TOY, "grid": {**TOY["grid"], "methods": ["fedsoda"], "seeds": [0], "lr": [1e-3]}, "variants": []}
    path = _write(tmp_path, spec)
    res, runs = tmp_path / "results", tmp_path / "runs"
    run_id = E.load(path).runs[0].id
    launched = []

    def launch(run, lr, run_dir):  # what a run refused at start leaves: mpirun's output, no log.txt
        launched.append(run.id)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "stdout.txt", "a") as f:
            f.write(f"fedsoda-mpi: config error: attempt {len(launched)} refused\nmpirun noise\n")
        return 2, 0

    monkeypatch.setattr(S, "_launch", launch)
    assert S.main(["run", path, "--results", str(res), "--runs", str(runs)]) == 1
    out = capsys.readouterr().out
    assert (f"[study] {run_id}: exit code 2: fedsoda-mpi: config error: attempt 1 refused; "
            f"see {runs / run_id}/stdout.txt") in out and "log.txt" not in out
    assert S.main(["list", path, "--results", str(res)]) == 0
    out = capsys.readouterr().out
    assert "stage grid: 1 runs, 0 done, 1 failed" in out and f"  failed  {run_id}  lr=0.001" in out
    assert S.main(["run", path, "--results", str(res), "--runs", str(runs)]) == 1
    out = capsys.readouterr().out
    assert launched == [run_id, run_id] and f"{run_id}: it failed before; running it again" in out
    assert "attempt 2 refused" in out and "attempt 1" not in out  # this attempt's line, not an older one's
    assert json.loads((res / f"{run_id}.json").read_text())["status"] == "failed"


@pytest.mark.mpi
def test_a_run_that_fails_at_launch_is_failed_and_run_again_under_mpirun(tmp_path):
    """The real route: a run that its mpirun refuses at start (a model folder that does not exist; `np: 1` did the
    same before np was checked) leaves no log.txt; `study run` quotes the run's one-line error, names the stdout.txt
    that holds it, lists the run as failed, and the next `study run` starts it again (it did nothing, exit 0)."""
    import subprocess
    import sys

    spec = {"name": "tiny", "job": "jobs/smollm2_sst2_iid.yaml", "np": 2,
            "overrides": {"fed.rounds": 1, "fed.clients": 1, "eval.every": 1, "model.name": str(tmp_path / "no-model")},
            "grid": {"methods": ["fedsoda"], "tasks": ["sst2"], "seeds": [0], "lr": [1e-3]}}
    path = _write(tmp_path, spec)
    where = ["--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]
    run_id = E.load(path).runs[0].id
    out = tmp_path / "runs" / run_id / "stdout.txt"
    for attempt in (1, 2):
        p = subprocess.run([sys.executable, "-m", "fedsoda_mpi.study", "run", path, *where], capture_output=True,
                           text=True, timeout=600, cwd=ROOT)
        assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
        assert f"[study] {run_id}: exit code 2: fedsoda-mpi: config error: model.name: " in p.stdout, p.stdout[-3000:]
        assert p.stdout.rstrip().endswith(f"; see {out}") and out.is_file(), p.stdout[-3000:]
        assert not (tmp_path / "runs" / run_id / "log.txt").exists()
        assert ("it failed before; running it again" in p.stdout) == (attempt == 2)
        listed = subprocess.run([sys.executable, "-m", "fedsoda_mpi.study", "list", path, *where[:2]],
                                capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert f"  failed  {run_id}  lr=0.001" in listed.stdout, listed.stdout


def test_lr_steps_move_along_the_1_3_10_ladder_from_the_selection(tmp_path, capsys):
    """variants.lr_steps: one run per step from the selected lr (a grid around a selection not known when the study
    is written); the id names the step, the lr resolves once the selection exists; summaries record the step."""
    assert [L.lr_step(1e-3, k) for k in (-2, -1, 0, 1, 2)] == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    assert [L.lr_step(3e-2, k) for k in (-1, 1)] == [1e-2, 1e-1] and L.lr_step(5e-5, 2) == 5e-4
    spec = {**TOY, "variants": [{"group": "budget", "name": "x64", "method": "fedsoda", "tasks": ["sst2"],
                                 "lr_steps": [0, -1, 1], "seeds": [0, 1],
                                 "overrides": {"data.max_train_per_client": 64}}]}
    path = _write(tmp_path, spec)
    st = E.load(path)
    runs = st.stage("budget")
    assert [r.id for r in runs[:3]] == ["budget.x64-fedsoda-sst2-smollm2-iid-step+0-s0",
                                        "budget.x64-fedsoda-sst2-smollm2-iid-step+0-s1",
                                        "budget.x64-fedsoda-sst2-smollm2-iid-step-1-s0"]  # step-major
    assert [r.lr_step for r in runs] == [0, 0, -1, -1, 1, 1] and all(r.lr is None for r in runs)
    cfg = load_config(runs[0].job, runs[0].args(1e-3, tmp_path / "r")[2:])
    assert cfg.data.max_train_per_client == 64  # the variant's override wins over the study's
    res = tmp_path / "results"
    res.mkdir()
    assert all(L.lr_for(r, L.write_selection(st, res)) is None for r in runs)  # pending until the grid is done
    grid = {(r.method, r.lr): r for r in st.stage("grid") if r.seed == 0}
    for (method, lr), val in (((("fedsoda", 1e-3), 0.7)), (("fedsoda", 3e-3), 0.6)):
        (res / f"{grid[method, lr].id}.json").write_text(json.dumps({**_summary(grid[method, lr], val), "lr": lr}))
    chosen = L.write_selection(st, res)
    assert [L.lr_for(r, chosen) for r in runs] == [1e-3, 1e-3, 3e-4, 3e-4, 3e-3, 3e-3]
    assert S.main(["list", path, "--results", str(res)]) == 0
    assert "todo  budget.x64-fedsoda-sst2-smollm2-iid-step-1-s0  lr=0.0003" in capsys.readouterr().out
    failed = M.failed_summary(runs[2], 3e-4, "toy", 1)
    assert failed["lr_step"] == -1 and "lr_step" not in M.failed_summary(grid["fedsoda", 1e-3], 1e-3, "toy", 1)
    bad = {**spec, "variants": [{**spec["variants"][0], "lr_steps": [0, 0]}]}
    assert S.main(["list", _write(tmp_path, bad)]) == 2
    assert "lr_steps: expected a list of distinct integers" in capsys.readouterr().err


def _source_summary(run, lr, **change):
    """A finished summary of another study for `run` at `lr`, with the settings its resolved config gives."""
    cfg = load_config(run.job, run.args(lr, __import__("pathlib").Path("x"))[2:]).to_dict()
    over = [o for o in run.overrides if not o.startswith("eval.base=")] + ["eval.base=true"]
    out = {"run": "other-" + run.id, "status": "ok", "stage": "seeds", "variant": "main", "method": run.method,
           "task": run.task, "model": run.model, "model_name": cfg["model"]["name"], "split": run.split,
           "seed": run.seed, "lr": lr, "overrides": over, "rounds": cfg["fed"]["rounds"],
           "clients": cfg["fed"]["clients"], "examples_per_client": cfg["data"]["max_train_per_client"],
           "pooled_clients": 0, "eval_dtype": cfg["eval"]["dtype"], "settings": M.settings(cfg),
           "val_accuracy": 0.7, "accuracy": 0.8, "commit": "abc"}
    out.update(change)
    return out


def test_reuse_copies_only_runs_with_identical_resolved_settings(tmp_path, capsys):
    """A study's `reuse` folders: a finished run there with the same method, task, model, split, seed, lr, overrides
    (eval.base aside) and resolved settings is copied under this study's id (reused_from), never run again; an
    override or a setting that differs, another seed or lr, or a failed run is not reused. A setting an older
    summary lacks matches only at its default."""
    src = tmp_path / "old"
    src.mkdir()
    spec = {**TOY, "reuse": [str(src)]}
    path = _write(tmp_path, spec)
    st = E.load(path)
    assert st.reuse == [src]
    grid = {(r.method, r.lr, r.seed): r for r in st.stage("grid")}
    a, b, c = grid["fedsoda", 1e-3, 0], grid["fedsoda", 3e-3, 0], grid["fedot", 1e-3, 0]
    old = _source_summary(a, 1e-3)
    old["settings"] = {k: v for k, v in old["settings"].items() if k not in ("trigger", "sgp_auto")}  # predates them
    srcs = {"a": old,
            "b_other_mu": _source_summary(b, 3e-3, overrides=[*_source_summary(b, 3e-3)["overrides"], "fed.mu=0"]),
            "b_other_seed": _source_summary(b, 3e-3, seed=1),
            "b_other_lr": _source_summary(b, 1e-3),
            "b_failed": _source_summary(b, 3e-3, status="failed"),
            "c_other_setting": _source_summary(c, 1e-3, settings={**_source_summary(c, 1e-3)["settings"],
                                                                  "trigger": "drift"})}
    for name, s in srcs.items():
        (src / f"{name}.json").write_text(json.dumps(s))
    res = tmp_path / "results"
    res.mkdir()
    R.reuse_all(st, res)
    copied = json.loads((res / f"{a.id}.json").read_text())
    assert copied["reused_from"] == "old/a" and copied["run"] == a.id and copied["stage"] == "grid"
    assert copied["overrides"] == list(a.overrides) and copied["val_accuracy"] == 0.7 and copied["commit"] == "abc"
    assert not (res / f"{b.id}.json").exists() and not (res / f"{c.id}.json").exists()
    assert "identical to old/a" in capsys.readouterr().out
    assert S.main(["list", path, "--results", str(res)]) == 0
    assert f"done  {a.id}" in capsys.readouterr().out


def test_evidence_ii_study_selects_over_three_seeds_and_evaluates_in_float32():
    ii = E.load(ROOT / "studies/cpu_smollm2_ii.yaml")
    assert ii.select_seeds == [0, 1, 2] and not ii.stage("seeds") and len(ii.stage("grid")) == 3 * (5 + 3 * 3)
    assert ii.reuse == []  # the first study's runs evaluated in bfloat16: none has this study's settings
    assert {"eval.dtype=float32", "eval.every=10"} <= set(ii.stage("grid")[0].overrides)
    budget = ii.stage("budget")
    assert len(budget) == 5 * 3 * 3 and {r.lr_step for r in budget} == {-1, 0, 1}
    assert {r.key[0] for r in budget if "fed_last3" in r.variant} == {"fedsoda"}  # paired with FedSODA's lr
    assert {r.split for r in ii.stage("noniid")} == {"dirichlet-0.1", "dirichlet-1.0"}
    assert all(r.key[3] == "iid" for r in ii.stage("noniid"))
