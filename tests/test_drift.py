"""The re-alignment trigger (Algorithm 2 line 9 with oda.trigger=drift) as `DriftMonitor` runs it, without a model:
the probe is a function that returns the values a run would measure. The probes themselves: tests/test_oda.py; the
trigger under mpirun: tests/test_drift_trigger.py; resumed: tests/test_resume.py."""
import math

import h5py
import numpy as np

from fedsoda_mpi import oda
from fedsoda_mpi.drift import DriftMonitor
from fedsoda_mpi.runlog import RunLog


class Measured:
    """The probe values of a run, one per `DriftMonitor.measure` call, in order."""

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def __call__(self) -> float:
        self.calls += 1
        return self.values.pop(0)


def run_rounds(monitor: DriftMonitor, measured: Measured, rounds: int) -> list[int]:
    """The calls a federation makes on rank 0: the reference after pre-alignment, then per round the decision, the
    re-alignment's new reference when it fires, and the probe after the round's aggregation."""
    monitor.mark_aligned(0)
    realigned = []
    for t in range(1, rounds + 1):
        if monitor.realign_due(t):
            monitor.mark_aligned(t)
            realigned.append(t)
        monitor.after_round()
    return realigned


def test_a_new_monitor_never_fires_before_a_probe_but_its_interval_does():
    never = DriftMonitor(2.0, 0, measure=Measured([]))
    assert math.isnan(never.probe) and math.isnan(never.ref) and never.last_aligned == 0
    assert not any(never.realign_due(t) for t in range(1, 50))
    assert DriftMonitor(2.0, 3, measure=Measured([])).realign_due(3)


def test_mark_aligned_sets_the_reference_and_after_round_only_the_probe():
    monitor = DriftMonitor(2.0, 0, measure=Measured([1.0, 1.5, 2.5, 0.5]))
    monitor.mark_aligned(0)
    assert (monitor.probe, monitor.ref, monitor.last_aligned) == (1.0, 1.0, 0)
    assert monitor.after_round() == 1.5 and (monitor.probe, monitor.ref) == (1.5, 1.0)
    assert not monitor.realign_due(2)  # 1.5 <= 2 x 1.0
    monitor.after_round()
    assert monitor.realign_due(3)  # 2.5 > 2 x 1.0
    monitor.mark_aligned(3)
    assert (monitor.probe, monitor.ref, monitor.last_aligned) == (0.5, 0.5, 3)


def test_the_monitor_fires_where_the_drift_schedule_says():
    """The monitor driven round by round re-aligns at the rounds `oda.drift_schedule` computes from the same probe
    values (the probe after each round, and just after each alignment), with and without max_interval."""
    after_round = [1.1, 1.3, 1.9, 2.4, 1.2, 1.5, 2.2, 2.3]  # after rounds 1..8
    after_align = [1.0, 1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.0]  # just after an alignment at round 0..8
    for tau, max_interval in ((2.0, 0), (1.2, 0), (1.2, 3), (1.5, 2), (10.0, 4)):
        want = oda.drift_schedule(after_round, after_align, tau, max_interval)
        values = [after_align[0]]  # the order in which `run_rounds` measures
        for t in range(1, len(after_round) + 1):
            values += ([after_align[t]] if t in want else []) + [after_round[t - 1]]
        measured = Measured(values)
        got = run_rounds(DriftMonitor(tau, max_interval, measured), measured, len(after_round))
        assert got == want, (tau, max_interval)
        assert measured.values == [] and measured.calls == 1 + len(want) + len(after_round)


def test_restore_reads_the_trigger_state_from_the_run_file(tmp_path):
    """Resume: the last probe, its reference and the last re-aligned round come back from /rounds (the checkpoint's
    copy of the run file); a run file without the probe columns gets NaN rows, so the columns stay aligned."""
    log = RunLog(tmp_path, 0, echo=False)
    log.h5 = h5py.File(tmp_path / "run.h5", "w")
    for rnd, flag, probe, ref in ((1, 0, 1.5, 1.0), (2, 1, 0.75, 0.5), (3, 0, 0.875, 0.5)):
        log.append("rounds", {"round": np.int32(rnd), "realigned": np.int8(flag), "drift_probe": np.float32(probe),
                              "drift_ref": np.float32(ref)})
    monitor = DriftMonitor(2.0, 0, measure=Measured([]))
    monitor.restore(log)
    assert (monitor.probe, monitor.ref, monitor.last_aligned) == (0.875, 0.5, 2)
    assert not monitor.realign_due(4) and DriftMonitor(2.0, 2, Measured([])).realign_due(4)
    old = RunLog(tmp_path / "old", 0, echo=False)
    old.h5 = h5py.File(tmp_path / "old" / "run.h5", "w")
    for rnd in (1, 2):
        old.append("rounds", {"round": np.int32(rnd), "realigned": np.int8(0)})
    monitor = DriftMonitor(2.0, 0, measure=Measured([]))
    monitor.last_aligned = 7
    monitor.restore(old)
    assert math.isnan(monitor.probe) and math.isnan(monitor.ref) and monitor.last_aligned == 0
    assert old.column("rounds", "drift_probe").shape == old.column("rounds", "drift_ref").shape == (2,)
    empty = RunLog(tmp_path / "empty", 0, echo=False)
    monitor = DriftMonitor(2.0, 0, measure=Measured([]))
    monitor.restore(empty)  # no round recorded yet: the state after set-up stays
    assert monitor.last_aligned == 0 and math.isnan(monitor.probe)
    log.close()
    old.close()
