"""Rank 0's start of a run, before any collective of the rounds: Algorithm 2 lines 1-5 (the base model's accuracy,
SGP, the sub-LLM M*, pre-alignment; each phase timed into /timing) on a fresh start, or the state of a checkpoint on
a resume; what it returns is shipped by federation.py (line 6)."""
from __future__ import annotations

import json
import time

import numpy as np

from . import checkpoint
from .config import Config
from .methods import Plan
from .runlog import RunLog
from .signals import STOP_REQUESTED, StopRequested
from .tasks import task_label


def record_devices(cfg: Config, assignment, log: RunLog) -> None:
    """Rank 0: every rank's device (device=auto|cuda|cpu, devices.py) into the log and /devices of run.h5; a
    shared GPU is a WARNING line."""
    import h5py

    log.log(f"device={cfg.device}: " + "; ".join(assignment.table()))
    for line in assignment.warnings:
        log.log(f"WARNING: {line}")
    attrs = {k: np.array(v, dtype=h5py.string_dtype()) if isinstance(v[0], str) else np.array(v, dtype=np.int32)
             for k, v in assignment.attrs().items()}
    log.set_attrs("devices", setting=cfg.device, deterministic=cfg.debug.deterministic, **attrs)


def set_up_server(cfg: Config, comm, log: RunLog, rows: list, hist, ck: checkpoint.Checkpoint | None) -> tuple:
    """Algorithm 2 lines 1-5 on rank 0, or the state of checkpoint `ck` (resume=auto, `checkpoint.claim`).
    Returns (server, base accuracy, files to ship: M* + the plan + the first round)."""
    from .server import Server

    if ck is not None:
        checkpoint.resume_point(log.run_dir, ck)
    log.open_h5(cfg, comm.size, cfg.model.name, mode="a" if ck else "w")  # also writes config.yaml
    record_devices(cfg, comm.assignment, log)
    server = Server.load(cfg, log, comm.device())
    if ck is None:
        server.evaluator.record_data([len(r) for r in rows], hist)
        server.evaluator.record_truncation(rows, server.texts.pool + server.texts.held_texts)
        try:
            base, start = fresh_start(cfg, server, log), 0
        except StopRequested as e:  # the journal keeps the base evaluation's finished batches
            log.log(f"stopping on {STOP_REQUESTED[0]} before round 1: {e}; run the same command with resume=auto "
                    "to continue")
            return None, None, {"stopped": b"1"}  # (broadcast_bytes sends no empty value)
    else:
        base, start = log.attrs("base"), ck.round
        server.build(Plan.from_dict(ck.state["plan"]))
        server.restore(ck)
        log.set_attrs("/", resumed_from=np.append(log.attrs("/").get("resumed_from", []), start).astype(np.int32))
        log.log(f"resumed from {ck.path} (round {start} of {cfg.fed.rounds}); SGP and pre-alignment not repeated")
    files = {"plan.json": json.dumps(server.plan.to_dict()).encode(), "start.json": json.dumps(start).encode(),
             **server.release_bundle()}
    log.flush()
    return server, base, files


def fresh_start(cfg: Config, server, log: RunLog) -> dict:
    """Lines 1-5: the base model's accuracy (round 0), SGP, the sub-LLM, pre-alignment; each phase timed."""
    setup, base = {}, {"accuracy": float("nan"), "n": 0}  # eval.base=false: a study evaluates it once per task
    if cfg.eval.base:
        base = server.evaluate("full", journal="base")  # the LoRA is not attached yet
        setup["base_eval_s"] = base["seconds"]  # GSM8K: with the earlier attempts' batches from its journal
        log.log(f"base model accuracy ({task_label(cfg.data)}, n={base['n']}): {base['accuracy']:.4f}")
    counted = {"pred_counts": base["pred_counts"]} if "pred_counts" in base else {}  # label tasks: per class
    if "correct" in base:  # GSM8K: which test questions the base model answered right (paired comparisons)
        counted["correct"] = base["correct"]
    log.set_attrs("base", accuracy=base["accuracy"], n=base["n"], **counted)
    with _stopwatch(setup, "sgp_s"):
        plan = server.plan_layers()
    with _stopwatch(setup, "build_s"):
        server.build(plan)
    with _stopwatch(setup, "pre_align_s"):
        server.pre_align()
        server.monitor.mark_aligned(0)  # the output drift probe's reference until the first re-alignment
    log.set_attrs("rounds", drift_probe_0=server.monitor.ref)
    log.set_attrs("timing", **setup)  # one-time server phases (the per-round ones are /timing/phase_s)
    return base


class _stopwatch:
    """out[key] = wall seconds of the block."""

    def __init__(self, out: dict, key: str):
        self.out, self.key = out, key

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.out[self.key] = time.perf_counter() - self.t0
