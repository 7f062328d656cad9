"""Config: YAML + overrides, type errors, typo suggestions, presets, exit code 2 on every rank under mpirun."""
import shutil

import pytest

from fedsoda_mpi.config import DEFAULT_JOB, ConfigError, flatten, load_config, preset_keys_set_by_job, to_yaml, validate
from fedsoda_mpi.data import FIX
from fedsoda_mpi.methods import PRESETS
from tests.conftest import ROOT, mpirun


def test_default_job_loads_with_required_keys():
    cfg = load_config()
    assert cfg.job == str(DEFAULT_JOB)
    assert (cfg.method, cfg.seed, cfg.resume) == ("fedsoda", 0, "none")
    assert cfg.fed.rounds == 10 and cfg.fed.clients == 10 and cfg.fed.local_steps == 0 and cfg.fed.local_epochs == 1
    assert cfg.eval.max_examples == 200 and cfg.output.dir == "" and cfg.fed.checkpoint_every == 1
    assert cfg.debug.fail_rank == -1 and cfg.debug.fail_round == -1
    assert (cfg.sgp.n, cfg.sgp.p, cfg.model.adapter_layers, cfg.lora.r, cfg.lora.alpha) == (3, 4, 3, 8, 16)


def test_overrides_are_typed():
    cfg = load_config(None, ["fed.rounds=2", "fed.lr=5e-5", "quant.enabled=false", "lora.target_modules=q_proj,v_proj",
                             "output.dir=/tmp/x"])
    assert cfg.fed.rounds == 2 and cfg.fed.lr == 5e-5 and cfg.quant.enabled is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.output.dir == "/tmp/x"


@pytest.mark.parametrize("arg,msg", [
    ("fed.rounds=two", "fed.rounds: expected an integer, got 'two'"),
    ("fed.rounds=1.5", "fed.rounds: expected an integer"),
    ("quant.enabled=maybe", "quant.enabled: expected true/false"),
    ("fed.lr=fast", "fed.lr: expected a number"),
    ("fed.rouns=2", "unknown config key 'fed.rouns' (did you mean 'fed.rounds'?)"),
    ("fed=2", "is a section"),
    ("oda.every=0", "oda.every: the re-alignment interval r must be >= 1"),
    ("data.split=dirichlet", None),
    ("data.dirichlet_beta=0", "data.dirichlet_beta: must be > 0"),
    ("method=fedfoo", "method: 'fedfoo' is not one of"),
    ("rounds", "overrides are key=value"),
    ("lora.r=0", "lora.r: must be >= 1, got 0"),
    ("fed.upload_density=0.5", "fed.upload_density=0.5: sparse transfer needs fed.aggregator=fedsrd or fedsrd-e"),
    ("fed.aggregator=fedprox", "fed.aggregator: expected fedavg, fedsrd or fedsrd-e, got 'fedprox'"),
    ("debug.fail_kind=segfault", "debug.fail_kind: expected raise, oom or nan"),
])
def test_bad_values_give_one_line(arg, msg):
    if msg is None:
        load_config(None, [arg])
        return
    with pytest.raises(ConfigError) as e:
        load_config(None, [arg])
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_checks_that_need_world_size_or_layers():
    cfg = load_config()
    with pytest.raises(ConfigError, match="world size 1"):
        validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match="fewer than the 11 client ranks"):
        validate(cfg, world_size=12)
    with pytest.raises(ConfigError, match="adapter_layers=3 .* must be smaller"):
        validate(cfg, num_layers=3)
    with pytest.raises(ConfigError, match="do not fit"):
        validate(load_config(None, ["sgp.p=7"]), num_layers=30)
    validate(cfg, world_size=11, num_layers=30)


