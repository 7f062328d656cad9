"""fedsoda_mpi.summary.RunSummary: the committed summaries (written before schema_version) load, a record round-trips
through its JSON, and files that are not summaries or come from a newer schema are refused in one line."""
import json
from dataclasses import asdict

import pytest

from fedsoda_mpi.summary import SCHEMA_VERSION, RunSummary, SummaryError
from tests.conftest import ROOT


def test_committed_summaries_load_and_round_trip():
    paths = [p for p in sorted((ROOT / "results").glob("*/*.json")) if p.name != "selection.json"]
    assert paths
    for p in paths:
        data = json.loads(p.read_text(encoding="utf-8"))
        s = RunSummary.from_json(data, str(p))
        assert s.schema_version == data.get("schema_version", 0) and s.run == data["run"]
        assert {k: v for k, v in s.to_json().items() if k in data and k != "schema_version"} == \
            {k: v for k, v in data.items() if k != "schema_version"}
        assert RunSummary.from_json(s.to_json()) == RunSummary(**{**asdict(s), "schema_version": SCHEMA_VERSION})


def test_defaults_of_fields_an_old_summary_lacks():
    s = RunSummary.from_json({"run": "r", "stage": "grid", "variant": "main", "method": "fedsoda", "task": "sst2",
                              "seed": 0, "accuracy": 0.5, "unknown_key": 1})
    assert s.schema_version == 0 and s.model == "?" and s.kl_on == "wikitext2" and s.drift_probe == []
    assert s.realignments is None and s.settings == {}
    out = s.to_json()
    assert out["schema_version"] == SCHEMA_VERSION and "unknown_key" not in out
    assert not {"lr_step", "exit_code", "reused_from"} & set(out)  # optional fields only when set


def test_not_a_summary_and_newer_schema_refused():
    with pytest.raises(SummaryError, match=r"x.json: not a run summary \(no seed, accuracy\)"):
        RunSummary.from_json({"run": "r", "stage": "g", "variant": "m", "method": "f", "task": "t"}, "x.json")
    with pytest.raises(SummaryError, match="not a run summary"):
        RunSummary.from_json([1, 2])
    with pytest.raises(SummaryError, match="newer than"):
        RunSummary.from_json({"run": "r", "stage": "g", "variant": "m", "method": "f", "task": "t", "seed": 0,
                              "accuracy": 0.5, "schema_version": SCHEMA_VERSION + 1})
