"""Every setting documented from one source: docs/config.md is what `python -m fedsoda_mpi.config_docs` makes of the
config dataclasses, every key has a meaning, every environment variable the scripts read is listed; `--help` names the
sections and docs/config.md, `--print-config` prints the resolved config without MPI."""
import re
import subprocess
import sys

import pytest
import yaml

from fedsoda_mpi import config_docs
from fedsoda_mpi.config import ConfigError, flatten, load_config
from fedsoda_mpi.main import main, parse_args
from tests.conftest import ROOT


def test_docs_config_md_is_current():
    assert config_docs.OUT.read_text() == config_docs.render(), "run: python -m fedsoda_mpi.config_docs"


def test_every_key_has_a_type_default_meaning_and_methods():
    rows = {row[0]: row for _, section in config_docs.key_rows() for row in section}
    assert set(rows) == set(flatten(load_config(None, []).to_dict()))
    assert [key for key, row in rows.items() if not row[4]] == [], "keys without a comment in config.py"
    for key in ("data.task", "model.dtype", "model.adapter_first", "sgp.enabled", "data.public_max_len",
                "oda.re_epochs", "quant.compute_dtype", "quant.double_quant", "eval.max_new_tokens"):
        assert f"| `{key}` |" in config_docs.render()
    assert rows["fed.mu"][5] == "all (preset fedpetuning: `0.0`; fedot: `0.0`; fedbiot: `0.0`)"
    assert rows["quant.double_quant"][5] == "fedsoda" and rows["sgp.spacing"][5] == "fedot, fedbiot"
    assert rows["data.task"][3] == "`sst2`, `boolq`, `gsm8k`, `custom`" and rows["fed.upload_density"][3] == "in (0, 1]"
    assert rows["data.task"][1] == rows["eval.dtype"][1] == "str"  # a Literal choice key: the type of its choices
    assert rows["eval.max_examples"][6] == 200  # the default job's value, beside the dataclass default


def test_every_environment_variable_the_scripts_read_is_documented():
    documented = {name.strip() for names, _, _ in config_docs.ENV_VARS for name in names.split(",")}
    scripts = "\n".join(p.read_text() for p in sorted((ROOT / "slurm").glob("*.sh")))
    code = "\n".join(p.read_text() for p in sorted((ROOT / "fedsoda_mpi").glob("*.py")))
    read = set(re.findall(r"\$\{?((?:FEDSODA|RUN|JOB|STUDY|SUBMIT|SMOKE|PREPARE)_?[A-Z_]*)", scripts))
    read |= set(re.findall(r"environ(?:\.get\(|\[)\"(FEDSODA_[A-Z_]+)", code))
    internal = {"FEDSODA_STEP_PID", "FEDSODA_STOP_REQUESTED"}  # variables of slurm/common.sh itself
    assert sorted(read - internal - documented) == []


def test_help_lists_the_sections_and_points_to_docs_config_md(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "docs/config.md" in out and "--print-config" in out
    assert all(f"  {name}.*" in out for name in config_docs.SECTIONS if name)


def test_print_config_prints_the_resolved_yaml_and_exits_0_without_mpi(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("method: fedbiot\nfed:\n  mu: 0.05\n  rounds: 4\n")
    code = ("import sys; from fedsoda_mpi.main import main; rc = main(sys.argv[1:]); "
            "assert 'mpi4py' not in sys.modules, 'MPI imported'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "--print-config", "--config", str(job), "fed.rounds=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    printed = yaml.safe_load(p.stdout)
    assert printed == load_config(job, ["fed.rounds=2"]).to_dict()
    assert printed["fed"]["mu"] == 0.05 and printed["fed"]["rounds"] == 2 and printed["oda"]["every"] == 1


def test_print_config_with_a_bad_key_is_one_line_and_exit_2(capsys):
    assert main(["--print-config", "fed.rouns=2"]) == 2
    err = capsys.readouterr().err
    assert err == "fedsoda-mpi: config error: unknown config key 'fed.rouns' (did you mean 'fed.rounds'?)\n"
    assert parse_args(["--print-config", "seed=1"]) == (None, ["seed=1"])
    with pytest.raises(ConfigError):
        parse_args(["--print-config=yes"])
