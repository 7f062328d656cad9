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
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .config import Config, ConfigError, load_config, validate

USAGE_EXIT = 2


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    ap = argparse.ArgumentParser(prog="fedsoda_mpi.main", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="job YAML (default: jobs/smollm2_sst2_iid.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. fed.rounds=2")
    args = ap.parse_args(argv)
    return args.config, args.overrides


def prepare_config(argv: list[str], world_size: int) -> Config:
    """Load + validate everything that can be checked without a collective (model folder included)."""
    from .server import model_path, num_layers_of

    path, overrides = parse_args(argv)
    cfg = load_config(path, overrides)
    validate(cfg, world_size=world_size)
    try:
        layers = num_layers_of(model_path(cfg.model.name))
    except FileNotFoundError as e:
        raise ConfigError(f"model.name: {e}") from None
    validate(cfg, num_layers=layers)
    if cfg.resume == "auto":
        raise ConfigError("resume=auto: resuming from checkpoints is not implemented yet; start a new run (resume=none)")
    if cfg.output.dir and (Path(cfg.output.dir) / "run.h5").exists():
        raise ConfigError(f"output.dir={cfg.output.dir} already holds a run (run.h5); choose another output.dir "
                          "or remove that folder")
    return cfg


def client_schedule(cfg: Config, world_size: int, rnd: int) -> list[int]:
    """Virtual clients sampled in round `rnd` (the same on every rank: seeded by (seed, round))."""
    n, m = cfg.fed.clients, cfg.fed.clients_per_round or cfg.fed.clients
    if m == n:
        return list(range(n))
    return sorted(np.random.default_rng([cfg.seed, rnd]).choice(n, size=m, replace=False).tolist())


def rank_of(client: int, world_size: int) -> int:
    """Virtual client k lives on client rank 1 + k mod (W - 1)."""
    return 1 + client % (world_size - 1)


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


