"""The smoke check (`python -m fedsoda_mpi.smoke`, issue 29 item 3): it passes on the CPU, and every step FAILs,
naming itself, when the thing it checks is broken (a fault injected into the code under test, never into the
check). The whole check under real mpirun is the `mpi` test; `sbatch slurm/smoke.sh` is in the Slurm tests below."""
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsoda_mpi import smoke as S
from fedsoda_mpi import smoke_mpi as SM
from fedsoda_mpi import smoke_steps as ST
from tests.conftest import MPI_ENV, ROOT

# the in-process steps on the tiny model (~30 s for the shared fixture, ~15 s for a fresh FedSODA round): not in
# `make test-fast`
SLOW = pytest.mark.slow
LINE = re.compile(r"^PASS (\S+) (\d+\.\d)s (\S+) peak ([\d,]+) MiB (rss|cuda): .+$")


def avx512_bf16() -> bool:
    """Whether this CPU has AVX512-BF16, the CPUs where bitsandbytes' eval-mode repacking (the trap) happens."""
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.fixture(scope="module")
def passed(tiny_model_dir, tmp_path_factory):
    """The six in-process steps on the tiny model on the CPU, run once through the check's own runner: all PASS,
    one well-formed line each. Later tests re-run single steps on this state with a fault injected."""
    run = ST.ModelRun("tiny", tiny_model_dir, S.resolve_devices("cpu"), tmp_path_factory.mktemp("smoke"))
    out = io.StringIO()
    report = S.Report(out)
    for step in ST.STEPS:
        assert report.run(f"tiny/{step}", (torch.device("cpu"),), lambda s=step: ST.STEP_FUNCS[s](run)), out.getvalue()
    lines = out.getvalue().splitlines()
    assert [LINE.match(line).group(1) for line in lines] == [f"tiny/{s}" for s in ST.STEPS], lines
    assert all(LINE.match(line).group(3, 5) == ("cpu", "rss") for line in lines)
    yield run
    run.close()


def fails(step: str, run, match: str) -> str:
    """Run one step through the runner; it must print exactly one FAIL line naming it, with `match` in the reason."""
    out = io.StringIO()
    report = S.Report(out)
    assert not report.run(f"tiny/{step}", (torch.device("cpu"),), lambda: ST.STEP_FUNCS[step](run))
    text = out.getvalue().strip()
    assert text.startswith(f"FAIL tiny/{step}: ") and "\n" not in text and re.search(match, text), text
    assert report.failed == f"tiny/{step}"
    return text


# ------------------------------------------------------------------------------------ each step can fail

@SLOW
@pytest.mark.parametrize("fault", ["code", "absmax"])
def test_nf4_bundle_fails_when_the_target_holds_other_weights(passed, monkeypatch, fault):
    """A bundle loaded with one flipped 4-bit code, or with a scaled block constant (absmax: the codes are equal,
    the dequantized weights are not), is caught."""
    from fedsoda_mpi import models

    load = models.load_bundle

    def broken(files, workdir, device="cpu"):
        model, tok = load(files, workdir, device)
        m = next(iter(ST.linear4bit(model).values()))
        if fault == "code":
            m.weight.data.view(-1)[0] ^= 0x11
        else:
            state = m.weight.quant_state
            target = state.state2.absmax if state.nested else state.absmax
            target.mul_(1.01)
        return model, tok

    monkeypatch.setattr(models, "load_bundle", broken)
    fails("nf4-bundle", passed, r"dequantized on cpu differs from the CPU side by \S+ x max\|W\| > 1e-06")


def emulate_trap(monkeypatch) -> None:
    """The bitsandbytes CPU trap on any CPU: once a 4-bit layer has run a no-grad forward, its output carries no
    gradient any more (what the repacked AVX512-BF16 path does)."""
    import bitsandbytes as bnb

    forward, trapped = bnb.nn.Linear4bit.forward, set()

    def trap(self, x):
        if not torch.is_grad_enabled():
            trapped.add(id(self))
        out = forward(self, x)
        return out.detach() if id(self) in trapped else out

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", trap)


@SLOW
def test_lora_grad_fails_when_gradients_vanish_after_an_eval_forward(passed, monkeypatch):
    """The trap emulated: layer 0's LoRA loses the gradient that came back through the 4-bit layers (what is left
    comes through the residual stream and the LoRA branches), so it changes or vanishes."""
    emulate_trap(monkeypatch)
    fails("lora-grad", passed, r"(vanished|changed by \S+ \(relative\)) after an eval/no-grad forward")