def test_method_preset_then_yaml_then_overrides(tmp_path):
    cfg = load_config(None, ["method=fedpetuning"])
    assert cfg.model.adapter_layers == 0 and cfg.sgp.p == 0 and not cfg.quant.enabled and not cfg.oda.pre_align
    cfg = load_config(None, ["method=fedpetuning", "quant.enabled=true"])
    assert cfg.quant.enabled
    bad = tmp_path / "bad.yaml"
    bad.write_text("fed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.mpi
def test_bad_config_exits_2_on_every_rank_before_mpi_work():
    p = mpirun(3, ["-m", "fedsoda_mpi.main", "fed.rouns=2"], timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr[-1500:])
    lines = [ln for ln in p.stderr.splitlines() if "config error" in ln]
    assert lines == ["fedsoda-mpi: config error: unknown config key 'fed.rouns' (did you mean 'fed.rounds'?)"]
    assert "Traceback" not in p.stderr


def test_a_finished_run_is_refused_unless_resumed_a_failed_one_is_moved_aside(tmp_path, tiny_model_dir):
    """A folder with a FINISHED run (run.h5 with /final) is refused without resume=auto; an unfinished attempt
    (a crash: no /final, or a truncated run.h5) does not block the same command, which moves it aside."""
    import h5py

    from fedsoda_mpi.main import prepare_config
    from fedsoda_mpi.runlog import archive_failed_attempt

    model = f"model.name={tiny_model_dir}"
    with h5py.File(tmp_path / "run.h5", "w") as f:
        f.create_group("final")
    with pytest.raises(ConfigError, match=r"already holds a finished run \(run.h5 with /final\); extend it with"):
        prepare_config([model, f"output.dir={tmp_path}"], world_size=3)
    (tmp_path / "checkpoints" / "round00001").mkdir(parents=True)  # (without one it cannot be continued)
    assert prepare_config([model, f"output.dir={tmp_path}", "resume=auto"], world_size=3).resume == "auto"
    assert prepare_config([model, f"output.dir={tmp_path / 'new'}"], world_size=3).output.dir == str(tmp_path / "new")
    failed = tmp_path / "failed_run"
    (failed / "checkpoints" / "round00001").mkdir(parents=True)
    (failed / "run.h5").write_bytes(b"\x89HDF\r\n")  # cut short by a crash
    (failed / "log.txt").write_text("[rank 0] FATAL RuntimeError: boom\n")
    (failed / "log.rank1.txt").write_text("")
    (failed / "notes.md").write_text("mine")
    assert prepare_config([model, f"output.dir={failed}"], world_size=3).output.dir == str(failed)
    moved = archive_failed_attempt(failed)
    assert moved.parent == failed and moved.name.startswith("failed-")
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoints", "log.rank1.txt", "log.txt", "run.h5"]
    assert "FATAL" in (moved / "log.txt").read_text() and (failed / "notes.md").exists()
    assert archive_failed_attempt(failed) is None  # nothing left to move


def test_resume_needs_a_fixed_run_folder_and_the_same_settings(tmp_path, tiny_model_dir, monkeypatch):
    from fedsoda_mpi.config import load_config, to_yaml
    from fedsoda_mpi.main import prepare_config

    model = f"model.name={tiny_model_dir}"
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ConfigError, match="resume=auto: set output.dir"):
        prepare_config([model, "resume=auto"], world_size=3)
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(None, [model, "fed.lr=0.002", f"output.dir={tmp_path}"])))
    with pytest.raises(ConfigError, match=r"resume=auto: fed.lr is 0.002 in the run at .* but 0.001 now"):
        prepare_config([model, f"output.dir={tmp_path}", "resume=auto"], world_size=3)
    # rounds, eval and checkpoint keys may change on resume (e.g. extend a finished run)
    cfg = prepare_config([model, f"output.dir={tmp_path}", "resume=auto", "fed.lr=0.002", "fed.rounds=20",
                          "eval.every=1"], world_size=3)
    assert cfg.fed.rounds == 20