def run(cfg: Config, comm) -> dict | None:
    """The protocol of Algorithm 2 across ranks; returns the final results on rank 0."""
    from . import data, models
    from .client import EmulatorCache, local_train
    from .comm import Schema
    from .methods import Plan
    from .runlog import RunLog

    # run folder: rank 0 decides the name, everyone gets it (as bytes, never pickled)
    name = {"run_dir": (cfg.output.dir or str(Path(cfg.output.root) / run_name(cfg))).encode()} if comm.is_server else None
    run_dir = Path(comm.broadcast_bytes(name, category="control")["run_dir"].decode())
    log = RunLog(run_dir, comm.rank)
    device = comm.device()
    seed_all(cfg.seed)
    n_threads = torch.get_num_threads()
    log.log(f"rank {comm.rank}/{comm.size} on {device}, {n_threads} torch threads, run dir {run_dir}")

    # clients' data partition: identical on every rank (seeded), each rank tokenizes only its own clients
    rows, hist = data.client_datasets(cfg.data.task, cfg.fed.clients, cfg.data.split, cfg.data.dirichlet_beta,
                                      cfg.seed, cfg.data.max_train_per_client or None)
    server = None
    if comm.is_server:
        from .server import Server

        log.open_h5(cfg, comm.size, cfg.model.name)  # also writes config.yaml
        log.write("data/client_sizes", np.array([len(r) for r in rows], dtype=np.int64))
        log.write("data/client_label_hist", np.asarray(hist, dtype=np.int64))
        server = Server(cfg, log, device)
        base = server.evaluate("full")  # round 0: the base model (LoRA not yet attached)
        log.log(f"base model accuracy ({cfg.data.task}, n={base['n']}): {base['accuracy']:.4f}")
        plan = server.plan_layers()
        server.build(plan)
        server.pre_align()
        files = {"plan.json": json.dumps(plan.to_dict()).encode(), **server.bundle}
        log.flush()
    else:
        files = None

    # Algorithm 2 line 6: send M* ONCE (quantized weights + config + tokenizer); never the full LLM
    comm.idle_wait()
    t0 = time.time()
    files = comm.broadcast_bytes(files, category="model")
    model_bytes = sum(len(v) for k, v in files.items() if k != "plan.json")
    plan = Plan.from_dict(json.loads(files.pop("plan.json")))
    lora_kw = dict(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules))
    if comm.is_server:
        sub = server.sub
        log.log(f"shipped the sub-LLM ({model_bytes / 2**20:.1f} MiB) to {comm.size - 1} client ranks in {time.time() - t0:.1f}s")
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f"fedsoda-client{comm.rank}-"))
        sub, tok = models.load_bundle(files, tmp, str(device))
        data.ensure_pad_token(tok)
        torch.manual_seed(cfg.seed)
        sub = models.add_lora(sub, plan.lora_sub, **lora_kw)
        mine = [k for k in range(cfg.fed.clients) if rank_of(k, comm.size) == comm.rank]
        examples = {k: [data.tokenize_sft(tok, *data.prompt_and_answer(cfg.data.task, r), cfg.data.max_len) for r in rows[k]]
                    for k in mine}
        params = models.set_trainable(sub, plan.adapter_sub)
        cache = EmulatorCache(cfg.fed.emulator_cache)
        log.log(f"client rank {comm.rank}: {len(mine)} virtual clients, sub-LLM {plan.sub_layers} layers, "
                f"{sum(p.numel() for p in params)} trainable params")
        write_holdings(run_dir, comm, sub, params, model_bytes)
    del files

    # schemas, agreed once
    em_schema = comm.agree_schema(Schema.of(server.emulator_lora()) if comm.is_server and plan.emulator_lora_sub else
                                  (Schema((), (), "float32") if comm.is_server else None))
    ad_schema = comm.agree_schema(Schema.of(server.global_adapter) if comm.is_server else None)
    up_schema = Schema(ad_schema.names + ("__loss", "__n_samples"), ad_schema.shapes + ((1,), (1,)), ad_schema.dtype)

    def send_emulator():
        state = comm.broadcast(server.emulator_lora() if comm.is_server else None, em_schema, category="emulator_lora")
        if not comm.is_server and em_schema.names:
            models.load_lora_state(sub, state)
            cache.invalidate()

    send_emulator()  # the pre-aligned emulator LoRA
    realign_every = realign_interval(cfg, plan)
    n = cfg.fed.clients
    for rnd in range(1, cfg.fed.rounds + 1):
        t_round = time.time()
        sent0 = comm.totals()
        realigned = bool(realign_every and rnd % realign_every == 0)
        if realigned:  # Algorithm 2 lines 9-14
            if comm.is_server:
                server.re_align(rnd)
            comm.idle_wait()
            send_emulator()
        chosen = client_schedule(cfg, comm.size, rnd)
        counts = [0] + [sum(1 for k in chosen if rank_of(k, comm.size) == r) for r in comm.client_ranks]
        comm.idle_wait()
        global_state = comm.broadcast(server.global_adapter if comm.is_server else None, ad_schema, category="adapter_lora")
        if cfg.debug.fail_rank == comm.rank and cfg.debug.fail_round == rnd:
            raise RuntimeError(f"debug.fail_rank={comm.rank} debug.fail_round={rnd}: injected failure")
        uploads = []
        if not comm.is_server:
            for k in chosen:
                if rank_of(k, comm.size) != comm.rank:
                    continue
                models.load_lora_state(sub, global_state)
                torch.manual_seed(cfg.seed * 100003 + rnd * 1009 + k)
                loss = local_train(sub, plan, params, examples[k], tok.pad_token_id, cache, k, cfg.fed.local_steps,
                                   cfg.fed.local_epochs, cfg.fed.batch_size, cfg.fed.lr, cfg.fed.mu,
                                   np.random.default_rng([cfg.seed, rnd, k]))
                update = models.lora_state(sub, plan.adapter_sub)
                update["__loss"] = torch.tensor([loss], dtype=torch.float32)
                update["__n_samples"] = torch.tensor([float(len(examples[k]))], dtype=torch.float32)
                uploads.append(update)
        comm.idle_wait()
        gathered = comm.gatherv(uploads, up_schema, counts, category="upload")
        if comm.is_server:
            flat = [u for per_rank in gathered for u in per_rank]
            order = [k for r in comm.client_ranks for k in chosen if rank_of(k, comm.size) == r]
            losses, nk = np.full(n, np.nan, np.float32), np.zeros(n, np.float32)
            updates, weights = [], []
            for k, u in zip(order, flat):
                losses[k], nk[k] = float(u["__loss"]), float(u["__n_samples"])
                updates.append({name: u[name].clone() for name in ad_schema.names})
                weights.append(nk[k])
            rejected = server.aggregate(updates, weights)
            rejected_mask = np.zeros(n, np.int8)
            for i in rejected:
                rejected_mask[order[i]] = 1
                log.log(f"round {rnd}: rejected the update of client {order[i]} (non-finite values)")
            acc = np.nan
            if cfg.eval.every and rnd % cfg.eval.every == 0 and rnd != cfg.fed.rounds:
                acc = server.evaluate("full")["accuracy"]
            sent = comm.totals()["sent"] - sent0["sent"]
            upload = np.zeros(n, np.int64)
            upload[chosen] = up_schema.nbytes
            log.append("rounds", {"round": np.int32(rnd), "wall_s": np.float64(time.time() - t_round), "train_loss": losses,
                                  "n_samples": nk, "upload_bytes": upload,
                                  "download_bytes": np.int64(sent // (comm.size - 1)),
                                  "comm_params": np.int64(ad_schema.numel * 2 + (em_schema.numel if realigned else 0)),
                                  "realigned": np.int8(realigned), "eval_acc": np.float32(acc),
                                  "rejected": rejected_mask})
            drift = server.drift()
            if drift.size:  # no L_inter pairs (no SGP groups): nothing to track
                log.append("drift", {"round": np.int32(rnd), "distance": drift})
            if cfg.fed.checkpoint_every and rnd % cfg.fed.checkpoint_every == 0:
                server.checkpoint(rnd)
            log.flush()
            log.log(f"round {rnd}/{cfg.fed.rounds}: loss {np.nanmean(losses):.4f}, {time.time() - t_round:.1f}s"
                    + (", re-aligned" if realigned else "") + ("" if np.isnan(acc) else f", acc {acc:.4f}"))
        elif rnd == 1 or realigned:
            log.log(f"round {rnd}: emulator cache {cache.hits} hits / {cache.misses} misses")
    comm.idle_wait()
    if not comm.is_server:
        log.log(f"bytes {dict(comm.bytes)}; MPI {comm.mpi_seconds:.2f}s, idle {comm.idle_seconds:.2f}s")
        log.close()
        comm.idle_wait()
        return None
    result = finish(cfg, comm, server, log, base, model_bytes, ad_schema, em_schema)
    comm.idle_wait()
    return result


def finish(cfg: Config, comm, server, log, base: dict, model_bytes: int, ad_schema, em_schema) -> dict:
    """Algorithm 2 line 22 + evaluation: full LLM with the plugged adapter, the sub-LLM, final table."""
    full = server.evaluate("full")
    sub = server.evaluate("sub")
    plan = server.plan
    realign_every = realign_interval(cfg, plan)
    per_round = 2 * ad_schema.nbytes + (em_schema.nbytes / realign_every if realign_every else 0)
    lora_bytes = ad_schema.nbytes + em_schema.nbytes
    res = {"accuracy": full["accuracy"], "sub_accuracy": sub["accuracy"], "base_accuracy": base["accuracy"],
           "trainable_params": ad_schema.numel,
           "comm_params_per_round": int(2 * ad_schema.numel + (em_schema.numel / realign_every if realign_every else 0)),
           "comm_bytes_per_round": float(per_round), "client_model_bytes": int(model_bytes + lora_bytes),
           "full_model_bytes": int(server.full_bytes),
           "task": cfg.data.task, "n_eval": full["n"]}
    log.set_attrs("final", **res)
    out = server.export_adapter()
    log.log(f"bytes moved by rank 0: {dict(comm.bytes)}; MPI {comm.mpi_seconds:.2f}s, idle {comm.idle_seconds:.2f}s")
    table = [
        ("task / method", f"{cfg.data.task} / {cfg.method}"),
        ("base model accuracy", f"{base['accuracy']:.4f}"),
        ("sub-LLM accuracy", f"{sub['accuracy']:.4f}"),
        ("full LLM + adapter accuracy", f"{full['accuracy']:.4f}  (n={full['n']})"),
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
    try:
        cfg = prepare_config(argv, size)
    except ConfigError as e:
        if rank == 0:
            print(f"fedsoda-mpi: config error: {e}", file=sys.stderr, flush=True)
        return USAGE_EXIT
    from .comm import Comm, install_abort_hook

    install_abort_hook()
    comm = Comm()
    torch.set_num_threads(threads_for(comm))
    run(cfg, comm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
