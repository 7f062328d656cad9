"""The five-minute smoke check a cluster user runs first: does fedsoda-mpi work on THIS node's device?

    python -m fedsoda_mpi.smoke                                   # device=auto, the tiny model and SmolLM2
    python -m fedsoda_mpi.smoke --device cuda --model tiny         # refuse to fall back to the CPU
    python -m fedsoda_mpi.smoke --model tiny /path/to/hf-folder    # another (small) model folder too
    sbatch slurm/smoke.sh                                          # 3 ranks, one GPU each (the MPI step via srun)

On each model (the tiny one, built on the fly in a temporary folder; SmolLM2-135M when prepared, else SKIP with
the reason; any HF folder given by path) it runs, on the device it is given, the steps below, and then one real
round under MPI on the tiny model. Each step compares something and FAILs when it is wrong:

    nf4-bundle     the NF4 sub-LLM, built on the CPU and shipped as a bundle (models.model_bundle / load_bundle),
                   on the client's device: bitsandbytes' dequantize_4bit of every Linear4bit gives the CPU
                   side's weights within NF4_TOL x max|W| (why that tolerance: `NF4_TOL`), which are the full
                   model's within NF4's own rounding (relative Frobenius error < NF4_ERROR); how many layers
                   kept the shipped 4-bit codes byte for byte is reported (a device may repack them)
    lora-grad      LoRA on every layer of that shipped NF4 sub-LLM: every LoRA tensor of the first layer (its
                   gradient flows back through every later 4-bit layer) gets a finite, non-zero gradient, and
                   the same one (GRAD_RTOL) after a plain eval/no-grad forward: bitsandbytes' CPU trap
                   (models.fix_bnb_cpu, docs/design.md) makes exactly that gradient vanish
    fedsoda-round  Algorithm 2 in one process, server and client on the device, NF4 on: SGP (fewer layers kept),
                   build (M* NF4 on the server's device), pre-alignment (finite KL), the client loads the shipped
                   bundle on its device, fits two virtual clients (finite loss), uploads through the MPI buffer
                   format, FedAvg accepts both and moves the global adapter LoRA
    fedsrd-round   one FedSRD round (fed.upload_density = fed.download_density = 0.5) on the same server and
                   client: a sparse upload (about half the dense bytes), accepted, the global moves, and the
                   client rebuilds the server's new global from the sparse download bit for bit
    drift-probe    DriftProbes.inter() (the aligned layers' angular distances: finite, in [0, 1]) and the output drift
                   probe (KL(M || M*) on the held-out batch: finite, >= 0), both on the server's device
    plug-in        Algorithm 2 line 22: the full LLM holds the global adapter (exactly); its evaluation on a few
                   test rows gives an accuracy in [0, 1]; the exported PEFT adapter, loaded by PEFT onto a fresh
                   copy of the full LLM, reproduces the plugged model's logits, which differ from the base model's
    mpi-round      `mpirun -n 3 python -m mpi4py -m fedsoda_mpi.main` (inside a Slurm job: srun, as
                   slurm/common.sh launches) on the tiny model, fed.rounds=1, device=<the setting>: exit 0, one
                   round and /final in run.h5, and /devices read back: every rank on the device the setting
                   asks for (cuda everywhere when this node has a GPU and the setting is auto or cuda)

Output: one line per step, `PASS <model>/<step> <seconds>s <device> peak <MiB> <kind>: <what was compared>` or
`FAIL <model>/<step>: <one-line reason>` (`SKIP ...` for a model that is not there); the MPI step adds one line
per rank (its device, host and peak memory). Peak memory: on a GPU torch.cuda.max_memory_allocated of each device
the step used, reset before the step ("cuda"); on the CPU the process's peak resident set size so far ("rss",
ru_maxrss: a high-water mark of the whole process, not of the step alone). The first failure ends the check
with exit code 1 (2: the device setting cannot hold, e.g. --device cuda without a GPU); a last line sums up.
Times measured on the project's 2-core CPU machine: docs/design.md, "Smoke check" (tiny model on the CPU: 2-3 min,
most of it the MPI round; with SmolLM2 about 7 min; on a GPU node the model steps take seconds).

This module is the driver (devices, the step lines, the command line); the in-process steps are in smoke_steps.py,
the MPI round in smoke_mpi.py.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .smoke_mpi import MPI_STEP, step_mpi_round
from .smoke_steps import STEP_DEVICES, STEP_FUNCS, STEPS, Devices, ModelRun, Outcome, SmokeFailure

SMOLLM2 = "smollm2-135m"


def resolve_devices(setting: str) -> Devices:
    """`--device` as this process sees it (devices.py's rule for one process): cpu, cuda (SmokeFailure without a
    visible GPU) or auto (cuda when torch sees a GPU). With several GPUs the client takes cuda:1."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if setting == "cuda" and gpus == 0:
        raise SmokeFailure(f"--device cuda but torch {torch.__version__} sees no GPU (torch.cuda.is_available() is "
                           f"{torch.cuda.is_available()}, "
                           f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}"
                           f", torch built for CUDA {torch.version.cuda}); run on a GPU node, or use --device auto|cpu")
    if setting == "cpu" or gpus == 0:
        return Devices(setting, torch.device("cpu"), torch.device("cpu"))
    return Devices(setting, torch.device("cuda", 0), torch.device("cuda", min(1, gpus - 1)))


