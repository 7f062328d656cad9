"""Algorithm 2 of the paper across MPI ranks: the only place that sequences collectives.

    rank 0       Server   (server.py)  SGP, build M*, pre-align (server_start.py); per round: re-align, aggregate,
                                       evaluate, record (bytes and times: accounting.py)
    ranks 1..W-1 Client   (client.py)  load M* once; per round: local training of the clients placed on the rank
    every rank   strategy (strategy.py; aggregate.py, fedsrd.py)  what is uploaded, aggregated, downloaded
    every rank   comm     (comm.py)    typed flat buffers over MPI, byte counters; a collective after one rank's
                                       long phase sleeps until every rank is there (`idle=True`)

    run:    set up (lines 1-5) -> ship M* once (line 6) -> agree schemas -> send the emulator LoRA
    round:  [re-align, send the emulator LoRA (lines 9-14)] -> download (line 7) -> local training (15-16)
            -> upload (17) -> aggregate (18) -> record -> timing -> checkpoint / stop
    finish: plug the adapter into M (line 22), evaluate, export the PEFT adapter

Started by `python -m fedsoda_mpi.main` (the CLI); the data path of one round is drawn in docs/design.md.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .accounting import Ledger
from .client import Client, Faults
from .comm import Schema, install_abort_hook
from .config import Config, preset_keys_set_by_job
from .host import as_numpy
from .methods import Plan
from .runlog import RunFolderRefused, RunLog, run_dir_of, take_lock
from .server_start import set_up_server
from .signals import PROGRESS, STOP_REQUESTED, StopRequested, stalled_exit
from .strategies import strategy_for
from .strategy import FIT, fit_message, fit_values
from .tasks import task_label
from .timing import EXTRA, PHASES, PhaseClock
from .watchdog import Heartbeat, Watch, Watcher, period_for


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


def realign_interval(cfg: Config, plan: Plan) -> int:
    """r of Algorithm 2 line 9, or 0 when this run never re-aligns (disabled, or no emulator LoRA)."""
    return cfg.oda.every if (cfg.oda.re_align and plan.emulator_lora_sub) else 0


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def all_rejected_message(cfg: Config, rnd: int, clients: list[int]) -> str:
    """The error that ends a run whose every update of a round was non-finite: the global LoRA cannot move."""
    every = cfg.fed.checkpoint_every
    last = (rnd - 1) // every * every if every else 0
    kept = f"its last checkpoint is round {last}" if last else "it has no checkpoint yet"
    return (f"round {rnd}: every client update was non-finite "
            f"(NaN/Inf; clients {', '.join(map(str, sorted(clients)))}), "
            f"so the global LoRA cannot move; the run stops here ({kept}). Lower fed.lr (now {cfg.fed.lr:g}) or "
            "check the data, then run the command again without resume=auto (this attempt is moved to "
            "failed-<time>/ in the run folder; resume=auto would continue it with the same settings)")


def open_run(cfg: Config, comm) -> tuple[RunLog, checkpoint.Checkpoint | None]:
    """The run folder (rank 0 names it, locks it for one job at a time and claims it: the checkpoint to resume from,
    or a failed attempt moved aside, `checkpoint.claim`; every rank gets the name as bytes, or the one-line reason
    the folder cannot be used: RunFolderRefused on every rank) and this rank's log; a FATAL line of this rank also
    goes into its log. Returns (the log, on rank 0 the checkpoint this start continues from, else None)."""
    msg, ck, notes = None, None, []
    if comm.is_server:
        run_dir = run_dir_of(cfg)
        refused = take_lock(run_dir)
        if refused is None:
            try:
                ck, notes = checkpoint.claim(cfg, run_dir)
            except RunFolderRefused as e:
                refused = str(e)
        msg = {"refused": refused.encode()} if refused else {"run_dir": str(run_dir).encode()}
    msg = comm.broadcast_bytes(msg, category="control")
    if "refused" in msg:
        raise RunFolderRefused(msg["refused"].decode())
    log = RunLog(Path(msg["run_dir"].decode()), comm.rank)
    install_abort_hook(lambda text: log.log(text, echo=False))
    PROGRESS["log"] = log
    for line in notes:
        log.log(line)
    if comm.is_server:
        log.log_config(cfg)
        for key in preset_keys_set_by_job(cfg):
            log.log(f"note: the job file {cfg.job} sets {key}; the job file wins over the method preset")
    return log, ck


def run(cfg: Config, comm, inputs: tuple) -> dict | None:
    """Algorithm 2 across ranks; returns the final results on rank 0, {"stopped": round} on every rank after a
    stop request, None on client ranks otherwise. `inputs` = (the clients' rows, their label histogram)."""
    log, ck = open_run(cfg, comm)
    with watching(cfg, comm, log.run_dir):
        return _run(cfg, comm, inputs, log, ck)


@contextmanager
def watching(cfg: Config, comm, run_dir: Path):
    """This rank's heartbeat and its watch of the other ranks' (watchdog.py) for as long as the run lasts."""
    if cfg.fed.stall_timeout <= 0:
        yield
        return
    watch = Watch(run_dir, comm.rank, list(range(comm.size)), cfg.fed.stall_timeout)
    with Heartbeat(run_dir, comm.rank, period_for(cfg.fed.stall_timeout)), \
            Watcher(watch, lambda e: stalled_exit(comm, e)):
        yield


def _run(cfg: Config, comm, inputs: tuple, log: RunLog, ck) -> dict | None:
    """The run once its folder is open (`run`)."""
    seed_all(cfg.seed)
    log.log(f"rank {comm.rank}/{comm.size} on {comm.device()}, {torch.get_num_threads()} torch threads, "
            f"run dir {log.run_dir}")
    rows, hist = inputs
    server, base, files = set_up_server(cfg, comm, log, rows, hist, ck) if comm.is_server else (None, None, None)
    t0 = time.time()  # line 6: send M* ONCE (quantized weights + config + tokenizer); never the full LLM
    files = comm.broadcast_bytes(files, category="model", views=True, idle=True)  # clients: views into one buffer
    if "stopped" in files:  # SIGUSR1 during the base model's evaluation (set_up_server)
        log.close()
        return {"stopped": 0}
    plan, start = Plan.from_dict(json.loads(bytes(files.pop("plan.json")))), json.loads(bytes(files.pop("start.json")))
    if comm.is_server:
        model_bytes = sum(len(v) for v in files.values())
        log.log(f"shipped the sub-LLM ({model_bytes / 2**20:.1f} MiB) to {comm.size - 1} client ranks in "
                f"{time.time() - t0:.1f}s")
        client = None
    else:
        client = Client(cfg, comm.rank, plan, files, rows, comm.device())
        model_bytes = client.model_bytes
        log.log(f"client rank {comm.rank}: {cfg.fed.clients} virtual clients placed per round, sub-LLM "
                f"{plan.sub_layers} layers, {sum(p.numel() for p in client.params)} trainable params")
    del files
    try:  # the client's disk cache goes however the run ends: done, stopped (SIGUSR1, SIGTERM) or failed
        if client:
            client.write_holdings(log.run_dir)
        fed = Federation(cfg, comm, log, server, client, plan, start, model_bytes)
        return fed.run(base)
    finally:
        if client:
            client.close()


class Federation:
    """The rounds of Algorithm 2 (lines 7-21) on every rank: the server's and the clients' halves of each step
    and the collectives between them, in one order that every rank follows."""

    def __init__(self, cfg: Config, comm, log: RunLog, server, client, plan: Plan, start: int, model_bytes: int):
        self.cfg, self.comm, self.log, self.server, self.client = cfg, comm, log, server, client
        self.plan, self.start, self.model_bytes = plan, start, model_bytes
        self.faults = Faults(cfg.debug, comm.rank)
        # schemas, agreed once (rank 0 sleeps in idle_wait, not in a blocking Bcast, while the clients load M*)
        self.em_schema = comm.agree_schema(Schema.of(server.emulator_lora()) if server and plan.emulator_lora_sub
                                           else (Schema((), (), "float32") if server else None), idle=True)
        self.ad_schema = comm.agree_schema(Schema.of(server.global_adapter) if server else None)
        self.strategy = strategy_for(cfg, self.ad_schema)
        self.ledger = Ledger(comm, log, self.strategy, self.ad_schema, self.em_schema, cfg.fed.clients, start + 1)
        self.clock = PhaseClock(comm, comm.device())
        self.t_schema = Schema(("t",), ((len(PHASES) + len(EXTRA),),), "float64")
        self.realign_every = realign_interval(cfg, plan)  # 0: never re-aligns (with oda.trigger=drift: r is unused)
        self.global_state = None  # a client rank's copy of the global adapter LoRA

    def run(self, base: dict | None) -> dict | None:
        self.send_emulator()  # the pre-aligned emulator LoRA
        self.ledger.reset_moved()
        stopped = False
        for rnd in range(self.start + 1, self.cfg.fed.rounds + 1):
            PROGRESS["round"] = rnd
            stopped = self.round(rnd)
            if stopped:
                break
        self.comm.idle_wait()  # every rank leaves the rounds together (rank 0 may still write the checkpoint)
        if stopped:
            if self.client:
                self.log.log(f"stopped: {self.client.cache.describe()}")
            self.log.close()
            return {"stopped": rnd}
        if self.client:
            self.log.log(f"bytes {dict(self.comm.bytes)}; MPI {self.comm.mpi_seconds:.2f}s, "
                         f"idle {self.comm.idle_seconds:.2f}s")
            self.log.log(f"end of the run: {self.client.cache.describe()}")
            self.log.close()
            return {"stopped": self.cfg.fed.rounds} if self.comm.broadcast_flag(None, idle=True) else None
        try:
            result = self.finish(base)
        except StopRequested as e:  # the journals keep the final evaluation's finished batches
            every, rounds = self.cfg.fed.checkpoint_every, self.cfg.fed.rounds
            if not (every and rounds % every == 0):  # resume=auto must start at the last round, not retrain
                self.server.checkpoint(rounds)
            self.log.log(f"stopping on {STOP_REQUESTED[0]} in the final evaluation: {e}; run the same command "
                         "with resume=auto to continue")
            self.log.close()
            result = {"stopped": self.cfg.fed.rounds}
        self.comm.broadcast_flag("stopped" in result, idle=True)  # every rank then exits with the same code
        return result

    def round(self, rnd: int) -> bool:
        """One round; True when a stop was requested (the run ends after it)."""
        self.ledger.start_round()
        self.clock.start_round()
        realigned = self.realign_due(rnd)
        if realigned:  # lines 9-14
            if self.server:
                with self.clock.phase("realign"):
                    self.server.re_align(rnd)
            with self.clock.phase("download"):
                self.send_emulator(idle=True)
        chosen = client_schedule(self.cfg, self.comm.size, rnd)
        where = placement(chosen, self.comm.size)
        self.download(rnd)  # line 7
        self.faults.round_started(rnd)
        uploads = self.train(rnd, chosen, where) if self.client else []  # lines 15-16
        with self.clock.phase("upload"):  # line 17
            counts = [0] + [sum(1 for k in chosen if where[k] == r) for r in self.comm.client_ranks]
            gathered = [self.comm.gatherv([u[i] for u in uploads], schema, counts, category="upload", idle=i == 0)
                        for i, schema in enumerate([*self.strategy.up, FIT])]
        if self.server:  # line 18
            self.aggregate_and_record(rnd, gathered, chosen, where, realigned)
        elif rnd == 1 or realigned:
            self.log.log(f"round {rnd}: {self.client.cache.describe()}")
        self.record_timing(rnd)
        return self.stop_or_checkpoint(rnd)

    def realign_due(self, rnd: int) -> bool:
        """Line 9: whether round `rnd` starts with a re-alignment. oda.trigger=every: every r rounds (every rank knows
        it without a message); oda.trigger=drift: rank 0 decides from the output drift probe
        (`DriftMonitor.realign_due`) and broadcasts the flag, so every rank enters the re-alignment's collectives
        together, or none does (rank 0 may still be writing the previous round's checkpoint: the others sleep)."""
        if not self.realign_every:
            return False
        if self.cfg.oda.trigger == "every":
            return rnd % self.realign_every == 0
        return self.comm.broadcast_flag(self.server.monitor.realign_due(rnd) if self.server else None, idle=True)

    def send_emulator(self, idle: bool = False) -> None:
        """Line 14: broadcast the emulator LoRA (after pre-alignment and after each re-alignment, `idle`: the
        clients sleep while rank 0 re-aligns)."""
        state = self.comm.broadcast(self.server.emulator_lora() if self.server else None, self.em_schema,
                                    category="emulator_lora", idle=idle)
        if self.client and self.em_schema.names:
            self.client.set_emulator(state)

    def download(self, rnd: int) -> None:
        """Line 7: every client rank receives the global adapter LoRA (in the strategy's messages)."""
        first = self.start + 1  # the first round of this process (after a resume, the receivers hold no state)
        with self.clock.phase("download"):
            schemas = self.strategy.download_schemas(rnd, first)
            sent = self.strategy.download(self.server.global_adapter, rnd, first) if self.server else \
                [None] * len(schemas)
            msgs = [self.comm.broadcast(m, s, category="adapter_lora", idle=i == 0)
                    for i, (m, s) in enumerate(zip(sent, schemas))]
            if self.client:
                self.global_state = self.strategy.receive(msgs, self.global_state, rnd, first)

    def train(self, rnd: int, chosen: list[int], where: dict[int, int]) -> list[list[dict]]:
        """Lines 15-16 on a client rank: each client placed here trains from the global adapter LoRA; returns
        their uploads (the strategy's messages, then the `FIT` message), in client order."""
        here = {k for k in chosen if where[k] == self.comm.rank}
        cache0, t0 = self.client.cache.stats(), time.perf_counter()
        self.client.place(here)  # the clients that left spill their emulator cache to disk
        self.clock.add("emulator", time.perf_counter() - t0)
        uploads = []
        for k in sorted(here):
            fit = self.client.fit(k, self.global_state, rnd)
            self.clock.add("emulator", fit.emulator_seconds)
            self.clock.add("adapter", fit.seconds - fit.emulator_seconds)
            self.clock.steps += fit.steps
            t0 = time.perf_counter()
            uploads.append([*self.strategy.pack_upload(fit.state, self.global_state),
                            fit_message(fit.loss, fit.n_samples)])
            self.clock.add("upload", time.perf_counter() - t0)
        self.clock.count_cache(cache0, self.client.cache.stats())
        return uploads

    def aggregate_and_record(self, rnd: int, gathered: list, chosen: list[int], where: dict[int, int],
                             realigned: bool) -> None:
        """Line 18 on rank 0, then the round's row of /rounds (and /drift)."""
        cfg, server, n = self.cfg, self.server, self.cfg.fed.clients
        t0 = time.perf_counter()
        flat = [list(msgs) for parts in zip(*gathered) for msgs in zip(*parts)]
        order = [k for r in self.comm.client_ranks for k in chosen if where[k] == r]
        losses, nk = np.full(n, np.nan, np.float32), np.zeros(n, np.float32)
        updates, weights = [], []
        for k, (*msgs, fit) in zip(order, flat):
            losses[k], nk[k] = fit_values(fit)
            updates.append(self.strategy.unpack_upload(msgs, server.global_adapter))
            weights.append(nk[k])
        new, rejected = self.strategy.aggregate(updates, weights, server.global_adapter, rnd)
        if new is None:
            raise RuntimeError(all_rejected_message(cfg, rnd, order))
        server.set_global(new)
        rejected_mask = np.zeros(n, np.int8)
        for i in rejected:
            rejected_mask[order[i]] = 1
            self.log.log(f"round {rnd}: rejected the update of client {order[i]} (non-finite values)")
        self.clock.add("aggregate", time.perf_counter() - t0)
        acc = np.nan
        if cfg.eval.every and rnd % cfg.eval.every == 0:
            with self.clock.phase("evaluate"):  # on the validation rows: never on the test split
                acc = server.evaluate("full", "val")["accuracy"]
        with self.clock.phase("evaluate"):  # the output drift probe (the next round's line 9 with oda.trigger=drift)
            probe = server.monitor.after_round()
        self.log.append("rounds", {"round": np.int32(rnd), "wall_s": np.float64(self.ledger.round_seconds()),
                                   "train_loss": losses, "n_samples": nk,
                                   **self.ledger.bytes_row(rnd, chosen, realigned),
                                   "realigned": np.int8(realigned), "drift_probe": np.float32(probe),
                                   "drift_ref": np.float32(server.monitor.ref), "eval_acc": np.float32(acc),
                                   "rejected": rejected_mask})
        with self.clock.phase("evaluate"):  # the drift probe: two forwards on one held-out batch
            drift = server.probes.inter()
        if drift.size:  # no L_inter pairs (no SGP groups): nothing to track
            self.log.append("drift", {"round": np.int32(rnd), "distance": drift})
        self.log.flush()
        self.log.log(f"round {rnd}/{cfg.fed.rounds}: loss {np.nanmean(losses):.4f}, {self.ledger.round_seconds():.1f}s"
                     + (", re-aligned" if realigned else "") + ("" if np.isnan(acc) else f", acc {acc:.4f}")
                     + ("" if np.isnan(probe) else f", output drift probe {probe:.4f} (after the last alignment "
                                                     f"{server.monitor.ref:.4f})"))

    def record_timing(self, rnd: int) -> None:
        """Every rank's phase times of this round -> /timing (one float64 row per rank, fixed schema). The ranks
        wait for each other in `idle_wait` before the row is taken, so the row counts that wait as idle."""
        self.comm.idle_wait()
        ranks = self.comm.gatherv([{"t": torch.from_numpy(self.clock.row())}], self.t_schema, [1] * self.comm.size,
                                  category="timing")
        if self.server:
            self.ledger.record_timing(rnd, as_numpy(torch.stack([m[0]["t"] for m in ranks])))

    def stop_or_checkpoint(self, rnd: int) -> bool:
        """A stop request (SIGUSR1 at rank 0, e.g. Slurm's warning before the time limit) ends every rank here,
        after a checkpoint; otherwise a checkpoint every fed.checkpoint_every rounds."""
        stopped = self.comm.broadcast_flag(STOP_REQUESTED[0] if self.server else None)
        every = self.cfg.fed.checkpoint_every
        if self.server and (stopped or (every and rnd % every == 0)):
            path = self.server.checkpoint(rnd)
            if stopped:
                self.log.log(f"stopping after round {rnd} on {STOP_REQUESTED[0]}: checkpoint {path}; "
                             "run the same command with resume=auto to continue")
        return stopped

    def final_val_accuracy(self) -> dict:
        """Validation accuracy of the final model: /rounds/eval_acc of the last round when eval.every divides
        fed.rounds (what a study selects its learning rate on), else NaN (no extra evaluation)."""
        last_round, acc = self.log.last("rounds", "round"), self.log.last("rounds", "eval_acc")
        if self.cfg.data.val_size and last_round is not None and int(last_round) == self.cfg.fed.rounds \
                and np.isfinite(acc):
            return {"accuracy": float(acc), "n": len(self.server.evaluator.val_rows)}
        return {"accuracy": float("nan"), "n": 0}

    def finish(self, base: dict) -> dict:
        """Line 22 + evaluation: the full LLM with the plugged adapter (test and validation), the sub-LLM; /final."""
        cfg, server = self.cfg, self.server
        full = server.evaluate("full", journal="full")
        sub = full if server.sub_is_full else server.evaluate("sub", journal="sub")  # FedPETuning: same answers
        val = self.final_val_accuracy()
        res = {"accuracy": full["accuracy"], "sub_accuracy": sub["accuracy"], "base_accuracy": base["accuracy"],
               **self.ledger.final(self.realign_every, cfg.oda.trigger, self.model_bytes),
               "full_model_bytes": int(server.full_bytes), "val_accuracy": val["accuracy"], "n_val": val["n"],
               "task": task_label(cfg.data), "n_eval": full["n"], "aggregator": cfg.fed.aggregator,
               "upload_density": cfg.fed.upload_density, "download_density": cfg.fed.download_density,
               "eval_s": full["seconds"] + (0.0 if sub is full else sub["seconds"])}  # the final test evaluations
        if "correct" in full:  # GSM8K: which test questions each model answered correctly (paired comparisons)
            res.update(correct=full["correct"], sub_correct=sub["correct"])
        if "pred_counts" in full:  # label tasks: test predictions per class, full model and sub-LLM, and the labels
            res.update(pred_counts=full["pred_counts"], sub_pred_counts=sub["pred_counts"],
                       label_counts=full["label_counts"])
        self.log.set_attrs("final", **res)
        out = server.export_adapter()
        self.log.log(f"bytes moved by rank 0: {dict(self.comm.bytes)}; MPI {self.comm.mpi_seconds:.2f}s, "
                     f"idle {self.comm.idle_seconds:.2f}s")
        print_results(cfg, res, base, sub, full, val, res["comm_bytes_per_round"], self.log.run_dir / "run.h5", out)
        self.log.close()
        return res


def print_results(cfg: Config, res: dict, base: dict, sub: dict, full: dict, val: dict, per_round: float,
                  run_file: Path, adapter: Path) -> None:
    """The final table on stdout."""
    table = [
        ("task / method", f"{task_label(cfg.data)} / {cfg.method}"),
        ("base model accuracy", f"{base['accuracy']:.4f}"),
        ("sub-LLM accuracy", f"{sub['accuracy']:.4f}"),
        ("full LLM + adapter accuracy", f"{full['accuracy']:.4f}  (n={full['n']})"),
        ("... on the validation rows", f"{val['accuracy']:.4f}  (n={val['n']})"),
        ("trainable params per client", f"{res['trainable_params']:,}"),
        ("comm bytes per round per client", f"{per_round / 2**20:.3f} MiB"),
        ("client model bytes", f"{res['client_model_bytes'] / 2**20:.1f} MiB"),
        ("full model bytes", f"{res['full_model_bytes'] / 2**20:.1f} MiB"),
        ("run file", str(run_file)),
        ("adapter (PEFT, full model)", str(adapter)),
    ]
    w = max(len(k) for k, _ in table)
    print("\n".join(["", "fedsoda-mpi final results", "-" * (w + 40)] + [f"{k:<{w}}  {v}" for k, v in table]),
          flush=True)
