"""Packaging: environment.yml pins the same versions as pyproject.toml; the layout the README promises exists."""
import re
import tomllib

import yaml

from tests.conftest import ROOT


def _pins(specs: list[str]) -> dict[str, str]:
    out = {}
    for s in specs:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^;\s]+)", s.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_yml_pins_match_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    want = _pins(py["dependencies"] + py["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    got = _pins(pip)
    got.update({k: v for k, v in (c.split("=", 1) for c in conda if "=" in c and not c.startswith("python"))})
    assert "python=3.11" in conda and "openmpi" in conda
    assert {k: got.get(k) for k in want} == want


def test_layout_exists():
    for p in ["fedsoda_mpi", "jobs", "slurm", "analysis", "tests", "bench", "environment.yml", "pyproject.toml", "Makefile",
              "README.md", ".ci/run"]:
        assert (ROOT / p).exists(), p
