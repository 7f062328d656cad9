"""The per-round schedule (which virtual clients train, on which rank) and the client rank's stale-copy sweep."""
from collections import Counter
from pathlib import Path

import numpy as np

from fedsoda_mpi.config import load_config
from fedsoda_mpi.federation import client_schedule, placement


def test_placement_balances_ranks_and_is_stable_under_full_participation():
    cfg = load_config(None, ["fed.clients=100", "fed.clients_per_round=10"])
    worst_fixed_home = 0
    for rnd in range(1, 21):
        chosen = client_schedule(cfg, 11, rnd)
        where = placement(chosen, 11)
        assert sorted(where) == sorted(chosen) and Counter(where.values()) == Counter(range(1, 11))
        worst_fixed_home = max(worst_fixed_home, max(Counter(1 + k % 10 for k in chosen).values()))
    assert worst_fixed_home >= 2  # what the placement avoids: fixed homes load some rank 2x or more
    full = load_config(None, ["fed.clients=10"])
    for rnd in (1, 2, 3):
        assert placement(client_schedule(full, 4, rnd), 4) == {k: 1 + k % 3 for k in range(10)}


def test_schedule_is_seeded_per_round():
    cfg = load_config(None, ["fed.clients=100", "fed.clients_per_round=10"])
    a, b = client_schedule(cfg, 11, 3), client_schedule(cfg, 11, 4)
    assert a == client_schedule(cfg, 11, 3) and a != b and len(set(a)) == 10
    assert np.all(np.diff(a) > 0)


def test_sweep_removes_only_copies_of_dead_client_processes(tmp_path, monkeypatch):
    """A client rank SIGKILLed while loading its on-disk sub-LLM copy leaves it; the next start removes it."""
    import os
    import subprocess
    import sys
    import tempfile

    from fedsoda_mpi.client import sweep_stale_copies

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the default root: TMPDIR
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f"fedsoda-client1-{dead}-abc").mkdir()
    (tmp_path / f"fedsoda-client2-{os.getpid()}-def").mkdir()  # alive: kept
    (tmp_path / "fedsoda-client1-xyz").mkdir()  # not a name with a pid: kept
    assert sweep_stale_copies() == [f"fedsoda-client1-{dead}-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fedsoda-client1-xyz", f"fedsoda-client2-{os.getpid()}-def"]


def test_a_killed_but_unreaped_process_counts_as_gone(tmp_path):
    """In a container whose init never reaps, a SIGKILLed rank stays a zombie: kill(pid, 0) still succeeds,
    yet its copy must be swept (the CI failure of the SIGTERM test)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fedsoda_mpi.client import process_alive, sweep_stale_copies

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert process_alive(child.pid)
    (tmp_path / f"fedsoda-client1-{child.pid}-abc").mkdir()
    os.kill(child.pid, signal.SIGKILL)
    deadline = time.time() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(child.pid, 0)  # the zombie still answers kill(0)
    assert not process_alive(child.pid)
    assert sweep_stale_copies(tmp_path) == [f"fedsoda-client1-{child.pid}-abc"]
    child.wait()