@SLOW
def test_a_real_fault_ends_the_check_at_its_step_with_exit_1(tiny_model_dir, monkeypatch, capsys):
    """The whole command with the real trap: models.fix_bnb_cpu switched off (on this AVX512-BF16 CPU an eval
    forward then repacks the 4-bit weights; elsewhere the trap is emulated as above). nf4-bundle passes,
    lora-grad FAILs naming itself, nothing after it runs, the last line names it, exit 1."""
    from fedsoda_mpi import models

    if avx512_bf16():
        monkeypatch.setattr(models, "fix_bnb_cpu", lambda model: 0)
    else:
        emulate_trap(monkeypatch)
    monkeypatch.setattr(S, "quiet", lambda: None)  # leaves this process's logging and environment alone
    rc = S.main(["--device", "cpu", "--model", str(tiny_model_dir), "--no-mpi"])
    lines = capsys.readouterr().out.strip().splitlines()
    name = tiny_model_dir.name
    assert rc == 1, lines
    assert lines[1].startswith(f"PASS {name}/nf4-bundle "), lines
    assert re.match(rf"FAIL {name}/lora-grad: .*(vanished|changed by|not finite|zero)", lines[2]), lines
    assert len(lines) == 4 and re.fullmatch(rf"smoke: FAILED at {name}/lora-grad after \d+s \(1 steps passed\)",
                                            lines[3]), lines


@SLOW
def test_fedsoda_round_fails_when_a_client_update_is_rejected(tiny_model_dir, tmp_path):
    """A client that uploads NaN (debug.fail_kind=nan: a diverged client) is rejected by FedAvg: the round FAILs."""
    run = ST.ModelRun("tiny", tiny_model_dir, S.resolve_devices("cpu"), tmp_path,
                     overrides=["debug.fail_rank=1", "debug.fail_round=1", "debug.fail_kind=nan"])
    try:
        fails("fedsoda-round", run, r"rejected clients \[0\]")
    finally:
        run.close()


@SLOW
def test_fedsrd_round_fails_when_the_client_rebuilds_another_global(passed, monkeypatch):
    """A client whose sparse download decodes differently from what the server applied (the two would drift
    apart silently, round after round) is caught."""
    from fedsoda_mpi.fedsrd import FedSRD

    receive = FedSRD.receive

    def off_by_one_ulp(self, msgs, held, rnd, first):
        got = receive(self, msgs, held, rnd, first)
        return {k: torch.nextafter(v, torch.full_like(v, np.inf)) if "lora_B" in k else v for k, v in got.items()}

    monkeypatch.setattr(FedSRD, "receive", off_by_one_ulp)
    fails("fedsrd-round", passed, "sparse download differs")


@SLOW
def test_drift_probe_fails_on_a_non_finite_probe(passed, monkeypatch):
    """The output drift probe KL(M || M*) overflowing (NaN, as a float16 forward would) is caught."""
    from fedsoda_mpi import oda

    monkeypatch.setattr(oda, "adapter_kl", lambda *a, **k: torch.tensor(float("nan")))
    fails("drift-probe", passed, "output drift probe KL.* = nan")


@SLOW
def test_plug_in_fails_when_the_exported_adapter_is_not_the_plugged_one(passed, monkeypatch):
    """An export that writes the adapter with its B factors zeroed (the base model, in effect) is caught by the
    reload-and-compare."""
    from fedsoda_mpi import models

    export = models.export_peft_adapter

    def zeroed(base, state, *args, **kwargs):
        return export(base, {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()}, *args, **kwargs)

    monkeypatch.setattr(models, "export_peft_adapter", zeroed)
    fails("plug-in", passed, "exported adapter, reloaded by PEFT")


