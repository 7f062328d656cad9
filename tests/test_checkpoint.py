"""Checkpoints: atomic folders, verified by sha256, newest kept, a corrupted newest one falls back."""
import json

import h5py
import pytest
import torch

from fedsoda_mpi import checkpoint
from fedsoda_mpi.methods import Plan

PLAN = {"num_layers": 4, "adapter_size": 1, "kept": [0, 1, 3], "groups": [[1, 2]], "layer_map": [[0, 0], [1, 1], [2, 3]]}


def _save(run_dir, rnd, keep=2):
    run_file = run_dir / "run.h5"
    with h5py.File(run_file, "a") as f:
        f.attrs["last_round"] = rnd
    adapter = {"layers.17.lora_A": torch.full((2, 3), float(rnd)), "layers.17.lora_B": torch.zeros(3, 2)}
    return checkpoint.save(run_dir, rnd, adapter, {}, run_file, {"plan": PLAN}, keep=keep)


def test_save_load_keep_newest(tmp_path):
    for rnd in (1, 2, 3):
        _save(tmp_path, rnd)
    assert checkpoint.rounds(tmp_path) == [2, 3]
    ck = checkpoint.latest(tmp_path)
    assert ck.round == 3 and ck.emulator == {} and Plan.from_dict(ck.state["plan"]).kept == [0, 1, 3]
    assert torch.equal(ck.adapter["layers.17.lora_A"], torch.full((2, 3), 3.0))
    assert ck.state["rng"] == checkpoint.RNG_SCHEME
    with h5py.File(ck.path / "run.h5", "r") as f:  # the run file as it was at that round
        assert f.attrs["last_round"] == 3
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary folder left


@pytest.mark.parametrize("damage", ["truncate_adapter", "flip_byte_h5", "bad_json", "json_list", "json_no_sums",
                                    "no_plan", "wrong_round", "missing_emulator"])
def test_corrupted_newest_falls_back_with_a_warning(tmp_path, damage):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    if damage == "truncate_adapter":
        p = newest / "adapter.safetensors"
        p.write_bytes(p.read_bytes()[:20])
    elif damage == "flip_byte_h5":
        p = newest / "run.h5"
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))
    elif damage == "bad_json":
        (newest / "state.json").write_text("{not json")
    elif damage == "json_list":  # valid JSON of the wrong shape
        (newest / "state.json").write_text("[]")
    elif damage == "json_no_sums":
        (newest / "state.json").write_text('{"round": 2, "sha256": null}')
    elif damage in ("no_plan", "wrong_round"):  # valid sums, but a KeyError traceback / "round 7 of 3" on resume
        state = json.loads((newest / "state.json").read_text())
        state.pop("plan") if damage == "no_plan" else state.update(round=7)
        (newest / "state.json").write_text(json.dumps(state))
    else:
        (newest / "emulator.safetensors").unlink()
    warnings = []
    ck = checkpoint.latest(tmp_path, warn=warnings.append)
    assert ck.round == 1 and torch.equal(ck.adapter["layers.17.lora_A"], torch.ones(2, 3))
    assert len(warnings) == 1 and "skipping checkpoint round 2" in warnings[0]


def test_partial_temporary_folder_is_ignored(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / "checkpoints" / ".round00002.tmp").mkdir()  # a writer killed before the rename
    assert checkpoint.rounds(tmp_path) == [1] and checkpoint.latest(tmp_path).round == 1
    assert checkpoint.latest(tmp_path / "nothing") is None


def test_state_is_json_and_tensors_are_safetensors(tmp_path):
    path = _save(tmp_path, 4)
    state = json.loads((path / "state.json").read_text())
    assert state["round"] == 4 and set(state["sha256"]) == set(checkpoint.FILES)
    assert sorted(p.name for p in path.iterdir()) == ["adapter.safetensors", "emulator.safetensors", "run.h5",
                                                       "state.json"]
