"""A study's run summaries: the few-KB record of a finished run that the report reads (`summarize`, from the run
file), the record of a failed one, and reading a results folder's records back."""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .stats import bits
from .study_expand import GRID, Run, StudyError
from .summary import RunSummary


def write_json(path: Path, obj: dict) -> None:
    """Write atomically through a temporary file of its own (concurrent writers never share one)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _r(x, digits: int = 6):
    """A JSON-safe rounded float (None for NaN)."""
    x = float(x)
    return None if math.isnan(x) else round(x, digits)


def summaries(results: Path) -> dict[str, dict]:
    """Every run summary in `results` by run id."""
    out = {}
    for p in sorted(Path(results).glob("*.json")):
        if p.name != "selection.json":
            try:
                out[p.stem] = json.loads(p.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise StudyError(f"{p}: not a run summary ({e}); delete it to run that run again") from None
    return out


def summarize(run: Run, run_dir: Path, lr: float, study: str) -> dict:
    """The few-KB record of a finished run that the report reads (never the run folder itself)."""
    import h5py

    with h5py.File(Path(run_dir) / "run.h5", "r") as f:
        if "final" not in f:
            raise StudyError(f"{run_dir}/run.h5 has no /final: the run did not finish")
        fin, rounds = dict(f["final"].attrs), f["rounds"]
        cfg = json.loads(f.attrs["config_json"])
        if not math.isclose(float(cfg["fed"]["lr"]), lr, rel_tol=1e-9):
            raise StudyError(f"{run_dir} ran at fed.lr={cfg['fed']['lr']:g}, not at the lr {lr:g} it is summarized for")
        pre = dict(f["oda/pre"].attrs) if "oda/pre" in f else {}
        base = dict(f["base"].attrs) if "base" in f else {}
        sgp = dict(f["sgp"].attrs) if "sgp" in f else {}
        public = dict(f["public"].attrs) if "public" in f else {}
        timing = dict(f["timing"].attrs) if "timing" in f else {}
        out = {"study": study, "run": run.id, "status": "ok", "stage": run.stage, "variant": run.variant,
               "method": run.method,
               "task": run.task, "model": run.model, "model_name": cfg["model"]["name"], "split": run.split,
               "seed": run.seed, "lr": lr, "lr_from": list(run.key),
               **({"lr_step": run.lr_step} if run.lr_step is not None else {}), "overrides": list(run.overrides),
               "rounds": int(cfg["fed"]["rounds"]), "clients": int(cfg["fed"]["clients"]),
               "examples_per_client": int(cfg["data"]["max_train_per_client"]),
               "pooled_clients": int(cfg["data"].get("pooled_clients", 0)), "settings": settings(cfg, sgp),
               "eval_rounds_on": "val" if cfg["data"].get("val_size") else "test",
               "accuracy": _r(fin["accuracy"]), "sub_accuracy": _r(fin["sub_accuracy"]),
               "base_accuracy": _r(base.get("accuracy", float("nan"))), "val_accuracy": _r(fin["val_accuracy"]),
               "n_eval": int(fin["n_eval"]), "n_val": int(fin["n_val"]), "eval_dtype": cfg["eval"]["dtype"],
               **{k: counts(fin.get(k)) for k in ("pred_counts", "sub_pred_counts", "label_counts")},
               **{k: bits(fin.get(k)) for k in ("correct", "sub_correct")},
               "base_pred_counts": counts(base.get("pred_counts")), "base_correct": bits(base.get("correct")),
               "eval_rounds": [int(x) for x in rounds["round"][:]],
               "eval_acc": [_r(x) for x in rounds["eval_acc"][:]],
               "train_loss": [_r(np.nanmean(x)) if np.isfinite(x).any() else None for x in rounds["train_loss"][:]],
               "realigned": [int(x) for x in rounds["realigned"][:]],
               "realignments": int(np.sum(rounds["realigned"][:])),
               "emulator_lora_bytes": int(fin["emulator_lora_bytes"]) if "emulator_lora_bytes" in fin else None,
               "drift_probe": [_r(x) for x in rounds["drift_probe"][:]] if "drift_probe" in rounds else [],
               "rejected_updates": int(rounds["rejected"][:].sum()) if "rejected" in rounds else 0,
               "comm_bytes_per_round": _r(fin["comm_bytes_per_round"], 1),
               "client_model_bytes": int(fin["client_model_bytes"]), "full_model_bytes": int(fin["full_model_bytes"]),
               "trainable_params": int(fin["trainable_params"]),
               "kl_before": _r(pre.get("kl_before", float("nan"))), "kl_after": _r(pre.get("kl_after", float("nan"))),
               "kl_on": str(pre.get("kl_on", cfg["data"]["public"])),
               "kl_before_self": _r(pre.get("kl_before_self", float("nan"))),
               "kl_after_self": _r(pre.get("kl_after_self", float("nan"))),
               "sgp_groups": f["sgp/groups"][:].tolist() if "sgp/groups" in f else [],
               "sgp_candidates": candidates(f["sgp/candidates"][:]) if "sgp/candidates" in f else [],
               "public_self": self_public(public),
               "wall_s": _r(float(np.sum(rounds["wall_s"][:])), 1), "world_size": int(f.attrs["world_size"]),
               "eval_s": _r(fin["eval_s"], 1) if "eval_s" in fin else None,
               "base_eval_s": _r(timing["base_eval_s"], 1) if "base_eval_s" in timing else None,
               "commit": str(f.attrs["git_commit"]),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((Path(run_dir) / "run.h5").stat().st_mtime))}
    return RunSummary(**out).to_json()


def failed_summary(run: Run, lr: float, study: str, code: int) -> dict:
    """The record of a run that ended without /final: selection ranks it last, the report lists it."""
    return RunSummary(study=study, run=run.id, status="failed", exit_code=code, stage=run.stage,
                      variant=run.variant if run.stage != GRID else "", method=run.method, task=run.task,
                      model=run.model, split=run.split, seed=run.seed, lr=lr, lr_from=list(run.key),
                      lr_step=run.lr_step, overrides=list(run.overrides), accuracy=None, val_accuracy=None,
                      finished=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())).to_json()


def counts(x) -> list[int] | None:
    """A /final per-class count attribute (test predictions or labels) as a list; None where the run has none
    (GSM8K, or a run from before it was recorded)."""
    return None if x is None else [int(v) for v in np.atleast_1d(x)]


def candidates(rows) -> list[list]:
    """/sgp/candidates [C, 3] as [[n, p, summed distance (None: no placement under sgp.max_distance)]]."""
    return [[int(n), int(p), _r(c) if math.isfinite(c) else None] for n, p, c in rows]


def self_public(attrs: dict) -> dict:
    """The /public attributes of a data.public=self run (its generation settings and time); {} otherwise."""
    if attrs.get("mode") != "self":
        return {}
    keys = ("temperature", "max_new_tokens", "batch_size", "seed", "n_public", "n_heldout", "generate_s", "sha256")
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items() if k in keys}


def settings(cfg: dict, sgp: dict | None = None) -> dict:
    """The settings the tables vary, as fields (the job defaults included, not only the overrides). sgp_n and sgp_p
    are the (n, p) the run pruned with (the /sgp attributes `sgp`: sgp.auto and sgp.max_distance choose them),
    the config's values where SGP did not run (uniform drop, no pruning) or the run file predates them."""
    sgp, s = sgp or {}, cfg["sgp"]
    return {"sgp_n": int(sgp.get("n", s["n"])), "sgp_p": int(sgp.get("p", s["p"])), "sgp_enabled": s["enabled"],
            "sgp_auto": bool(s.get("auto", False)), "sgp_remove_layers": int(s.get("remove_layers", 0)),
            "sgp_max_distance": float(s.get("max_distance", 0.0)),
            "adapter_layers": cfg["model"]["adapter_layers"], "adapter_first": cfg["model"]["adapter_first"],
            "pre_align": cfg["oda"]["pre_align"], "pre_epochs": cfg["oda"]["pre_epochs"],
            "re_align": cfg["oda"]["re_align"], "realign_every": cfg["oda"]["every"],
            "trigger": cfg["oda"].get("trigger", "every"), "drift_threshold": cfg["oda"].get("drift_threshold"),
            "max_interval": cfg["oda"].get("max_interval", 0), "quant": cfg["quant"]["enabled"],
            "mu": cfg["fed"]["mu"], "aggregator": cfg["fed"]["aggregator"], "local_epochs": cfg["fed"]["local_epochs"],
            "local_steps": cfg["fed"]["local_steps"], "batch_size": cfg["fed"]["batch_size"],
            "public": cfg["data"]["public"], "val_size": cfg["data"].get("val_size", 0)}
