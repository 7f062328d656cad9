"""PhaseClock: phases add up to the round's wall time, idle and MPI come from the transport's counters."""
import time

import numpy as np
import pytest
import torch

from fedsoda_mpi.timing import EXTRA, PHASES, PhaseClock, split


class FakeComm:
    idle_seconds = 0.0
    mpi_seconds = 0.0


def test_phases_idle_other_add_up_to_wall():
    comm = FakeComm()
    clock = PhaseClock(comm, torch.device("cpu"))
    with clock.phase("adapter"):
        time.sleep(0.05)
    clock.add("emulator", 0.01)
    comm.idle_seconds += 0.02  # as Comm.idle_wait would
    comm.mpi_seconds += 0.003
    time.sleep(0.08)  # unattributed: other = 0.08 - 0.01 (emulator) - 0.02 (idle, counted but not slept)
    clock.steps += 4
    row = clock.row()
    s = dict(zip(PHASES + EXTRA, row))
    assert s["adapter"] >= 0.05 and s["emulator"] == 0.01 and s["idle"] == 0.02 and s["mpi_s"] == 0.003
    assert s["other"] >= 0.05
    assert sum(s[p] for p in PHASES) == pytest.approx(s["wall_s"], abs=1e-9)
    assert s["local_steps"] == 4 and s["peak_rss_mb"] > 10 and s["peak_gpu_mb"] == 0
    clock.start_round()
    assert clock.row()[:len(PHASES)].sum() < 0.01 and clock.steps == 0


def test_a_phase_does_not_count_the_idle_wait_inside_it():
    """A collective called with idle=True inside a phase block: its wait in Comm.idle_wait is idle, not the phase."""
    comm = FakeComm()
    clock = PhaseClock(comm, torch.device("cpu"))
    t0 = time.perf_counter()
    with clock.phase("download"):
        time.sleep(0.05)
        comm.idle_seconds += 0.04  # as Comm.idle_wait would, after sleeping 0.04 s
        time.sleep(0.04)
    block = time.perf_counter() - t0
    s = dict(zip(PHASES + EXTRA, clock.row()))
    assert s["download"] == pytest.approx(block - 0.04, abs=2e-3) and s["idle"] == pytest.approx(0.04)
    assert sum(s[p] for p in PHASES) == pytest.approx(s["wall_s"], abs=1e-9)


def test_unknown_or_derived_phase_rejected():
    clock = PhaseClock(FakeComm(), torch.device("cpu"))
    for name in ("idle", "other", "sgp"):
        with pytest.raises(ValueError, match="unknown phase"):
            with clock.phase(name):
                pass


def test_split_names_columns():
    rows = np.arange(3 * (len(PHASES) + len(EXTRA)), dtype=np.float64).reshape(3, -1)
    out = split(rows)
    assert out["phase_s"].shape == (3, len(PHASES)) and set(out) == {"phase_s", *EXTRA}
    np.testing.assert_array_equal(out["wall_s"], rows[:, len(PHASES) + 1])