def describe(d: torch.device) -> str:
    """cuda:i (name, compute capability, total memory) or cpu (cores)."""
    if d.type != "cuda":
        return f"cpu ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"
    p = torch.cuda.get_device_properties(d)
    return f"{d} ({p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB)"


class PeakMemory:
    """Peak memory of a step: torch.cuda.max_memory_allocated of each CUDA device used (reset at the start), or the
    process's peak RSS (ru_maxrss, a process-wide high-water mark) on the CPU."""

    def __init__(self, devices: tuple[torch.device, ...]):
        self.cuda = list(dict.fromkeys(d for d in devices if d.type == "cuda"))
        for d in self.cuda:
            torch.cuda.reset_peak_memory_stats(d)

    def read(self) -> str:
        """"<MiB>[,<MiB>...] MiB cuda" or "<MiB> MiB rss"."""
        if self.cuda:
            return ",".join(f"{torch.cuda.max_memory_allocated(d) / 2**20:.0f}" for d in self.cuda) + " MiB cuda"
        from .timing import peak_rss_mb

        return f"{peak_rss_mb():.0f} MiB rss"


class Report:
    """Prints the step lines and keeps the outcome."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.passed, self.skipped, self.failed = [], [], None

    def say(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def run(self, step: str, devices: tuple[torch.device, ...], fn) -> bool:
        """Run one step: PASS line (seconds, devices, peak memory, what it compared) or FAIL line; False on FAIL."""
        meter, t0 = PeakMemory(devices), time.perf_counter()
        try:
            out = fn()
        except SmokeFailure as e:
            return self.fail(step, str(e))
        except Exception as e:  # noqa: BLE001 - any error of the code under test is the step's failure
            if os.environ.get("FEDSODA_SMOKE_TRACEBACK") == "1":
                import traceback

                traceback.print_exc()
            first = (str(e).strip().splitlines() or ["no detail"])[0][:300]
            return self.fail(step, f"{type(e).__name__}: {first}")
        out = out if isinstance(out, Outcome) else Outcome(out)
        where = out.where or ",".join(dict.fromkeys(str(d) for d in devices))
        self.say(f"PASS {step} {time.perf_counter() - t0:.1f}s {where} peak {out.peak or meter.read()}: {out.detail}")
        for line in out.lines:
            self.say(line)
        self.passed.append(step)
        return True

    def fail(self, step: str, reason: str) -> bool:
        self.failed = step
        self.say(f"FAIL {step}: {reason}")
        return False

    def skip(self, step: str, reason: str) -> None:
        self.skipped.append(step)
        self.say(f"SKIP {step}: {reason}")


def model_folders(names: list[str], work: Path, report: Report) -> list[tuple[str, Path]]:
    """(label, folder) of each --model: tiny (built now in `work`), smollm2 (the prepared folder, or SKIP with the
    reason), or a path to an HF model folder."""
    from .paths import model_path

    out = []
    for name in names:
        if name == "tiny":
            out.append(("tiny", tiny_model(work)))
        elif name == "smollm2":
            folder = model_path(SMOLLM2)
            if (folder / "config.json").is_file():
                out.append(("smollm2", folder))
            else:
                report.skip("smollm2", f"not prepared ({folder} has no config.json): run `python -m "
                                       f"fedsoda_mpi.prepare model {SMOLLM2}` on a machine with internet first")
        else:
            out.append((Path(name).name, Path(name).expanduser()))
    return out


def tiny_model(work: Path) -> Path:
    """The tiny SmolLM2-shaped model (fedsoda_mpi/tiny.py), built once per check in `work`."""
    from .tiny import build_model

    folder = work / "tiny-llama"
    return folder if (folder / "config.json").is_file() else build_model(folder, "llama")


def run_model(label: str, folder: Path, devices: Devices, work: Path, report: Report) -> bool:
    """The six in-process steps on one model; False at the first failure."""
    run = ModelRun(label, folder, devices, work / label)
    run.work.mkdir(parents=True, exist_ok=True)
    try:
        for step in STEPS:
            used = tuple(getattr(devices, w) for w in STEP_DEVICES[step])
            if not report.run(f"{label}/{step}", used, lambda s=step: STEP_FUNCS[s](run)):
                return False
        return True
    finally:
        run.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m fedsoda_mpi.smoke", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="where the steps run (the run's `device` setting) [auto]")
    ap.add_argument("--model", nargs="+", default=["tiny", "smollm2"], metavar="tiny|smollm2|PATH",
                    help="models of the in-process steps [tiny smollm2]; the MPI round always uses the tiny one")
    ap.add_argument("--launcher", choices=("auto", "srun", "mpirun"), default="auto",
                    help="how the MPI round starts its ranks [auto: srun inside a Slurm job, else mpirun]")
    ap.add_argument("--no-mpi", action="store_true", help="skip the MPI round (says SKIP)")
    ap.add_argument("--mpi-timeout", type=float, default=600, help="seconds the MPI round may take [600]")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (models, run folders, logs)")
    return ap.parse_args(argv)


def quiet() -> None:
    """No progress bars (ODA's, transformers' weight loading) and only transformers' errors: the step lines are
    the output (warnings still reach stderr)."""
    os.environ.setdefault("FEDSODA_PROGRESS", "0")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None, stream=None) -> int:
    """Run the check; 0 when every step passed (SKIPs allowed), 1 at the first FAIL, 2 when --device cannot hold."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    quiet()
    report, t0 = Report(stream), time.perf_counter()
    try:
        devices = resolve_devices(args.device)
    except SmokeFailure as e:
        report.fail("device", str(e))
        return 2
    from . import devices as policy

    policy.activate(str(devices.server))
    report.say(f"smoke: --device {args.device}: server {describe(devices.server)}, client {describe(devices.client)}"
               "; peak = " + ("torch.cuda.max_memory_allocated per device" if devices.server.type == "cuda"
                              else "process peak RSS (ru_maxrss)"))
    work = Path(tempfile.mkdtemp(prefix="fedsoda-smoke-"))
    try:
        ok = all_steps(args, devices, work, report)
    finally:
        if args.keep:
            report.say(f"smoke: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    skipped = f" ({len(report.skipped)} skipped: {', '.join(report.skipped)})" if report.skipped else ""
    if not ok:
        report.say(f"smoke: FAILED at {report.failed} after {seconds:.0f}s ({len(report.passed)} steps passed)")
        return 1
    report.say(f"smoke: all {len(report.passed)} steps passed in {seconds:.0f}s{skipped}")
    return 0


def all_steps(args, devices: Devices, work: Path, report: Report) -> bool:
    """Every model's in-process steps, then the MPI round; False at the first failure."""
    for label, folder in model_folders(args.model, work, report):
        if not run_model(label, folder, devices, work, report):
            return False
    if args.no_mpi:
        report.skip(f"tiny/{MPI_STEP}", "--no-mpi")
        return True
    return report.run(f"tiny/{MPI_STEP}", (), lambda: step_mpi_round(tiny_model(work), devices, work,
                                                                     args.launcher, args.mpi_timeout))


if __name__ == "__main__":
    sys.exit(main())
