"""Checkpoints: atomic folders, verified by sha256, newest kept, a corrupted newest one falls back."""
import json

import h5py
import pytest
import torch

from fedsoda_mpi import checkpoint, seeds
from fedsoda_mpi.methods import Plan

PLAN = {"num_layers": 4, "adapter_size": 1, "kept": [0, 1, 3], "groups": [[1, 2]],
        "layer_map": [[0, 0], [1, 1], [2, 3]]}


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
    assert ck.state["rng"] == seeds.RNG_SCHEME
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


def _finish(run_dir, rounds):
    """Make run_dir/run.h5 the record of a finished run of `rounds` rounds (/rounds/round 1..rounds and /final)."""
    with h5py.File(run_dir / "run.h5", "a") as f:
        if "rounds/round" in f:
            del f["rounds/round"]
        f.create_dataset("rounds/round", data=list(range(1, rounds + 1)))
        f.require_group("final").attrs["accuracy"] = 0.5


def _cfg(run_dir, *args):
    from fedsoda_mpi.config import load_config

    return load_config(None, [f"output.dir={run_dir}", *args])


def test_resume_never_shortens_a_run(tmp_path):
    """resume=auto with fed.rounds below the rounds done is refused with one line (it logged "round 2 of 1" and
    rewrote /final); the same or more rounds pass."""
    from fedsoda_mpi.config import ConfigError

    _save(tmp_path, 2)
    _finish(tmp_path, 2)
    with pytest.raises(ConfigError, match=r"^fed.rounds=1: the run at .* finished after round 2; resume=auto "
                                          r"continues a run, it cannot shorten it: give fed.rounds >= 2"):
        checkpoint.check_resumable(_cfg(tmp_path, "resume=auto", "fed.rounds=1"), tmp_path)
    for rounds in (2, 3):
        checkpoint.check_resumable(_cfg(tmp_path, "resume=auto", f"fed.rounds={rounds}"), tmp_path)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for rnd in (2, 3):
        _save(unfinished, rnd)
    with pytest.raises(ConfigError, match=r"fed.rounds=2: the run at .* has a checkpoint of round 3"):
        checkpoint.check_resumable(_cfg(unfinished, "resume=auto", "fed.rounds=2"), unfinished)


def test_a_finished_run_without_a_checkpoint_is_refused_not_started_over(tmp_path):
    """fed.checkpoint_every=0, then resume=auto fed.rounds=... : refused before MPI work (it started the run over,
    overwriting the finished run.h5 and adapter/ in place)."""
    from fedsoda_mpi.config import ConfigError

    _finish(tmp_path, 2)
    with pytest.raises(ConfigError, match=r"^resume=auto: .* holds a finished run of 2 rounds but no checkpoint "
                                          r"\(fed.checkpoint_every=0 keeps none\), so it cannot be continued"):
        checkpoint.check_resumable(_cfg(tmp_path, "resume=auto", "fed.rounds=4"), tmp_path)


def test_claim_with_resume_takes_the_newest_valid_checkpoint(tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    (newest / "state.json").write_text("{not json")
    ck, notes = checkpoint.claim(_cfg(tmp_path, "resume=auto"), tmp_path)
    assert ck.round == 1 and len(notes) == 1 and "skipping checkpoint round 2" in notes[0]
    assert (tmp_path / "run.h5").exists() and not list(tmp_path.glob("failed-*"))  # nothing moved


def test_claim_refuses_a_finished_run_whose_every_checkpoint_is_damaged(tmp_path):
    from fedsoda_mpi.runlog import RunFolderRefused

    for rnd in (1, 2):
        (_save(tmp_path, rnd) / "adapter.safetensors").write_bytes(b"damaged")
    _finish(tmp_path, 2)
    (tmp_path / "adapter").mkdir()
    before = (tmp_path / "run.h5").read_bytes()
    with pytest.raises(RunFolderRefused, match=r"holds a finished run of 2 rounds but none of its checkpoints is "
                                               r"valid, so it cannot be continued, "
                                               r"and it is not started over in place"):
        checkpoint.claim(_cfg(tmp_path, "resume=auto", "fed.rounds=3"), tmp_path)
    assert (tmp_path / "run.h5").read_bytes() == before and (tmp_path / "adapter").is_dir()
    assert not list(tmp_path.glob("failed-*"))


@pytest.mark.parametrize("checkpoints", ["none", "damaged"])
def test_claim_moves_an_unfinished_attempt_without_a_valid_checkpoint_aside(tmp_path, checkpoints):
    """resume=auto on an unfinished attempt with no valid checkpoint: the attempt moves to failed-<time>/ (it was
    overwritten in place) and the run starts over; the generated public texts stay (the same settings)."""
    if checkpoints == "damaged":
        (_save(tmp_path, 1) / "run.h5").write_bytes(b"damaged")
    else:
        with h5py.File(tmp_path / "run.h5", "w") as f:
            f.attrs["x"] = 1
    (tmp_path / "log.txt").write_text("FATAL boom\n")
    (tmp_path / "public_self.jsonl").write_text("{}\n")
    ck, notes = checkpoint.claim(_cfg(tmp_path, "resume=auto"), tmp_path)
    moved = list(tmp_path.glob("failed-*"))
    assert ck is None and len(moved) == 1 and (moved[0] / "log.txt").read_text() == "FATAL boom\n"
    assert (moved[0] / "run.h5").exists() and not (tmp_path / "run.h5").exists()
    assert (moved[0] / "checkpoints").is_dir() == (checkpoints == "damaged")
    assert (tmp_path / "public_self.jsonl").exists()
    assert notes[-1].startswith("resume=auto: the folder has no valid checkpoint to continue from: moved its "
                                f"unfinished attempt (no /final) to {moved[0]}; starting the run over")


def test_an_attempt_that_cannot_be_moved_aside_is_one_line_and_nothing_moves(tmp_path, monkeypatch):
    """A failed attempt whose checkpoints/ cannot be moved (a PermissionError traceback and a half-moved folder):
    RunFolderRefused naming the file, and every file back where it was."""
    from pathlib import Path

    from fedsoda_mpi.runlog import RunFolderRefused, archive_failed_attempt

    _save(tmp_path, 1)
    (tmp_path / "log.txt").write_text("FATAL boom\n")
    (tmp_path / "config.yaml").write_text("method: fedsoda\n")
    rename = Path.rename

    def no_checkpoints(self, target):
        if self.name == "checkpoints":
            raise PermissionError(13, "Permission denied")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", no_checkpoints)
    with pytest.raises(RunFolderRefused, match=r"holds an unfinished attempt \(no /final\) that cannot be moved aside "
                                               r"into failed-.*/ \(.*checkpoints: Permission denied\); "
                                               r"nothing was moved"):
        archive_failed_attempt(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "config.yaml", "log.txt", "run.h5"]
