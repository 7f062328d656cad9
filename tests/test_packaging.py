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
    for p in ["fedsoda_mpi", "jobs", "slurm", "analysis", "tests", "bench", "environment.yml", "pyproject.toml",
              "Makefile", "README.md", ".ci/run"]:
        assert (ROOT / p).exists(), p


def test_license_and_citation_agree_with_pyproject():
    """LICENSE holds the Apache-2.0 text pyproject.toml names; CITATION.cff cites this version under that license
    and the FedSODA paper (arXiv 2508.12727) as a reference, the paper the README's BibTeX names."""
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    license_text = (ROOT / "LICENSE").read_text()
    assert py["license"]["text"] == "Apache-2.0" and "Apache License\n" in license_text
    assert "Version 2.0, January 2004" in license_text and "END OF TERMS AND CONDITIONS" in license_text
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["version"] == py["version"] and cff["license"] == py["license"]["text"]
    paper = cff["references"][0]
    assert paper["identifiers"][0]["value"] == "arXiv:2508.12727" and paper["title"].startswith("FedSODA:")
    readme = (ROOT / "README.md").read_text()
    assert "eprint        = {2508.12727}" in readme and paper["title"] in readme
