"""fedsoda-mpi command line: parse and validate the config, read the inputs, start the federated run.

    mpirun -n 11 python -m mpi4py -m fedsoda_mpi.main                         # default job (jobs/smollm2_sst2_iid.yaml)
    mpirun -n 3  python -m mpi4py -m fedsoda_mpi.main fed.rounds=2 eval.max_examples=50
    mpirun -n 11 python -m mpi4py -m fedsoda_mpi.main --config jobs/llama3_gsm8k_iid.yaml
    srun --mpi=pmix python -m mpi4py -m fedsoda_mpi.main --config ...       # inside sbatch (see slurm/)

Rank 0 is the server, ranks 1..N-1 host the clients (several virtual clients per rank when
fed.clients > ranks - 1); the protocol is federation.py. Everything that can be checked is checked on every
rank before any MPI collective: a bad value or file ends every rank with one line and exit code 2.
Exit codes: 0 done, 2 bad input, 75 stopped on SIGUSR1 (resume=auto continues), 143 stopped on SIGTERM
(each rank's code; mpirun itself, which ends the job about a second after forwarding SIGTERM, usually reports 1).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from .config import Config, load_config
from .signals import (PROGRESS, STOPPED_EXIT, TERMINATED_EXIT, Terminated, install_stop_handlers, resume_hint,
                      where_now)
from .validation import ConfigError, validate

USAGE_EXIT = 2


class _Parser(argparse.ArgumentParser):
    """A command-line error is a ConfigError (one line from rank 0, exit 2), not usage text from every rank."""

    def error(self, message: str):
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")  # one line, however argparse wraps it
        raise ConfigError(f"{message} (usage: {usage})")


def help_epilog() -> str:
    """The --help text after the options: the config sections, where every key is documented, the order."""
    from .config_docs import SECTIONS

    width = max(len(name) for name in SECTIONS) + 4
    lines = [f"  {name + '.*' if name else 'top level':<{width}} {text}" for name, text in SECTIONS.items()]
    return ("config sections (key=value overrides; every key, its type, default, allowed values and the methods it\n"
            "applies to: docs/config.md):\n" + "\n".join(lines) + "\n\n"
            "order: defaults < the method's preset < the job file (--config) < key=value overrides.\n"
            "launch: mpirun -n 3 python -m mpi4py -m fedsoda_mpi.main [--config JOB] [key=value ...]")


def parse_options(argv: list[str]) -> argparse.Namespace:
    """--config, --print-config and the key=value overrides, which may come before, after or around the options."""
    ap = _Parser(prog="fedsoda_mpi.main", description=__doc__.split("\n")[0], epilog=help_epilog(),
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="job YAML (default: jobs/smollm2_sst2_iid.yaml)")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config (preset, job file, overrides applied) as YAML and exit; no run")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. fed.rounds=2")
    return ap.parse_intermixed_args(argv)


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--config, the key=value overrides), which may come before, after or around --config."""
    args = parse_options(argv)
    return args.config, args.overrides


def print_config(argv: list[str]) -> int | None:
    """--print-config: the resolved config as YAML on stdout and 0, or one config error line and 2; before any MPI
    (no mpirun needed). None when argv does not ask for it (or cannot be parsed: the run reports that)."""
    from .config import to_yaml

    try:
        args = parse_options(argv)
    except ConfigError:
        return None
    if not args.print_config:
        return None
    try:
        print(to_yaml(load_config(args.config, args.overrides)), end="")
    except ConfigError as e:
        print(f"fedsoda-mpi: config error: {e}", file=sys.stderr)
        return USAGE_EXIT
    return 0


