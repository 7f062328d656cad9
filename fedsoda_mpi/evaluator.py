"""The server's evaluation of a model on the task (`evaluate.evaluate`): which rows (the fixed validation rows held
out of the training file, or the test split), GSM8K's shots, the journal and progress lines of a long evaluation,
and the records of the split (/data) and of what the run's limits cut (/truncated)."""
from __future__ import annotations

import time

import numpy as np
import torch

from . import data, lengths
from .config import Config
from .evaluate import evaluate
from .runlog import RunLog
from .signals import STOP_REQUESTED, StopRequested
from .tasks import is_generation, task_id, task_label


class Evaluator:
    """The task's evaluation rows on the server: `val_rows` (data.val_size rows of the training file that no client
    trains on) and the test split; `shot_rows` (GSM8K: the training rows its k shots come from)."""

    def __init__(self, cfg: Config, log: RunLog, tok, device: torch.device):
        self.cfg, self.log, self.tok, self.device = cfg, log, tok, device
        task = task_id(cfg.data)
        rows = data.load_rows(task, "train")
        self.n_train_file = len(rows)
        self.val_index = data.validation_index(rows, task, cfg.data.val_size) if cfg.data.val_size else \
            np.zeros(0, dtype=np.int64)  # /data/val_index (record_data)
        train, self.val_rows = data.split_train_val(rows, task, cfg.data.val_size)
        self.shot_rows = train if is_generation(task) else None  # GSM8K's k shots never show a validation row

    def evaluate(self, model, split: str = "test", journal: str = "") -> dict:
        """Accuracy of `model` on the test split (its first eval.max_examples rows, 0 = all) or on the held-out
        validation rows (all of them; the test split when data.val_size = 0), with the "seconds" it took. `journal`
        names a GSM8K evaluation kept batch by batch in run_dir/eval/<name>.jsonl (resumable after a kill; progress
        in the log; SIGUSR1 stops it between two batches: `StopRequested`)."""
        c = self.cfg.eval
        if split == "val" and self.val_rows:
            rows, limit = self.val_rows, None
        else:
            rows, limit = None, c.max_examples or None
        kept = {"journal": self.log.run_dir / "eval" / f"{journal}.jsonl", "progress": self.progress(journal)} \
            if journal else {}
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.dtype == "bfloat16"):
            res = evaluate(model, self.tok, task_id(self.cfg.data), max_examples=limit, batch_size=c.batch_size,
                           k_shot=c.k_shot, max_new_tokens=c.max_new_tokens, seed=self.cfg.seed, rows=rows,
                           shot_rows=self.shot_rows, max_len=c.max_len, **kept)
        return {"seconds": time.perf_counter() - t0, **res}  # GSM8K's own counts its journal's earlier attempts

    def progress(self, name: str, every_s: float = 60.0):
        """The progress callback of a journaled evaluation: a log line after the first batch, then at most every
        `every_s` seconds (and at the end) with the rows done, the rate and the time left, after one line on what
        its journal already held; GSM8K's raises StopRequested once SIGUSR1 has come (its journal keeps the batches
        done; a label task's evaluation, minutes, runs to its end)."""
        t0, last = time.time(), [None]
        gsm8k = is_generation(task_id(self.cfg.data))  # GSM8K or a custom generation task
        unit, verb = ("questions", "generated question") if gsm8k else ("rows", "row")

        def progress(done: int, total: int, generated: int) -> None:
            now = time.time()
            if generated or done == total:  # the journal's batches come first: now all of them are counted
                if last[0] is None and done > generated:
                    self.log.log(f"eval {name}: {done - generated} of {total} questions taken from its journal "
                                 f"{self.log.run_dir / 'eval' / (name + '.jsonl')}")
                if last[0] is None or done == total or now - last[0] >= every_s:
                    rate = (now - t0) / max(generated, 1)
                    self.log.log(f"eval {name}: {done}/{total} {unit}, {rate:.{1 if gsm8k else 3}f} s per {verb}, "
                                 f"about {rate * (total - done) / 60:.0f} min left")
                    last[0] = now
            if gsm8k and STOP_REQUESTED[0] and done < total:
                raise StopRequested(f"eval {name} stopped at {done}/{total} questions (kept in its journal)")

        return progress

    def record_data(self, sizes: list[int], label_hist) -> None:
        """/data: the clients' sizes and label histograms, which training rows are the fixed validation set
        (indices into <task>/train.jsonl), the split."""
        cfg, log = self.cfg, self.log
        log.write("data/client_sizes", np.array(sizes, dtype=np.int64))
        log.write("data/client_label_hist", np.asarray(label_hist, dtype=np.int64))
        log.write("data/val_index", self.val_index.astype(np.int64))
        log.set_attrs("data", task=task_label(cfg.data), val_size=cfg.data.val_size, val_seed=data.VAL_SEED,
                      n_train_file=self.n_train_file, val_min_words=data.VAL_MIN_WORDS.get(task_id(cfg.data), 0),
                      split=cfg.data.split, dirichlet_beta=cfg.data.dirichlet_beta,
                      eval_rounds_on="val" if cfg.data.val_size else "test", test_max_examples=cfg.eval.max_examples)

    def record_truncation(self, rows: list[list[dict]], public: list[str]) -> None:
        """/truncated: how many training rows (the clients' `rows`) this run cuts to data.max_len, validation and
        test rows and GSM8K shots to eval.max_len, the `public` texts to data.public_max_len
        (`lengths.truncation_counts`), logged in one line."""
        c = self.cfg
        task = task_id(c.data)
        test = data.load_rows(task, "test")[:c.eval.max_examples or None]
        shots = data.gsm8k_shots(self.shot_rows, c.eval.k_shot, c.seed) if is_generation(task) else []
        limits = {"max_len": c.data.max_len, "eval_max_len": c.eval.max_len, "public_max_len": c.data.public_max_len}
        counts = lengths.truncation_counts(self.tok, task, limits, [r for part in rows for r in part],
                                           self.val_rows, test, shots, public)
        self.log.set_attrs("truncated", **limits, **counts)
        self.log.log(lengths.truncation_line(counts, limits))
