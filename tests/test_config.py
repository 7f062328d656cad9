"""Config: YAML + overrides, type errors, typo suggestions, presets, exit code 2 on every rank under mpirun."""
import shutil

import pytest

from fedsoda_mpi.config import DEFAULT_JOB, ConfigError, load_config, validate
from fedsoda_mpi.data import FIX
from tests.conftest import mpirun


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
    lines = [l for l in p.stderr.splitlines() if "config error" in l]
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
    lines = [l for l in p.stderr.splitlines() if "fedsoda-mpi:" in l]
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
    with pytest.raises(ModelError, match=r"model.safetensors is damaged \(.*incomplete metadata.*\); delete the folder"):
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
    with pytest.raises(ConfigError, match=r"data.pooled_clients=10: pools every partition into one client; set fed.clients=1"):
        load_config(None, ["data.pooled_clients=10"])
    load_config(None, ["data.pooled_clients=10", "fed.clients=1"])
    with pytest.raises(ConfigError, match=r"eval.dtype: expected float32 or bfloat16, got 'int8'"):
        load_config(None, ["eval.dtype=int8"])
    with pytest.raises(ConfigError, match=r"data.val_size: must be >= 0, got -1"):
        load_config(None, ["data.val_size=-1"])