def prepare_config(argv: list[str], world_size: int) -> Config:
    """Load + validate everything that can be checked without a collective: every key, the model folder
    (config.json, tokenizer, architecture, LoRA target names), data.max_len and eval.max_len against the
    tokenizer, and the run folder."""
    from . import checkpoint, model_folder
    from transformers import AutoTokenizer

    from .validation import check_cache_dir, check_environment, check_run_folder
    from .lengths import check_max_len
    from .paths import model_path
    from .runlog import finished_run, run_dir_of
    from .tasks import task_id

    path, overrides = parse_args(argv)
    cfg = load_config(path, overrides)
    validate(cfg, world_size=world_size)
    check_environment()
    folder = model_path(cfg.model.name)
    try:
        layers = model_folder.check_model_folder(folder)
    except FileNotFoundError as e:
        raise ConfigError(f"model.name: {e}") from None
    validate(cfg, num_layers=layers, module_names=model_folder.linear_module_names(folder))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    check_task(cfg, tokenizer)
    check_max_len(tokenizer, task_id(cfg.data), cfg.data.max_len)
    check_max_len(tokenizer, task_id(cfg.data), cfg.eval.max_len, "eval.max_len")
    run_dir = run_dir_of(cfg)
    check_run_folder(run_dir, "output.dir" if cfg.output.dir else "output.root")
    check_cache_dir(cfg)
    if cfg.resume == "auto":
        checkpoint.check_resumable(cfg, run_dir)
    elif finished_run(run_dir):
        raise ConfigError(f"{run_dir} already holds a finished run (run.h5 with /final); extend it with "
                          "resume=auto fed.rounds=..., or choose another output.dir / output.name")
    return cfg


def check_task(cfg: Config, tokenizer) -> None:
    """A custom task (data.task=custom): its task.json reads (DataError naming it), data.split=dirichlet has labels
    to skew, and the label words start with distinct tokens of the model's tokenizer (label-word likelihood)."""
    from . import tasks
    from .evaluate import label_word_ids

    if cfg.data.task != "custom":
        return
    task = tasks.task_id(cfg.data)
    spec = tasks.spec(task)
    if cfg.data.split == "dirichlet" and spec.kind == "generation":
        raise ConfigError(f"data.split=dirichlet: skews the label distribution, but the custom task {cfg.data.custom} "
                          "is a generation task (no labels); use data.split=iid")
    if spec.kind == "classification":
        try:
            label_word_ids(tokenizer, task)
        except ValueError as e:
            raise ConfigError(f"data.custom={cfg.data.custom}: {e}; choose label words that start differently "
                              f"({spec.folder / tasks.SPEC_FILE})") from None


def prepare_inputs(cfg: Config) -> tuple[list[list[dict]], np.ndarray]:
    """Read what the run needs from disk before any MPI collective, on every rank: the clients' partition
    (identical everywhere, seeded), the test and public texts, and the model's weight headers.
    A missing/damaged/empty file raises DataError or ModelError with one line naming the file; a key the
    files cannot satisfy (more clients or validation rows than training rows, too many GSM8K shots) a
    ConfigError naming the key and the file."""
    from . import data, model_folder
    from .paths import model_path
    from .tasks import is_generation, task_id

    task, val_size = task_id(cfg.data), cfg.data.val_size
    try:
        rows, hist = data.client_datasets(task, cfg.fed.clients, cfg.data.split, cfg.data.dirichlet_beta,
                                          cfg.seed, cfg.data.max_train_per_client or None, val_size,
                                          cfg.data.pooled_clients)
    except ValueError as e:  # a partition that cannot give every client data: name the key (the file reads fine)
        raise partition_error(cfg, e) from None
    if is_generation(task) and cfg.eval.k_shot > sum(len(r) for r in rows):  # shots come from train minus validation
        n_shots = len(data.load_rows(task, "train")) - val_size
        if cfg.eval.k_shot > n_shots:
            raise ConfigError(f"eval.k_shot: must be at most the {n_shots} training rows of "
                              f"{data.split_file(task, 'train')} (after data.val_size={val_size}), "
                              f"got {cfg.eval.k_shot}")
    data.load_rows(task, "test")
    if cfg.data.public != "self":  # self: rank 0 generates it (server.Server.self_public)
        data.load_public(cfg.data.public)
    model_folder.check_weights(model_path(cfg.model.name))
    return rows, hist