@pytest.mark.mpi
def test_missing_data_file_exits_2_with_one_line(tmp_path, tiny_model_dir):
    p = mpirun(3, ["-m", "fedsoda_mpi.main", f"model.name={tiny_model_dir}"], timeout=120,
               env={"FEDSODA_DATA": str(tmp_path)})
    assert p.returncode == 2, (p.returncode, p.stderr[-1500:])
    lines = [ln for ln in p.stderr.splitlines() if "fedsoda-mpi:" in ln]
    assert lines == [f"fedsoda-mpi: data error: missing data file {tmp_path}/sst2/train.jsonl; {FIX}"], lines
    assert "Traceback" not in p.stderr


def test_damaged_model_weights_fail_before_mpi_work(tmp_path, tiny_model_dir):
    from fedsoda_mpi.main import prepare_config, prepare_inputs
    from fedsoda_mpi.models import ModelError

    bad = tmp_path / "tiny-damaged"
    shutil.copytree(tiny_model_dir, bad, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(weights[:len(weights) // 4])  # header intact, data cut
    cfg = prepare_config([f"model.name={bad}"], world_size=3)
    with pytest.raises(ModelError,
                       match=r"model.safetensors is damaged \(.*incomplete metadata.*\); delete the folder"):
        prepare_inputs(cfg)


def test_unsplittable_dirichlet_is_a_data_error(tiny_model_dir):
    from fedsoda_mpi.data import DataError
    from fedsoda_mpi.main import prepare_config, prepare_inputs

    cfg = prepare_config([f"model.name={tiny_model_dir}", "data.task=boolq", "data.split=dirichlet",
                          "data.dirichlet_beta=0.0001", "fed.clients=400"], world_size=3)
    with pytest.raises(DataError, match="data.split=dirichlet: Dirichlet beta=0.0001 left a client empty"):
        prepare_inputs(cfg)


def test_missing_model_folder_is_named_as_given():
    from fedsoda_mpi.main import prepare_config

    with pytest.raises(ConfigError, match=r"^model.name: model folder /nonexistent/model has no config.json; prepare"):
        prepare_config(["model.name=/nonexistent/model"], world_size=3)
    with pytest.raises(ConfigError, match=r"model folder .*/models/no-such-model has no config.json"):
        prepare_config(["model.name=no-such-model"], world_size=3)


def test_study_keys_are_validated():
    """data.pooled_clients needs fed.clients=1; eval.dtype and data.val_size have their own checks."""
    with pytest.raises(ConfigError,
                       match=r"data.pooled_clients=10: pools every partition into one client; set fed.clients=1"):
        load_config(None, ["data.pooled_clients=10"])
    load_config(None, ["data.pooled_clients=10", "fed.clients=1"])
    with pytest.raises(ConfigError, match=r"eval.dtype: expected float32 or bfloat16, got 'int8'"):
        load_config(None, ["eval.dtype=int8"])
    with pytest.raises(ConfigError, match=r"data.val_size: must be >= 0, got -1"):
        load_config(None, ["data.val_size=-1"])


def test_preset_then_job_file_then_command_line(tmp_path):
    """One order everywhere: the method preset, then the job file, then key=value overrides; a key given
    explicitly (in the file or on the command line) always wins over the preset."""
    job = tmp_path / "job.yaml"
    job.write_text("method: fedbiot\noda:\n  every: 2\nmodel:\n  adapter_layers: 4\n")
    cfg = load_config(job)
    assert cfg.oda.every == 2 and cfg.model.adapter_layers == 4  # the file over the preset (oda.every=1)
    assert not cfg.quant.enabled and cfg.fed.mu == 0.0 and not cfg.sgp.enabled  # the keys the file leaves: preset
    assert load_config(job, ["oda.every=3"]).oda.every == 3  # the command line over the file
    cfg = load_config(job, ["method=fedpetuning"])  # the method of the command line picks the preset
    assert cfg.method == "fedpetuning" and cfg.sgp.p == 0 and cfg.model.adapter_layers == 4
    assert preset_keys_set_by_job(cfg) == ["model.adapter_layers=4 (the fedpetuning preset: 0)"]
    assert preset_keys_set_by_job(load_config(job, ["method=fedpetuning", "model.adapter_layers=2"])) == []
    cfg = load_config(None, ["method=fedpetuning", "model.adapter_layers=3"])
    assert cfg.model.adapter_layers == 3 and cfg.sgp.p == 0
    saved = tmp_path / "config.yaml"  # a run's resolved settings, given as the job file, are that run's settings
    saved.write_text(to_yaml(cfg))
    again = load_config(saved)
    assert again.to_dict() == {**cfg.to_dict(), "job": str(saved)}


@pytest.mark.parametrize("job", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_job_files_leave_the_preset_keys_to_the_presets(job):
    """`method=X` on any shipped job file gives preset X (the study's baselines and the committed results resolve
    to the same settings as when presets were applied after the job file)."""
    for method, preset in PRESETS.items():
        cfg = load_config(job, [f"method={method}"])
        resolved = flatten(cfg.to_dict())
        assert {k: resolved[k] for k in preset} == preset, method
        assert preset_keys_set_by_job(cfg) == []


@pytest.mark.parametrize("args,changed,message", [
    (["method=fedpetuning", "model.adapter_layers=3"], "model.adapter_layers=4",
     "model.adapter_layers is 3 in the run"),
    (["method=fedbiot", "oda.every=2"], "oda.every=1", "oda.every is 2 in the run"),
    (["method=fedpetuning", "fed.mu=0.01"], "fed.mu=0", "fed.mu is 0.01 in the run"),
    (["method=fedot"], "oda.pre_align=false", "oda.pre_align is True in the run"),
])
def test_resume_compares_the_resolved_settings(tmp_path, tiny_model_dir, monkeypatch, args, changed, message):
    """The same command with resume=auto is accepted when it sets a key the method preset also sets (it was refused:
    "model.adapter_layers is 0 in the run", the preset applied again on top of the saved settings); another value
    of that key is still refused."""
    from fedsoda_mpi.main import prepare_config

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    common = [f"model.name={tiny_model_dir}", f"output.dir={tmp_path}"]
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(None, [*common, *args])))  # what the run wrote
    assert prepare_config([*common, *args, "resume=auto"], world_size=3).resume == "auto"
    with pytest.raises(ConfigError, match=message):
        prepare_config([*common, *args, changed, "resume=auto"], world_size=3)


def test_every_study_run_resumes_with_its_own_command(tmp_path):
    """Every run of the shipped studies (fed_last3, fed_last3_lr_pet and central_last3 set a preset key) is accepted
    by resume=auto with its own arguments after an interruption (Slurm requeue, `study run` again)."""
    from fedsoda_mpi import study_expand as E
    from fedsoda_mpi.checkpoint import check_resumable

    import yaml

    checked = set()
    for path in sorted((ROOT / "studies").glob("*.yaml")):
        st = E.expand(yaml.safe_load(path.read_text()))
        for run in st.runs:  # one run per job file, method and overrides (seed, task and lr touch no preset key)
            if (run.job, run.method, run.overrides) in checked:
                continue
            checked.add((run.job, run.method, run.overrides))
            args = run.args(run.lr or st.lr_grid[0], tmp_path)
            cfg = load_config(ROOT / args[1], args[2:])
            (tmp_path / "config.yaml").write_text(to_yaml(cfg))
            check_resumable(cfg, tmp_path)
    assert len(checked) > 40


def test_overrides_may_come_before_and_after_config_and_a_bad_option_is_one_config_error():
    """`a=1 --config f b=2` was refused with usage text printed by every rank; an unknown option likewise."""
    from fedsoda_mpi.main import parse_args

    assert (parse_args(["fed.rounds=1", "--config", "jobs/x.yaml", "seed=2"])
            == ("jobs/x.yaml", ["fed.rounds=1", "seed=2"]))
    usage = "(usage: fedsoda_mpi.main [-h] [--config CONFIG] [--print-config] [overrides ...])"
    with pytest.raises(ConfigError) as e:
        parse_args(["--bogus"])
    assert str(e.value) == f"unrecognized arguments: --bogus {usage}"
    with pytest.raises(ConfigError, match=r"^argument --config: expected one argument"):
        parse_args(["--config"])
