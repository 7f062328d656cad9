"""fedsoda-mpi entry point: config -> roles by rank -> the federated run (Algorithm 2 of the paper).

    mpirun -n 11 python -m mpi4py -m fedsoda_mpi.main                         # default job (jobs/smollm2_sst2_iid.yaml)
    mpirun -n 3  python -m mpi4py -m fedsoda_mpi.main fed.rounds=2 eval.max_examples=50
    mpirun -n 11 python -m mpi4py -m fedsoda_mpi.main --config jobs/llama3_gsm8k_iid.yaml
    srun --mpi=pmix python -m mpi4py -m fedsoda_mpi.main --config ...       # inside sbatch (see slurm/)

Rank 0 is the server, ranks 1..N-1 host the clients (several virtual clients per rank when
fed.clients > ranks - 1). The config is validated on every rank before any MPI collective: a bad
value ends every rank with one line and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .config import Config, ConfigError, load_config, validate

USAGE_EXIT = 2
STOPPED_EXIT = 75  # EX_TEMPFAIL: stopped early on SIGUSR1 after a checkpoint; continue with resume=auto
TERMINATED_EXIT = 128 + signal.SIGTERM  # stopped on SIGTERM: the round in progress is abandoned
STOP_REQUESTED: list[str | None] = [None]  # set by the SIGUSR1 handler, read by rank 0 at the end of a round
PROGRESS = {"round": 0, "log": None}  # what the SIGTERM handler reports: the round in progress, this rank's log


class Terminated(BaseException):
    """Raised by the SIGTERM handler in the main thread: unwinds every `with` block (temporary folders are
    removed, files closed) and ends the rank with TERMINATED_EXIT. A BaseException, so no `except Exception`
    on the way swallows it."""


def install_stop_handler() -> None:
    """SIGUSR1 (Slurm's `--signal=B:USR1@300`, forwarded by slurm/common.sh) asks for a clean stop: the
    current round finishes, rank 0 writes a checkpoint, every rank exits with STOPPED_EXIT.
    SIGTERM (`scancel`, Slurm's time limit, `kill <mpirun>`; a SIGKILL follows after Slurm's KillWait, 30 s by
    default, or mpirun's own short grace period) cannot wait for the round to end: every rank logs one line,
    abandons the round (the checkpoint of the last finished round stays the newest) and exits with
    TERMINATED_EXIT after its temporary files are removed."""
    def stop(signum, frame):
        STOP_REQUESTED[0] = signal.Signals(signum).name

    def terminate(signum, frame):  # writes nothing itself: the main thread may be inside a write to the same log
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
        raise Terminated()

    signal.signal(signal.SIGUSR1, stop)
    signal.signal(signal.SIGTERM, terminate)


def sweep_stale_copies(root: Path | None = None) -> list[str]:
    """Remove the on-disk sub-LLM copies (TMPDIR/fedsoda-client<rank>-<pid>-*) of client processes that are gone:
    a rank SIGKILLed while loading (mpirun's grace period after SIGTERM is about a second) could not remove its own."""
    removed = []
    for path in sorted(Path(root or tempfile.gettempdir()).glob("fedsoda-client*-*-*")):
        try:
            pid = int(path.name.split("-")[2])
        except ValueError:
            continue  # not a name this code writes
        if not process_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def process_alive(pid: int) -> bool:
    """True if `pid` runs. A zombie (killed, not yet reaped: in containers whose init never reaps, forever) is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): trust kill(0)
    return state not in ("Z", "X", "x")


def where_now() -> str:
    return f"in round {PROGRESS['round']}" if PROGRESS["round"] else "before round 1"


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    ap = argparse.ArgumentParser(prog="fedsoda_mpi.main", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="job YAML (default: jobs/smollm2_sst2_iid.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. fed.rounds=2")
    args = ap.parse_args(argv)
    return args.config, args.overrides


def prepare_config(argv: list[str], world_size: int) -> Config:
    """Load + validate everything that can be checked without a collective: every key, the model folder
    (config.json, tokenizer, architecture, LoRA target names) and the run folder."""
    from . import models
    from .config import check_run_folder
    from .server import model_path

    path, overrides = parse_args(argv)
    cfg = load_config(path, overrides)
    validate(cfg, world_size=world_size)
    folder = model_path(cfg.model.name)
    try:
        layers = models.check_model_folder(folder)
    except FileNotFoundError as e:
        raise ConfigError(f"model.name: {e}") from None
    validate(cfg, num_layers=layers, module_names=models.linear_module_names(folder))
    check_run_folder(run_dir_of(cfg), "output.dir" if cfg.output.dir else "output.root")
    if cfg.resume == "auto":
        check_resumable(cfg)
    elif finished_run(run_dir_of(cfg)):
        raise ConfigError(f"{run_dir_of(cfg)} already holds a finished run (run.h5 with /final); extend it with "
                          "resume=auto fed.rounds=..., or choose another output.dir / output.name")
    return cfg


def finished_run(run_dir: Path) -> bool:
    """Whether run_dir/run.h5 is the record of a run that reached its final evaluation (/final)."""
    import h5py

    try:
        with h5py.File(run_dir / "run.h5", "r", locking=False) as f:
            return "final" in f
    except (OSError, ValueError):  # absent, truncated by a crash, not HDF5: no finished run there
        return False


ATTEMPT_FILES = ("run.h5", "config.yaml", "log.txt", "log.rank*.txt", "client_rank*.json", "checkpoints", "adapter")


def archive_failed_attempt(run_dir: Path) -> Path | None:
    """A run started without resume=auto in a folder that holds an unfinished attempt (failed or interrupted,
    no /final): move that attempt's files into run_dir/failed-<time>/ so the same command starts over and
    nothing of the old attempt is lost (its log keeps the FATAL line). Rank 0 only, before any rank logs."""
    found = [p for pattern in ATTEMPT_FILES for p in run_dir.glob(pattern)]
    if not found:
        return None
    dest = run_dir / time.strftime("failed-%Y%m%d-%H%M%S")
    dest.mkdir()
    for p in found:
        p.rename(dest / p.name)
    return dest


# keys that may change when a run is resumed; every other setting must equal the checkpointed run's
RESUME_MAY_CHANGE = ("resume", "job", "debug.", "output.", "fed.rounds", "fed.checkpoint_every", "fed.keep_checkpoints", "eval.")


def run_dir_of(cfg: Config) -> Path:
    """The run folder: output.dir, or output.root/output.name, or output.root/<job>-<method>-<job id or time>."""
    return Path(cfg.output.dir or Path(cfg.output.root) / run_name(cfg))


def check_resumable(cfg: Config) -> None:
    """resume=auto: the run folder must be fixed in advance, and a run found there must have the same settings."""
    from .config import _flatten

    if not (cfg.output.dir or cfg.output.name or os.environ.get("SLURM_JOB_ID")):
        raise ConfigError("resume=auto: set output.dir (or output.name) so that a restart finds the same run folder")
    saved = run_dir_of(cfg) / "config.yaml"
    if not saved.is_file():
        return  # nothing to resume yet: a fresh run
    old, new = _flatten(load_config(str(saved), []).to_dict()), _flatten(cfg.to_dict())
    for key in sorted(set(old) | set(new)):
        if not key.startswith(RESUME_MAY_CHANGE) and old.get(key) != new.get(key):
            raise ConfigError(f"resume=auto: {key} is {old.get(key)!r} in the run at {saved.parent} but {new.get(key)!r} "
                              "now; resume with the same settings (only rounds, eval, output, checkpoint keys may "
                              "change) or choose another output.dir")


def prepare_inputs(cfg: Config) -> tuple[list[list[dict]], np.ndarray]:
    """Read what the run needs from disk before any MPI collective, on every rank: the clients' partition
    (identical everywhere, seeded), the test and public texts, and the model's weight headers.
    A missing/damaged/empty file raises DataError or ModelError with one line naming the file; a key the
    files cannot satisfy (more clients or validation rows than training rows, too many GSM8K shots) a
    ConfigError naming the key and the file."""
    from . import data, models
    from .server import model_path

    task, val_size = cfg.data.task, cfg.data.val_size
    try:
        rows, hist = data.client_datasets(task, cfg.fed.clients, cfg.data.split, cfg.data.dirichlet_beta,
                                          cfg.seed, cfg.data.max_train_per_client or None, val_size,
                                          cfg.data.pooled_clients)
    except ValueError as e:  # a partition that cannot give every client data: name the key (the file reads fine)
        train = data.data_dir() / task / "train.jsonl"
        n_train = len(data.load_rows(task, "train"))
        clients, key = (cfg.data.pooled_clients, "data.pooled_clients") if cfg.data.pooled_clients else \
            (cfg.fed.clients, "fed.clients")
        if val_size >= n_train:
            raise ConfigError(f"data.val_size: must be smaller than the {n_train} rows of {train}, "
                              f"got {val_size}") from None
        if str(e).startswith("validation size"):
            raise ConfigError(f"data.val_size: {e} of {train}, got {val_size}") from None
        if clients > n_train - val_size:
            raise ConfigError(f"{key}: must be at most the {n_train - val_size} training rows of {train} (after "
                              f"data.val_size={val_size}), got {clients}") from None
        raise data.DataError(f"data.split={cfg.data.split}: {e}") from None
    if task == "gsm8k" and cfg.eval.k_shot > sum(len(r) for r in rows):  # shots come from train minus validation
        n_shots = len(data.load_rows(task, "train")) - val_size
        if cfg.eval.k_shot > n_shots:
            raise ConfigError(f"eval.k_shot: must be at most the {n_shots} training rows of "
                              f"{data.data_dir() / task / 'train.jsonl'} (after data.val_size={val_size}), "
                              f"got {cfg.eval.k_shot}")
    data.load_rows(task, "test")
    data.load_public(cfg.data.public)
    models.check_weights(model_path(cfg.model.name))
    return rows, hist


@contextlib.contextmanager
def oom_guard(rank: int, client: int, cfg: Config):
    """Turn an out-of-memory in a client's local step into one actionable line (rank, client, batch size)."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise RuntimeError(f"out of memory on rank {rank} (client {client}) at fed.batch_size={cfg.fed.batch_size}, "
                           f"data.max_len={cfg.data.max_len}: lower fed.batch_size or data.max_len "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def client_schedule(cfg: Config, world_size: int, rnd: int) -> list[int]:
    """Virtual clients sampled in round `rnd` (the same on every rank: seeded by (seed, round))."""
    n, m = cfg.fed.clients, cfg.fed.clients_per_round or cfg.fed.clients
    if m == n:
        return list(range(n))
    return sorted(np.random.default_rng([cfg.seed, rnd]).choice(n, size=m, replace=False).tolist())


def placement(chosen: list[int], world_size: int) -> dict[int, int]:
    """Client rank of each virtual client sampled this round: the i-th of the sorted sample runs on rank
    1 + i mod (W - 1), so every rank trains ceil(m / (W - 1)) or fewer clients (a round waits for its slowest
    rank; fixed homes would give some ranks 2-3 of 10 random clients). With full participation the placement
    is the same every round (client k on rank 1 + k mod (W - 1)), so a rank's emulator cache stays warm."""
    return {k: 1 + i % (world_size - 1) for i, k in enumerate(sorted(chosen))}


def run_name(cfg: Config) -> str:
    job = Path(cfg.job).stem if cfg.job else "job"
    slurm = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    tag = f"{slurm}_{task}" if slurm and task else (slurm or time.strftime("%Y%m%d-%H%M%S"))
    return cfg.output.name or f"{job}-{cfg.method}-{tag}"


def threads_for(comm) -> int:
    """Torch threads per rank. The server's phases (SGP, ODA, evaluation) and the clients' local
    training never overlap (the idle side sleeps in `Comm.idle_wait`), so rank 0 takes every core it
    may use, and the client ranks of a node share the cores (or take OMP_NUM_THREADS when set)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks_here = comm.local_size()  # collective: every rank calls it
    if comm.is_server:
        return cores
    if "OMP_NUM_THREADS" in os.environ:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, cores // ranks_here)


def realign_interval(cfg: Config, plan) -> int:
    """r of Algorithm 2 line 9, or 0 when this run never re-aligns (disabled, or no emulator LoRA)."""
    return cfg.oda.every if (cfg.oda.re_align and plan.emulator_lora_sub) else 0


def resume_point(cfg: Config, run_dir: Path, log):
    """resume=auto: the newest valid checkpoint (its run.h5 copy replaces the live one, so rows written after
    it are dropped, not duplicated), or None for a fresh start."""
    from . import checkpoint

    if cfg.resume != "auto":
        return None
    ck = checkpoint.latest(run_dir, warn=log.log)
    if ck is None:
        if (run_dir / "run.h5").exists():
            log.log(f"WARNING: resume=auto but {run_dir} has no valid checkpoint; starting the run over")
        return None
    shutil.copyfile(ck.path / "run.h5", run_dir / "run.h5")
    return ck


@contextlib.contextmanager
def stopwatch(out: dict, key: str):
    """out[key] = wall seconds of the block (one-time phases: SGP, pre-alignment, ...)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        out[key] = time.perf_counter() - t0


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def write_holdings(run_dir: Path, comm, model, params, model_bytes: int) -> None:
    """What this client rank holds (checked by the tests: never the full LLM)."""
    import bitsandbytes as bnb

    from . import models

    held = {"rank": comm.rank, "decoder_layers": len(models.get_layers(model)),
            "linear4bit": sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()),
            "stored_bytes": models.stored_bytes(models.base_model(model)), "received_model_bytes": model_bytes,
            "trainable_params": sum(p.numel() for p in params),
            "parameter_names": sorted({n.split(".layers.")[0] for n, _ in model.named_parameters()})}
    (run_dir / f"client_rank{comm.rank}.json").write_text(json.dumps(held, indent=1))


def run(cfg: Config, comm, inputs: tuple | None = None) -> dict | None:
    """The protocol of Algorithm 2 across ranks; returns the final results on rank 0, {"stopped": round} on
    every rank after a stop request, None on client ranks otherwise."""
    from . import data, fedsrd, models
    from .client import EmulatorCache, local_train
    from .comm import Schema, install_abort_hook
    from .fedsrd import Wire
    from .methods import Plan
    from .runlog import RunLog
    from .timing import PHASES, PhaseClock, split

    # run folder: rank 0 decides the name (and moves a failed attempt aside), everyone gets it (bytes, never pickled)
    archived = archive_failed_attempt(run_dir_of(cfg)) if comm.is_server and cfg.resume != "auto" else None
    name = {"run_dir": str(run_dir_of(cfg)).encode()} if comm.is_server else None
    run_dir = Path(comm.broadcast_bytes(name, category="control")["run_dir"].decode())
    log = RunLog(run_dir, comm.rank)
    install_abort_hook(lambda text: log.log(text, echo=False))  # a FATAL line also goes into this rank's log file
    PROGRESS["log"] = log
    if archived:
        log.log(f"the folder held an unfinished attempt (no /final): moved it to {archived}; starting over")
    device = comm.device()
    seed_all(cfg.seed)
    n_threads = torch.get_num_threads()
    log.log(f"rank {comm.rank}/{comm.size} on {device}, {n_threads} torch threads, run dir {run_dir}")

    # clients' data partition: identical on every rank (seeded), each rank tokenizes only its own clients
    rows, hist = inputs or prepare_inputs(cfg)
    server, start = None, 0
    if comm.is_server:
        from .server import Server

        ck = resume_point(cfg, run_dir, log)
        log.open_h5(cfg, comm.size, cfg.model.name, mode="a" if ck else "w")  # also writes config.yaml
        server = Server(cfg, log, device)
        if ck is None:
            log.write("data/client_sizes", np.array([len(r) for r in rows], dtype=np.int64))
            log.write("data/client_label_hist", np.asarray(hist, dtype=np.int64))
            record_split(cfg, log, server)
            setup = {}
            base = {"accuracy": float("nan"), "n": 0}  # eval.base=false: a study evaluates the base model once per task
            if cfg.eval.base:
                with stopwatch(setup, "base_eval_s"):
                    base = server.evaluate("full")  # round 0: the base model (LoRA not yet attached)
                log.log(f"base model accuracy ({cfg.data.task}, n={base['n']}): {base['accuracy']:.4f}")
            log.set_attrs("base", accuracy=base["accuracy"], n=base["n"])
            with stopwatch(setup, "sgp_s"):
                plan = server.plan_layers()
            with stopwatch(setup, "build_s"):
                server.build(plan)
            with stopwatch(setup, "pre_align_s"):
                server.pre_align()
            log.set_attrs("timing", **setup)  # one-time server phases (the per-round ones are /timing/phase_s)
        else:
            base = {k: v.item() for k, v in log.h5["base"].attrs.items()}
            plan = Plan.from_dict(ck.state["plan"])
            server.build(plan)
            server.restore(ck)
            start = ck.round
            log.set_attrs("/", resumed_from=np.append(log.h5.attrs.get("resumed_from", []), start).astype(np.int32))
            log.log(f"resumed from {ck.path} (round {start} of {cfg.fed.rounds}); SGP and pre-alignment not repeated")
        files = {"plan.json": json.dumps(plan.to_dict()).encode(), "start.json": json.dumps(start).encode(),
                 **server.bundle}
        log.flush()
    else:
        files = None

    # Algorithm 2 line 6: send M* ONCE (quantized weights + config + tokenizer); never the full LLM
    comm.idle_wait()
    t0 = time.time()
    files = comm.broadcast_bytes(files, category="model")
    plan = Plan.from_dict(json.loads(files.pop("plan.json")))
    start = json.loads(files.pop("start.json"))
    model_bytes = sum(len(v) for v in files.values())
    lora_kw = dict(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules))
    if comm.is_server:
        sub = server.sub
        log.log(f"shipped the sub-LLM ({model_bytes / 2**20:.1f} MiB) to {comm.size - 1} client ranks in {time.time() - t0:.1f}s")
    else:
        sweep_stale_copies()
        with tempfile.TemporaryDirectory(prefix=f"fedsoda-client{comm.rank}-{os.getpid()}-") as tmp:  # loaded, removed
            sub, tok = models.load_bundle(files, Path(tmp), str(device))
        data.ensure_pad_token(tok)
        torch.manual_seed(cfg.seed)
        sub = models.add_lora(sub, plan.lora_sub, **lora_kw)
        examples = {}  # client -> tokenized examples, filled when the client is first placed on this rank

        def examples_of(k: int) -> list[dict]:
            if k not in examples:
                examples[k] = [data.tokenize_sft(tok, *data.prompt_and_answer(cfg.data.task, r), cfg.data.max_len)
                               for r in rows[k]]
            return examples[k]
        params = models.set_trainable(sub, plan.adapter_sub)
        cache = EmulatorCache(cfg.fed.emulator_cache)
        log.log(f"client rank {comm.rank}: {cfg.fed.clients} virtual clients placed per round, sub-LLM {plan.sub_layers} layers, "
                f"{sum(p.numel() for p in params)} trainable params")
        write_holdings(run_dir, comm, sub, params, model_bytes)
    del files

    # schemas, agreed once (rank 0 sleeps in idle_wait, not in a blocking Bcast, while the clients load M*)
    comm.idle_wait()
    em_schema = comm.agree_schema(Schema.of(server.emulator_lora()) if comm.is_server and plan.emulator_lora_sub else
                                  (Schema((), (), "float32") if comm.is_server else None))
    ad_schema = comm.agree_schema(Schema.of(server.global_adapter) if comm.is_server else None)
    wire = Wire(ad_schema.names, ad_schema.shapes, cfg.fed.aggregator, cfg.fed.upload_density, cfg.fed.download_density,
                ad_schema.dtype)

    clock = PhaseClock(comm)
    t_schema = Schema(("t",), ((len(PHASES) + 5,),), "float64")

    def send_emulator():
        state = comm.broadcast(server.emulator_lora() if comm.is_server else None, em_schema, category="emulator_lora")
        if not comm.is_server and em_schema.names:
            models.load_lora_state(sub, state)
            cache.invalidate()

    send_emulator()  # the pre-aligned emulator LoRA
    moved_mark = comm.totals()  # /rounds/moved_bytes: rank 0's transport counters since the previous row
    realign_every = realign_interval(cfg, plan)
    n = cfg.fed.clients
    stopped = False
    for rnd in range(start + 1, cfg.fed.rounds + 1):
        PROGRESS["round"] = rnd
        t_round = time.time()
        clock.start_round()
        sent0 = comm.totals()
        realigned = bool(realign_every and rnd % realign_every == 0)
        if realigned:  # Algorithm 2 lines 9-14
            if comm.is_server:
                with clock.phase("realign"):
                    server.re_align(rnd)
            comm.idle_wait()
            with clock.phase("download"):
                send_emulator()
        chosen = client_schedule(cfg, comm.size, rnd)
        where = placement(chosen, comm.size)
        counts = [0] + [sum(1 for k in chosen if where[k] == r) for r in comm.client_ranks]
        comm.idle_wait()
        t_down = time.perf_counter()
        if wire.sparse_down(rnd, start + 1):  # FedSRD: the previous round's sparse update of one factor
            factor = fedsrd.factor_for_round(rnd - 1)  # known to every rank, no message needed
            assert not comm.is_server or server.pending[0] == factor
            part, idx_s, val_s = wire.down[factor]
            down_params = val_s.numel
            down_bytes = idx_s.nbytes + val_s.nbytes
            idx = comm.broadcast(server.pending[1] if comm.is_server else None, idx_s, category="adapter_lora")
            val = comm.broadcast(server.pending[2] if comm.is_server else None, val_s, category="adapter_lora")
            global_state = server.global_adapter if comm.is_server else fedsrd.apply_update(
                global_state, {**{name: torch.zeros_like(t) for name, t in global_state.items()}, **fedsrd.decode(idx, val, part)})
        else:
            global_state = comm.broadcast(server.global_adapter if comm.is_server else None, ad_schema,
                                          category="adapter_lora")
            down_params, down_bytes = ad_schema.numel, ad_schema.nbytes
        clock.add("download", time.perf_counter() - t_down)
        inject = cfg.debug.fail_rank == comm.rank and cfg.debug.fail_round == rnd
        if inject and cfg.debug.fail_kind == "raise":
            raise RuntimeError(f"debug.fail_rank={comm.rank} debug.fail_round={rnd}: injected failure")
        uploads = []
        if not comm.is_server:  # memory stays flat in fed.clients: only this round's clients keep data + cache
            here = {k for k in chosen if where[k] == comm.rank}
            for k in set(examples) - here:
                del examples[k]
            cache.keep(here)
            for k in chosen:
                if where[k] != comm.rank:
                    continue
                models.load_lora_state(sub, global_state)
                torch.manual_seed(cfg.seed * 100003 + rnd * 1009 + k)
                t_train, t_emulator = time.perf_counter(), cache.seconds
                with oom_guard(comm.rank, k, cfg):
                    if inject and cfg.debug.fail_kind == "oom":
                        raise torch.OutOfMemoryError("debug.fail_kind=oom: simulated")
                    loss, steps = local_train(sub, plan, params, examples_of(k), tok.pad_token_id, cache, k,
                                              cfg.fed.local_steps, cfg.fed.local_epochs, cfg.fed.batch_size, cfg.fed.lr,
                                              cfg.fed.mu, np.random.default_rng([cfg.seed, rnd, k]))
                emulator_s = cache.seconds - t_emulator
                clock.add("emulator", emulator_s)
                clock.add("adapter", time.perf_counter() - t_train - emulator_s)
                clock.steps += steps
                t_up = time.perf_counter()
                local = models.lora_state(sub, plan.adapter_sub)
                if inject and cfg.debug.fail_kind == "nan":  # a diverged client: its whole update is NaN
                    inject = False
                    local = {name: torch.full_like(t, float("nan")) for name, t in local.items()}
                uploads.append(wire.pack_upload(local, global_state, loss, len(examples[k])))
                clock.add("upload", time.perf_counter() - t_up)
        comm.idle_wait()
        with clock.phase("upload"):
            gathered = [comm.gatherv([u[i] for u in uploads], schema, counts, category="upload")
                        for i, schema in enumerate(wire.up)]
        if comm.is_server:
            t_agg = time.perf_counter()
            flat = [list(msgs) for parts in zip(*gathered) for msgs in zip(*parts)]
            order = [k for r in comm.client_ranks for k in chosen if where[k] == r]
            losses, nk = np.full(n, np.nan, np.float32), np.zeros(n, np.float32)
            updates, weights = [], []
            for k, msgs in zip(order, flat):
                state, losses[k], nk[k] = wire.unpack_upload(msgs, server.global_adapter)
                updates.append(state)
                weights.append(nk[k])
            if cfg.fed.aggregator == "fedavg":
                rejected = server.aggregate(updates, weights)
            else:
                rejected = server.aggregate_srd(updates, weights, rnd, wire)
            if updates and len(rejected) == len(updates):
                raise RuntimeError(all_rejected_message(cfg, rnd, order))
            rejected_mask = np.zeros(n, np.int8)
            for i in rejected:
                rejected_mask[order[i]] = 1
                log.log(f"round {rnd}: rejected the update of client {order[i]} (non-finite values)")
            clock.add("aggregate", time.perf_counter() - t_agg)
            acc = np.nan
            if cfg.eval.every and rnd % cfg.eval.every == 0:
                with clock.phase("evaluate"):  # on the validation rows: never on the test split
                    acc = server.evaluate("full", "val")["accuracy"]
            now = comm.totals()
            sent = now["sent"] - sent0["sent"]
            moved = now["sent"] + now["recv"] - moved_mark["sent"] - moved_mark["recv"]
            moved_mark = now
            # LoRA tensor bytes this round had to move: the download to every client rank (+ the re-aligned
            # emulator LoRA), one upload per sampled client without its two scalars (loss, n_k)
            payload = ((comm.size - 1) * (down_bytes + (em_schema.nbytes if realigned else 0))
                       + len(chosen) * (wire.up_bytes - 8))
            upload = np.zeros(n, np.int64)
            upload[chosen] = wire.up_bytes
            log.append("rounds", {"round": np.int32(rnd), "wall_s": np.float64(time.time() - t_round), "train_loss": losses,
                                  "n_samples": nk, "upload_bytes": upload,
                                  "download_bytes": np.int64(sent // (comm.size - 1)),
                                  "comm_params": np.int64(wire.up[-1].numel - 2 + down_params
                                                          + (em_schema.numel if realigned else 0)),
                                  "upload_density": np.float32((wire.up[-1].numel - 2) / ad_schema.numel),
                                  "download_density": np.float32(down_params / ad_schema.numel),
                                  "moved_bytes": np.int64(moved), "payload_bytes": np.int64(payload),
                                  "realigned": np.int8(realigned), "eval_acc": np.float32(acc),
                                  "rejected": rejected_mask})
            with clock.phase("evaluate"):  # the drift probe: two forwards on one held-out batch
                drift = server.drift()
            if drift.size:  # no L_inter pairs (no SGP groups): nothing to track
                log.append("drift", {"round": np.int32(rnd), "distance": drift})
            log.flush()
            log.log(f"round {rnd}/{cfg.fed.rounds}: loss {np.nanmean(losses):.4f}, {time.time() - t_round:.1f}s"
                    + (", re-aligned" if realigned else "") + ("" if np.isnan(acc) else f", acc {acc:.4f}"))
        elif rnd == 1 or realigned:
            log.log(f"round {rnd}: emulator cache {cache.hits} hits / {cache.misses} misses")
        # every rank's phase times of this round -> /timing (one float64 row per rank, fixed schema)
        comm.idle_wait()
        ranks = comm.gatherv([{"t": torch.from_numpy(clock.row())}], t_schema, [1] * comm.size, category="timing")
        if comm.is_server:
            log.append("timing", {"round": np.int32(rnd), **split(torch.stack([m[0]["t"] for m in ranks]).numpy())})
            log.set_attrs("timing", phases=list(PHASES))
            log.flush()
        # a stop request (SIGUSR1 at rank 0, e.g. Slurm's warning before the time limit) ends every rank here
        stopped = comm.broadcast_flag(STOP_REQUESTED[0] if comm.is_server else None)
        if comm.is_server and (stopped or (cfg.fed.checkpoint_every and rnd % cfg.fed.checkpoint_every == 0)):
            path = server.checkpoint(rnd)
            if stopped:
                log.log(f"stopping after round {rnd} on {STOP_REQUESTED[0]}: checkpoint {path}; "
                        "run the same command with resume=auto to continue")
        if stopped:
            break
    comm.idle_wait()
    if stopped:
        log.close()
        return {"stopped": rnd}
    if not comm.is_server:
        log.log(f"bytes {dict(comm.bytes)}; MPI {comm.mpi_seconds:.2f}s, idle {comm.idle_seconds:.2f}s")
        log.close()
        comm.idle_wait()
        return None
    result = finish(cfg, comm, server, log, base, model_bytes, ad_schema, em_schema, wire)
    comm.idle_wait()
    return result


def all_rejected_message(cfg: Config, rnd: int, clients: list[int]) -> str:
    """The error that ends a run whose every update of a round was non-finite: the global LoRA cannot move."""
    every = cfg.fed.checkpoint_every
    last = (rnd - 1) // every * every if every else 0
    kept = f"its last checkpoint is round {last}" if last else "it has no checkpoint yet"
    return (f"round {rnd}: every client update was non-finite (NaN/Inf; clients {', '.join(map(str, sorted(clients)))}), "
            f"so the global LoRA cannot move; the run stops here ({kept}). Lower fed.lr (now {cfg.fed.lr:g}) or "
            "check the data, then run again (resume=auto continues from that checkpoint)")


def record_split(cfg: Config, log, server) -> None:
    """/data: which training rows are the fixed validation set (indices into <task>/train.jsonl), the split."""
    from . import data

    n_train, held = server.n_train_file, server.val_index
    log.write("data/val_index", held.astype(np.int64))
    log.set_attrs("data", task=cfg.data.task, val_size=cfg.data.val_size, val_seed=data.VAL_SEED, n_train_file=n_train,
                  val_min_words=data.VAL_MIN_WORDS.get(cfg.data.task, 0),
                  split=cfg.data.split, dirichlet_beta=cfg.data.dirichlet_beta, eval_rounds_on="val" if
                  cfg.data.val_size else "test", test_max_examples=cfg.eval.max_examples)


def final_val_accuracy(cfg: Config, server, log) -> dict:
    """Validation accuracy of the final model: /rounds/eval_acc of the last round when eval.every divides
    fed.rounds (what a study selects its learning rate on), else NaN (no extra evaluation)."""
    rounds = log.h5["rounds"] if "rounds" in log.h5 else None
    if cfg.data.val_size and rounds is not None and len(rounds["round"]) \
            and int(rounds["round"][-1]) == cfg.fed.rounds and np.isfinite(rounds["eval_acc"][-1]):
        return {"accuracy": float(rounds["eval_acc"][-1]), "n": len(server.val_rows)}
    return {"accuracy": float("nan"), "n": 0}


def finish(cfg: Config, comm, server, log, base: dict, model_bytes: int, ad_schema, em_schema, wire) -> dict:
    """Algorithm 2 line 22 + evaluation: full LLM with the plugged adapter (test and validation), the sub-LLM, table."""
    full = server.evaluate("full")
    sub = full if server.sub_is_full else server.evaluate("sub")  # FedPETuning: the same weights, the same answers
    val = final_val_accuracy(cfg, server, log)
    plan = server.plan
    realign_every = realign_interval(cfg, plan)
    adapter_params, adapter_bytes = wire.traffic()  # 2 x the adapter LoRA for FedAvg (down + up)
    per_round = adapter_bytes + (em_schema.nbytes / realign_every if realign_every else 0)
    lora_bytes = ad_schema.nbytes + em_schema.nbytes
    res = {"accuracy": full["accuracy"], "sub_accuracy": sub["accuracy"], "base_accuracy": base["accuracy"],
           "trainable_params": ad_schema.numel,
           "comm_params_per_round": int(adapter_params + (em_schema.numel / realign_every if realign_every else 0)),
           "comm_bytes_per_round": float(per_round), "client_model_bytes": int(model_bytes + lora_bytes),
           "full_model_bytes": int(server.full_bytes),
           "val_accuracy": val["accuracy"], "n_val": val["n"],
           "task": cfg.data.task, "n_eval": full["n"], "aggregator": cfg.fed.aggregator,
           "upload_density": cfg.fed.upload_density, "download_density": cfg.fed.download_density}
    log.set_attrs("final", **res)
    out = server.export_adapter()
    log.log(f"bytes moved by rank 0: {dict(comm.bytes)}; MPI {comm.mpi_seconds:.2f}s, idle {comm.idle_seconds:.2f}s")
    table = [
        ("task / method", f"{cfg.data.task} / {cfg.method}"),
        ("base model accuracy", f"{base['accuracy']:.4f}"),
        ("sub-LLM accuracy", f"{sub['accuracy']:.4f}"),
        ("full LLM + adapter accuracy", f"{full['accuracy']:.4f}  (n={full['n']})"),
        ("... on the validation rows", f"{val['accuracy']:.4f}  (n={val['n']})"),
        ("trainable params per client", f"{res['trainable_params']:,}"),
        ("comm bytes per round per client", f"{per_round / 2**20:.3f} MiB"),
        ("client model bytes", f"{res['client_model_bytes'] / 2**20:.1f} MiB"),
        ("full model bytes", f"{res['full_model_bytes'] / 2**20:.1f} MiB"),
        ("run file", str(log.run_dir / "run.h5")),
        ("adapter (PEFT, full model)", str(out)),
    ]
    w = max(len(k) for k, _ in table)
    print("\n".join(["", "fedsoda-mpi final results", "-" * (w + 40)] + [f"{k:<{w}}  {v}" for k, v in table]), flush=True)
    log.close()
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from mpi4py import MPI

    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    from .data import DataError
    from .models import ModelError

    try:
        cfg = prepare_config(argv, size)
        inputs = prepare_inputs(cfg)
    except (ConfigError, DataError, ModelError) as e:
        if rank == 0:
            kind = {ConfigError: "config", DataError: "data", ModelError: "model"}[type(e)]
            print(f"fedsoda-mpi: {kind} error: {e}", file=sys.stderr, flush=True)
        return USAGE_EXIT
    from .comm import Comm, exit_with_launcher, install_abort_hook

    install_abort_hook()
    exit_with_launcher()
    install_stop_handler()
    comm = Comm()
    torch.set_num_threads(threads_for(comm))
    try:
        result = run(cfg, comm, inputs)
    except Terminated:  # every `with` block on the way has run: temporary folders are gone
        if PROGRESS["log"] is not None:
            PROGRESS["log"].log(f"stopping on SIGTERM {where_now()}: the round is abandoned; run the same command "
                                "with resume=auto to continue from the last checkpoint")
            PROGRESS["log"].close()  # run.h5 closed cleanly (it was flushed at the end of the last round)
        if rank == 0:
            print(f"fedsoda-mpi: stopped on SIGTERM {where_now()}; run the same command with resume=auto to "
                  "continue from the last checkpoint", file=sys.stderr, flush=True)
        os._exit(TERMINATED_EXIT)  # no MPI_Finalize: the other ranks are leaving too, not waiting in a collective
    return STOPPED_EXIT if result and "stopped" in result else 0


if __name__ == "__main__":
    sys.exit(main())