def partition_error(cfg: Config, e: ValueError) -> Exception:
    """The one-line error for a client partition the training file cannot give (names the key and the file)."""
    from . import data
    from .tasks import task_id

    task, val_size = task_id(cfg.data), cfg.data.val_size
    train = data.split_file(task, "train")
    n_train = len(data.load_rows(task, "train"))
    clients, key = (cfg.data.pooled_clients, "data.pooled_clients") if cfg.data.pooled_clients else \
        (cfg.fed.clients, "fed.clients")
    if val_size >= n_train:
        return ConfigError(f"data.val_size: must be smaller than the {n_train} rows of {train}, got {val_size}")
    if str(e).startswith("validation size"):
        return ConfigError(f"data.val_size: {e} of {train}, got {val_size}")
    if clients > n_train - val_size:
        return ConfigError(f"{key}: must be at most the {n_train - val_size} training rows of {train} (after "
                           f"data.val_size={val_size}), got {clients}")
    return data.DataError(f"data.split={cfg.data.split}: {e}")


def usage_exit(comm, e: Exception) -> int:
    """Bad input found by every rank: rank 0 prints one line, every rank waits (at most 10 s) until it has, and
    returns exit code 2; a rank alone with its error (a node-local folder) says it itself."""
    from .data import DataError
    from .model_folder import ModelError

    from .devices import DeviceError

    kind = {DataError: "data", ModelError: "model", DeviceError: "device"}.get(type(e), "config")
    if comm.rank == 0:
        print(f"fedsoda-mpi: {kind} error: {e}", file=sys.stderr, flush=True)
    if not comm.settle() and comm.rank != 0:  # every rank found the same error: none exits (and has the job
        # killed) before rank 0 printed; a rank alone with its error (a node-local folder, fed.cache_dir) says it
        print(f"fedsoda-mpi: {kind} error on rank {comm.rank}: {e}", file=sys.stderr, flush=True)
    return USAGE_EXIT


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    printed = print_config(argv)  # --help (argparse exits 0) and --print-config: no MPI
    if printed is not None:
        return printed
    from . import devices
    from .comm import Comm, exit_with_launcher, install_abort_hook
    from .data import DataError
    from .model_folder import ModelError
    from .runlog import RunFolderRefused
    from .space import check_space

    comm = Comm()  # no collective yet: rank and size only
    try:
        cfg = prepare_config(argv, comm.size)
        inputs = prepare_inputs(cfg)
        check_space(cfg, comm.rank)  # this rank's TMPDIR holds its copy of the sub-LLM
        devices.deterministic(cfg.debug.deterministic)  # before any CUDA work: cuBLAS reads its workspace setting once
        comm.agree_devices(cfg.device, devices.bf16_keys(cfg))  # the first collective: every rank's report
    except (ConfigError, DataError, ModelError, devices.DeviceError) as e:
        return usage_exit(comm, e)
    devices.activate(comm.device())
    from . import federation

    install_abort_hook()
    exit_with_launcher()
    install_stop_handlers()
    torch.set_num_threads(comm.torch_threads())
    try:
        result = federation.run(cfg, comm, inputs)
    except RunFolderRefused as e:  # every rank learns it from rank 0 when the run folder is opened
        return usage_exit(comm, e)
    except Terminated as e:  # every `with` block on the way has run: temporary folders are gone
        log = PROGRESS["log"]
        hint = resume_hint(log.run_dir if log is not None else None)
        if log is not None:
            log.log(f"stopping on {e.signal} {where_now()}: the round is abandoned; {hint}")
            log.close()  # run.h5 closed cleanly (it was flushed at the end of the last round)
        if comm.rank == 0:
            print(f"fedsoda-mpi: stopped on {e.signal} {where_now()}; {hint}", file=sys.stderr, flush=True)
        os._exit(TERMINATED_EXIT)  # no MPI_Finalize: the other ranks are leaving too, not waiting in a collective
    return STOPPED_EXIT if result and "stopped" in result else 0


if __name__ == "__main__":
    sys.exit(main())
