"""The run summary: the few-KB record of one study run that `study.summarize` writes as <results>/<run id>.json and
analysis/report.py reads (never the run folder itself).

`RunSummary.from_json` reads every version of the record: a field a summary lacks takes its default (None: not
recorded), so the summaries written before `schema_version` existed (version 0) load as they are. `to_json` writes
the current version; the optional fields `lr_step`, `exit_code` and `reused_from` are written only when set.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

SCHEMA_VERSION = 1
REQUIRED = ("run", "stage", "variant", "method", "task", "seed", "accuracy")  # a file without them is no summary
OPTIONAL = ("lr_step", "exit_code", "reused_from")  # left out of the JSON when None


class SummaryError(ValueError):
    """Not a run summary this code can read; the message is one line."""


def _list():
    return field(default_factory=list)


@dataclass(kw_only=True)
class RunSummary:
    """One run: what ran (study, stage, variant, method, task, model, split, seed, lr, overrides, settings), its
    results (test, sub-LLM, base-model and validation accuracy, per-class and per-question answers), its per-round
    curves, alignment, SGP, communication and timing records. Fields in the order the JSON object lists them."""

    schema_version: int = SCHEMA_VERSION
    study: str = "?"
    run: str
    status: str = "ok"  # ok | failed
    stage: str
    variant: str
    method: str
    task: str
    model: str = "?"
    model_name: str | None = None
    split: str = "?"
    seed: int
    lr: float | None = None
    lr_from: list = _list()
    lr_step: int | None = None  # variants' lr_steps: steps along the 1-3-10 ladder from the selected lr
    overrides: list = _list()
    rounds: int | None = None
    clients: int | None = None
    examples_per_client: int | None = None
    pooled_clients: int | None = None
    settings: dict = field(default_factory=dict)  # study.settings: the settings the tables vary
    eval_rounds_on: str | None = None
    accuracy: float | None
    sub_accuracy: float | None = None
    base_accuracy: float | None = None
    val_accuracy: float | None = None
    n_eval: int | None = None
    n_val: int | None = None
    eval_dtype: str | None = None
    pred_counts: list | None = None  # test predictions per class (label tasks)
    sub_pred_counts: list | None = None
    label_counts: list | None = None
    correct: str | None = None  # per-question answered correctly, stats.bits (GSM8K)
    sub_correct: str | None = None
    base_pred_counts: list | None = None
    base_correct: str | None = None
    eval_rounds: list = _list()
    eval_acc: list = _list()
    train_loss: list = _list()
    realigned: list = _list()  # per round: 1 where the round re-aligned
    realignments: int | None = None
    emulator_lora_bytes: int | None = None
    drift_probe: list = _list()
    rejected_updates: int | None = None
    comm_bytes_per_round: float | None = None
    client_model_bytes: int | None = None
    full_model_bytes: int | None = None
    trainable_params: int | None = None
    kl_before: float | None = None
    kl_after: float | None = None
    kl_on: str = "wikitext2"
    kl_before_self: float | None = None
    kl_after_self: float | None = None
    sgp_groups: list = _list()  # [[t, e]]: the pruned layers t < l <= e
    sgp_candidates: list = _list()  # [[n, p, summed distance or None]]
    public_self: dict = field(default_factory=dict)
    wall_s: float | None = None
    world_size: int | None = None
    eval_s: float | None = None
    base_eval_s: float | None = None
    commit: str = "?"
    finished: str | None = None
    exit_code: int | None = None  # failed runs
    reused_from: str | None = None  # a summary copied from another study's identical run: "<study>/<run id>"

    @classmethod
    def from_json(cls, data, where: str = "summary") -> RunSummary:
        """The record of a parsed summary file of any schema version up to this one (`where` names it in errors);
        keys this version does not know are ignored."""
        if not isinstance(data, dict) or any(k not in data for k in REQUIRED):
            lacking = [k for k in REQUIRED if not isinstance(data, dict) or k not in data]
            raise SummaryError(f"{where}: not a run summary (no {', '.join(lacking)})")
        version = data.get("schema_version", 0)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise SummaryError(f"{where}: schema_version {version!r} is newer than this code's {SCHEMA_VERSION}")
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known}, "schema_version": version})

    def to_json(self) -> dict:
        """The JSON object of this record at the current schema version."""
        out = asdict(self)
        out["schema_version"] = SCHEMA_VERSION
        return {k: v for k, v in out.items() if not (k in OPTIONAL and v is None)}