def test_mpi_round_fails_on_a_failed_launch_and_on_a_wrong_device(tmp_path, monkeypatch):
    """mpi-round FAILs with the launcher's exit code and the run's one-line error; a run.h5 whose /devices puts a
    rank on the CPU when the GPU was asked for FAILs naming the rank; a complete record passes with one line per
    rank (device, host, peak memory)."""
    devices = S.resolve_devices("cpu")

    def failed_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "fedsoda-mpi: config error: fed.clients: must be >= 1\n")

    monkeypatch.setattr(SM.subprocess, "run", failed_run)
    with pytest.raises(ST.SmokeFailure, match=r"^exit 1 of .*fedsoda-mpi: config error: fed.clients"):
        SM.step_mpi_round(tmp_path / "tiny", devices, tmp_path, "mpirun", 60)
    got = {"rounds": [1], "loss": [[2.0, 2.1]], "final": True, "accuracy": 0.5, "device": ["cuda:0", "cpu", "cuda:0"],
           "host": ["a", "a", "b"], "peak_gpu_mb": [900.0, 0.0, 300.0], "peak_rss_mb": [2000.0, 800.0, 700.0]}
    with pytest.raises(ST.SmokeFailure, match=r"^rank 1 on cpu; expected every rank on cuda$"):
        SM.check_mpi_run(got, "cuda")
    got["device"][1] = "cuda:0"
    assert SM.check_mpi_run(got, "cuda") == [
        "  rank 0 (server): cuda:0 on a, peak 900 MiB cuda (host: 2000 MiB rss)",
        "  rank 1 (client): cuda:0 on a, peak 0 MiB cuda (host: 800 MiB rss)",
        "  rank 2 (client): cuda:0 on b, peak 300 MiB cuda (host: 700 MiB rss)"]
    with pytest.raises(ST.SmokeFailure, match="train loss"):
        SM.check_mpi_run({**got, "loss": [[2.0, float("nan")]]}, "cuda")
    with pytest.raises(ST.SmokeFailure, match="run.h5 holds rounds"):
        SM.check_mpi_run({**got, "final": False}, "cuda")


def test_device_cuda_without_a_gpu_fails_before_any_step_with_exit_2(capsys, monkeypatch):
    """--device cuda on a machine whose torch sees no GPU: one FAIL line, exit 2, no step runs."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr(S, "quiet", lambda: None)
    assert S.main(["--device", "cuda", "--model", "tiny"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("FAIL device: --device cuda but torch") and "sees no GPU" in out[0]


def test_launch_lines_follow_slurm_common_sh(monkeypatch):
    """srun inside a job of >= 3 tasks (as slurm/common.sh's fedsoda_step), else the mpirun next to this Python."""
    for var in ("SLURM_NTASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    mpirun = SM.launcher("auto", 3)
    assert Path(mpirun[0]).name == "mpirun" and mpirun[1:] == ["-n", "3"]
    monkeypatch.setenv("SLURM_NTASKS", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setattr(SM.shutil, "which", lambda name: "/usr/bin/" + name)
    assert SM.launcher("auto", 3) == ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", "-n", "3"]
    assert SM.launcher("mpirun", 3)[1:] == ["-n", "3", "--bind-to", "none"]
    assert "srun --mpi=pmix --kill-on-bad-exit=1" in (ROOT / "slurm" / "common.sh").read_text()


# ------------------------------------------------------------------------------------------- the command

@pytest.mark.mpi
def test_the_smoke_command_passes_on_the_cpu_with_the_tiny_model(tmp_path):
    """What CI runs: `python -m fedsoda_mpi.smoke --device cpu --model tiny` (the MPI round under the venv's
    mpirun, 3 ranks): one PASS line per step in order, one line per rank (cpu), the summary, exit 0."""
    env = {**os.environ, **MPI_ENV, "TMPDIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "fedsoda_mpi.smoke", "--device", "cpu", "--model", "tiny"],
                         capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    steps = [m.group(1) for m in map(LINE.match, lines) if m]
    assert steps == [f"tiny/{s}" for s in (*ST.STEPS, SM.MPI_STEP)], res.stdout
    assert lines[0].startswith("smoke: --device cpu: server cpu")
    mpi = next(LINE.match(ln) for ln in lines if ln.startswith("PASS tiny/mpi-round"))
    assert mpi.group(3, 5) == ("cpu,cpu,cpu", "rss") and len(mpi.group(4).split(",")) == 3
    ranks = [ln for ln in lines if ln.startswith("  rank ")]
    assert [r.split(":")[0] for r in ranks] == ["  rank 0 (server)", "  rank 1 (client)", "  rank 2 (client)"]
    assert all(": cpu on " in r and r.endswith("MiB rss") for r in ranks), ranks
    assert re.fullmatch(r"smoke: all 7 steps passed in \d+s", lines[-1]), lines[-1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("fedsoda")]  # its temporary folder is gone
    print(f"smoke command: {lines[-1]}")
