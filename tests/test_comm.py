"""Transport tests: schema packing in-process; bit-exact round trips, byte counts and abort under real mpirun -n 3."""
import json
import time

import pytest
import torch

from fedsoda_mpi.comm import Schema, SchemaError
from tests.conftest import ROOT, mpirun, running

JOB = str(ROOT / "tests" / "mpi_jobs" / "transport_job.py")


def test_schema_pack_unpack_roundtrip_and_json():
    msg = {"w": torch.randn(4, 3), "b": torch.randn(2)}
    s = Schema.of(msg)
    flat = s.pack(msg)
    assert flat.numel() == 14 and s.nbytes == 56
    back = s.unpack(flat)
    assert all(torch.equal(back[k], msg[k]) for k in msg)
    assert Schema.from_json(s.to_json()) == s


def test_schema_rejects_mismatches():
    s = Schema.of({"w": torch.zeros(4, 3)})
    with pytest.raises(SchemaError, match="shape|schema says"):
        s.pack({"w": torch.zeros(3, 4)})
    with pytest.raises(SchemaError, match="schema says"):
        s.pack({"w": torch.zeros(4, 3, dtype=torch.float64)})
    with pytest.raises(SchemaError, match="keys differ"):
        s.pack({"v": torch.zeros(4, 3)})
    with pytest.raises(SchemaError, match="does not match"):
        s.unpack(torch.zeros(11))
    with pytest.raises(SchemaError, match="one dtype"):
        Schema.of({"a": torch.zeros(1), "b": torch.zeros(1, dtype=torch.int64)})


def _results(out: str) -> list[dict]:
    return [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]


@pytest.mark.mpi
@pytest.mark.parametrize("chunk", [0, 50])
def test_transport_roundtrip_and_byte_counts_under_mpirun(chunk):
    args = [JOB] + (["--chunk", str(chunk)] if chunk else [])
    p = mpirun(3, args, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    res = _results(p.stdout)
    assert len(res) == 3
    for r in res:
        assert r["ok"], r
        assert r["counted"] == r["payload"], r  # counted bytes == payload bytes, exactly
        assert r["idle"] == dict.fromkeys(["agree_schema", "broadcast", "gatherv", "broadcast_flag",
                                           "broadcast_bytes"], True), r  # idle=True: the waiting ranks slept


@pytest.mark.mpi
@pytest.mark.parametrize("mpi4py_launch", [True, False])
def test_raise_on_one_rank_aborts_job_quickly(mpi4py_launch):
    t0 = time.time()
    p = mpirun(3, [JOB, "--raise-on", "2"], timeout=60, mpi4py_launch=mpi4py_launch)
    elapsed = time.time() - t0
    assert p.returncode != 0
    assert "boom on rank 2" in p.stderr
    # startup (torch import on 3 ranks) is part of the elapsed time; the abort itself is ~1 s
    assert elapsed < 30, elapsed


def test_rank_exits_when_its_launcher_is_killed(tmp_path):
    """A process running exit_with_launcher dies within a second or two of its parent's SIGKILL (mpirun puts
    ranks in their own process groups, so killing mpirun's group leaves them orphaned otherwise)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pidfile = tmp_path / "child.pid"
    child = ("import os, time; from fedsoda_mpi.comm import exit_with_launcher; exit_with_launcher(0.1); "
             f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    launcher = ("import subprocess, sys, time; "
                f"p = subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", launcher])
    deadline = time.time() + 60
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.time() < deadline and parent.poll() is None
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    os.kill(pid, 0)  # alive while its parent lives
    time.sleep(0.5)
    os.kill(pid, 0)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 5
    while time.time() < deadline:
        if not running(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("the orphaned process outlived its launcher by 5 s")
