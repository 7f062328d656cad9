"""Task data (GSM8K, SST-2, BoolQ, a custom task: fedsoda_mpi/tasks.py), the public pool (WikiText-2; GSM8K train
for the Fig. 4 ablation; or text the full LLM generates itself, data.public=self), LLM-Adapters (Alpaca) prompts,
SFT tokenization, and IID / Dirichlet label-skew client partitions (paper Sec. 5.1: "IID and non-IID (Dirichlet)
data distributions across clients").

Files live in `data_dir()` with the layout of `shared/data` (see `python -m fedsoda_mpi.prepare data`); a custom
task's in its own folder (`tasks.custom_folder`, docs/datasets.md).
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from . import tasks
from .config import TASKS
from .tasks import (ANSWER_LEAD, FIX, LABEL_WORDS, TEMPLATE, DataError, check_row, data_dir,  # noqa: F401 (re-exported)
                    gsm8k_final_number)

N_CLASSES = {"sst2": 2, "boolq": 2, "gsm8k": 4}  # built-in tasks; any task: tasks.n_classes
CUSTOM_FIX = ("fix the rows (docs/datasets.md), or write the folder again with "
              "`python -m fedsoda_mpi.prepare data --custom`")
PUBLIC_MIN_WORDS = 16
HOLDOUT_FRACTION = 0.1
PUBLIC_MIN_TEXTS = 10  # a public file gives at least this many texts: its last tenth (>= 1) is held out
IGNORE = -100
VAL_SEED = 2508  # fixed, independent of the run's seed: every run of a task holds out the same validation rows


def _data_file(rel: str) -> Path:
    path = data_dir() / rel
    if not path.is_file():
        raise DataError(f"missing data file {path}; {FIX}")
    return path


def split_file(task: str, split: str) -> Path:
    """The path of `<task>/<split>.jsonl` (a custom task: in its folder, `tasks.custom_folder`)."""
    if tasks.is_custom(task):
        return tasks.custom_folder(task[len(tasks.CUSTOM):]) / f"{split}.jsonl"
    return data_dir() / f"{task}/{split}.jsonl"


def _read_text(path: Path) -> str:
    """The whole UTF-8 text of a data file; DataError naming file:line for a non-UTF-8 byte."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); {FIX}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line, column = raw.count(b"\n", 0, e.start) + 1, e.start - raw.rfind(b"\n", 0, e.start)
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); "
                        f"{FIX}") from None


def load_rows(task: str, split: str) -> list[dict]:
    """All rows of `<task>/<split>.jsonl` (split "train" or "test"; a custom task's in its folder), validated field
    by field; a file without rows, a non-UTF-8 byte or bad rows raise DataError: one line naming the file, the
    first bad line and its problem, and how many other lines are bad."""
    if (task not in TASKS and not tasks.is_custom(task)) or split not in ("train", "test"):
        raise ValueError(f"unknown task/split {task}/{split}; tasks: {TASKS} or custom:<name>, splits: train, test")
    fix = FIX
    if tasks.is_custom(task):
        tasks.spec(task)  # its task.json first: the rows are checked against it
        fix = CUSTOM_FIX
    path = split_file(task, split)
    if not path.is_file():
        raise DataError(f"missing data file {path}; {fix}")
    rows, problems = [], []
    for lineno, line in enumerate(io.StringIO(_read_text(path), newline=None), 1):  # newlines as open() reads them
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{lineno}: bad JSON ({exc.msg})")
            continue
        problem = check_row(task, row)
        if problem:
            problems.append(f"{path}:{lineno}: {problem}")
        rows.append(row)
    if problems:
        more = f" (and {len(problems) - 1} more bad lines)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; {fix}")
    if not rows:
        raise DataError(f"{path}: is empty (no rows); {fix}")
    return rows


def _holdout_slice(items: list, holdout: bool) -> list:
    cut = len(items) - int(round(HOLDOUT_FRACTION * len(items)))
    return items[cut:] if holdout else items[:cut]


def load_public(name: str = "wikitext2", holdout: bool = False) -> list[str]:
    """The public dataset D_public used by SGP (Eq. 3) and ODA (Eqs. 5-6), as a list of texts.

    wikitext2: non-empty paragraphs of wikitext2/test.txt, skipping headings (" = ... =") and lines of
    fewer than PUBLIC_MIN_WORDS words. gsm8k: GSM8K TRAIN question+answer pairs in the task template
    (the Fig. 4 ablation; evaluation uses the test split, so the two never overlap).
    The last 10% are held out: holdout=True returns only them (perplexity/KL text), False the first 90%
    (pruning/alignment text), so the two never overlap.
    """
    if name == "wikitext2":
        path = _data_file("wikitext2/test.txt")
        texts = [ln.strip() for ln in _read_text(path).splitlines()
                 if not ln.lstrip().startswith("=") and len(ln.split()) >= PUBLIC_MIN_WORDS]
    elif name == "gsm8k":
        texts = ["".join(prompt_and_answer("gsm8k", row)) for row in load_rows("gsm8k", "train")]
    elif name == "self":
        raise ValueError("data.public=self has no file: the server generates it (Server.public_texts)")
    else:
        raise ValueError(f"unknown public dataset {name!r}; use wikitext2 or gsm8k")
    if len(texts) < PUBLIC_MIN_TEXTS:
        what = (f"wikitext2/test.txt gives {len(texts)} paragraphs of >= {PUBLIC_MIN_WORDS} words (headings "
                "skipped)" if name == "wikitext2" else f"gsm8k/train.jsonl gives {len(texts)} rows")
        raise DataError(f"public dataset {name}: {data_dir()}/{what}; need at least {PUBLIC_MIN_TEXTS} (the last "
                        f"tenth is held out for KL(M || M*) and the drift probe); {FIX}")
    return _holdout_slice(texts, holdout)


# ---- data.public=self: D_public sampled from the full LLM itself ------------------------------------------------

SELF_FILE = "public_self.jsonl"  # in the run folder: generated once, reused on resume
SELF_HELDOUT = 16  # generated texts after the data.public_samples ones, held out for KL(M || M*) on generated text
SELF_STREAM = 770077  # numpy SeedSequence([seed, SELF_STREAM, batch]) seeds the sampling of each generate() batch
# Generic, topic-free English openers, cycled over the samples. Starting from BOS alone makes an instruct model
# open every sample alike (its chat-style first tokens; SmolLM2's tokenizer adds no BOS at all); LLM-QAT's random
# first token depends on the vocabulary. A tiny fixed set spreads the samples over topics as WikiText's prose
# does, and the draw stays a function of (seed, settings) alone.
SELF_PROMPTS = ("The", "In", "A", "It was", "Many people", "The first", "According to", "One of the", "There are",
                "When the", "This is", "In the early", "Scientists", "The city of", "After the", "Although")


def self_public_prompts(count: int) -> list[str]:
    """The prompt of each of `count` generated texts: SELF_PROMPTS cycled."""
    return [SELF_PROMPTS[i % len(SELF_PROMPTS)] for i in range(count)]


def _batch_seed(seed: int, batch: int) -> int:
    """The torch seed of generate() batch `batch` (independent of every other stream of the run)."""
    return int(np.random.SeedSequence([seed, SELF_STREAM, batch]).generate_state(1)[0])


@torch.no_grad()
def generate_public(model, tokenizer, count: int, max_new_tokens: int, temperature: float, seed: int,
                    batch_size: int, progress=None) -> list[dict]:
    """data.public=self: `count` texts sampled from `model`, each a generic prompt (`self_public_prompts`) plus up
    to `max_new_tokens` tokens drawn at `temperature` (no top-k / top-p), cut at the first eos.

    Batched generate() of `batch_size` left-padded prompts in eval mode; batch b is seeded by (seed, b) inside
    a forked torch RNG, so the texts depend only on (model, tokenizer, settings, seed) and the run's own random
    streams are untouched (a cached file and a fresh generation leave the run identical). `progress(done, total)`
    is called after each batch. Returns [{"prompt", "text"}] with text = prompt + continuation."""
    from . import models

    ensure_pad_token(tokenizer)
    prompts = self_public_prompts(count)
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id, *_as_list(model.generation_config.eos_token_id)} - {None}
    device = next(model.parameters()).device
    rows: list[dict] = []
    with models.mode(model):
        for b, start in enumerate(range(0, count, batch_size)):
            chunk = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts[start:start + batch_size]]
            ids, mask = _left_pad(chunk, tokenizer.pad_token_id)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # CUDA's stream too
                torch.manual_seed(_batch_seed(seed, b))
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                     temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos))
            for prompt, p_ids, new in zip(prompts[start:], chunk, out[:, ids.shape[1]:].tolist()):
                end = next((j for j, t in enumerate(new) if t in eos), len(new))
                rows.append({"prompt": prompt, "text": tokenizer.decode(p_ids + new[:end], skip_special_tokens=True)})
            if progress is not None:
                progress(len(rows), count)
    return rows


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask) of token-id lists (generation continues from the right end)."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(seqs):
        ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x):] = 1
    return ids, mask


def write_self_public(path: Path, rows: list[dict], n_public: int) -> None:
    """The generated texts as JSON lines {"i", "split" (public | heldout), "prompt", "text"}, written atomically."""
    lines = [json.dumps({"i": i, "split": "public" if i < n_public else "heldout", **r}, ensure_ascii=False)
             for i, r in enumerate(rows)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_self_public(path: Path, n_public: int, n_heldout: int = SELF_HELDOUT) -> tuple[list[str], list[str]]:
    """(public texts, held-out texts) of a file `write_self_public` wrote; DataError naming the file when it is
    damaged or holds another number of texts (a run is resumed with its own settings, so it never should)."""
    fix = "restore it, or start the run over without resume=auto (a new attempt generates the texts again)"
    rows = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: bad JSON ({e.msg}); {fix}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or row.get("i") != lineno - 1:
            raise DataError(f"{path}:{lineno}: not a generated-text row (i, split, prompt, text); {fix}")
        rows.append(row)
    if len(rows) != n_public + n_heldout or any((r["split"] == "public") != (r["i"] < n_public) for r in rows):
        raise DataError(f"{path}: holds {len(rows)} texts, expected {n_public} public + {n_heldout} held out "
                        f"(data.public_samples={n_public}); {fix}")
    texts = [r["text"] for r in rows]
    return texts[:n_public], texts[n_public:]


def _clean_gsm8k(answer: str) -> str:
    """Drop GSM8K calculator annotations `<<48/2=24>>` (tool markup, not reasoning text)."""
    return re.sub(r"<<[^>]*>>", "", answer)


def prompt_and_answer(task: str, row: dict) -> tuple[str, str]:
    """LLM-Adapters (Alpaca) prompt and target answer for one row.

    SST-2 / BoolQ: the prompt ends with "the correct answer is" and the answer is the label word with a
    leading space (" positive", " true"), so label-word likelihood compares next-token log-probs right
    after the prompt. BoolQ is question-only, as in LLM-Adapters. GSM8K: the prompt is the template of
    the question and the answer the chain of thought ending "#### N" (calculator annotations removed).
    """
    if tasks.is_custom(task):
        return tasks.custom_prompt_and_answer(task, row)
    if task == "sst2":
        instruction = (f"Please classify the sentiment of the following sentence as positive or negative, "
                       f"sentence: {row['sentence'].strip()}\n\nAnswer format: positive/negative")
    elif task == "boolq":
        instruction = (f"Please answer the following question with true or false, "
                       f"question: {row['question'].strip().rstrip('?')}?\n\nAnswer format: true/false")
    elif task == "gsm8k":
        return TEMPLATE.format(instruction=row["question"].strip()), _clean_gsm8k(row["answer"]).strip()
    else:
        raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")
    return TEMPLATE.format(instruction=instruction) + ANSWER_LEAD, " " + LABEL_WORDS[task][label_of(task, row)]


def gsm8k_steps(answer: str) -> int:
    """Number of solution lines before the '#### N' line."""
    return len(answer.split("####")[0].strip().splitlines())


def label_of(task: str, row: dict) -> int:
    """Class used for Dirichlet label skew: SST-2 label; BoolQ int(answer); GSM8K the number of solution
    steps bucketed into 4 roughly balanced classes (<=2, 3, 4, >=5 lines: 1960/2149/1660/1704 in train); a custom
    task its label's index (generation: 0, one class)."""
    if tasks.is_custom(task):
        return tasks.custom_label(task, row)
    if task == "sst2":
        return int(row["label"])
    if task == "boolq":
        return int(row["answer"])
    if task == "gsm8k":
        return min(max(gsm8k_steps(row["answer"]) - 2, 0), 3)
    raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")


def gsm8k_shots(train_rows: list[dict], k: int, seed: int) -> list[dict]:
    """The k solved GSM8K train rows (chosen by `seed`) put before every test prompt."""
    if not 0 <= k <= len(train_rows):
        raise ValueError(f"k={k} must be in [0, {len(train_rows)}]")
    picks = np.random.default_rng(seed).choice(len(train_rows), size=k, replace=False)
    return [train_rows[i] for i in picks]


def shots_prefix(shots: list[dict], task: str = "gsm8k") -> str:
    """The shots of a generation task (GSM8K, custom) in the task template, each followed by a blank line."""
    return "".join("".join(prompt_and_answer(task, row)) + "\n\n" for row in shots)


def gsm8k_kshot_prefix(train_rows: list[dict], k: int, seed: int) -> str:
    """k solved GSM8K train examples in the task template (chosen by `seed`), to put before a test prompt."""
    return shots_prefix(gsm8k_shots(train_rows, k, seed))


def ensure_pad_token(tokenizer):
    """Give the tokenizer a pad token: eos if none is set (padding is always masked by attention_mask
    and labels=-100, so reusing eos is safe); ValueError if it has neither."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_sft(tokenizer, prompt: str, answer: str, max_len: int) -> dict[str, list[int]]:
    """Prompt tokens (with BOS if the tokenizer adds one) + answer tokens + eos; loss only on the answer.

    labels are -100 on prompt tokens. If too long, the prompt is cut from the left (keeping BOS and at
    least one prompt token) so the answer survives; only an answer longer than that is cut on the right.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token")
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    has_bos = bool(p_ids) and p_ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id is not None
    head, body = p_ids[:int(has_bos)], p_ids[int(has_bos):]
    min_prompt = len(head) + 1
    if max_len <= min_prompt:
        raise ValueError(f"max_len={max_len} leaves no room for an answer")
    a_ids = a_ids[:max_len - min_prompt]
    room = max_len - len(a_ids) - len(head)
    p_ids = head + (body[-room:] if len(body) > room else body)
    return {"input_ids": p_ids + a_ids, "labels": [IGNORE] * len(p_ids) + a_ids}


def pad_batch(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples: input_ids (pad_id), attention_mask, labels (-100) if given."""
    width = max(len(e["input_ids"]) for e in examples)
    out = {"input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(examples), width), dtype=torch.long)}
    if all("labels" in e for e in examples):
        out["labels"] = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        out["attention_mask"][i, :n] = 1
        if "labels" in out:
            out["labels"][i, :n] = torch.tensor(e["labels"], dtype=torch.long)
    return out


def tokenize_public(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids of each public text (special tokens as the tokenizer adds them), cut to max_len."""
    return [ids[:max_len] for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"] if ids]


def public_batches(tokenizer, texts: list[str], max_len: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches (input_ids, attention_mask) of the public texts, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    pad_id = ensure_pad_token(tokenizer).pad_token_id
    ids = tokenize_public(tokenizer, texts, max_len)
    return [pad_batch([{"input_ids": x} for x in ids[i:i + batch_size]], pad_id)
            for i in range(0, len(ids), batch_size)]


def _dirichlet_once(labels: np.ndarray, n_clients: int, beta: float, rng: np.random.Generator) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(n_clients, beta))) * len(idx)).astype(int)[:-1]
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def partition(labels: np.ndarray, n_clients: int, split: str, beta: float, seed: int) -> list[np.ndarray]:
    """Split sample indices over clients; every sample is assigned exactly once, deterministically by seed.

    "iid": shuffle, then near-equal chunks. "dirichlet": the standard label-skew recipe: for each class,
    client proportions ~ Dirichlet(beta * 1) and that class's shuffled samples cut accordingly (small
    beta = strong skew, large beta = near IID). beta <= 0 raises ValueError (checked for "dirichlet"
    only). If a client ends up empty, the draw is repeated with seed+1, seed+2, ... up to 100 times,
    then ValueError naming beta and the client count.
    """
    labels = np.asarray(labels)
    if not 1 <= n_clients <= len(labels):
        raise ValueError(f"n_clients={n_clients} must be in [1, {len(labels)}] (number of samples)")
    if split == "iid":
        perm = np.random.default_rng(seed).permutation(len(labels))
        return [np.sort(p) for p in np.array_split(perm, n_clients)]
    if split != "dirichlet":
        raise ValueError(f"unknown split {split!r}; use iid or dirichlet")
    if not beta > 0:
        raise ValueError(f"Dirichlet beta={beta} must be > 0")
    for attempt in range(100):
        parts = _dirichlet_once(labels, n_clients, beta, np.random.default_rng(seed + attempt))
        if min(len(p) for p in parts) > 0:
            return parts
    raise ValueError(f"Dirichlet beta={beta} left a client empty in 100 draws for {n_clients} clients; "
                     "raise beta or lower the client count")


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], n_classes: int) -> np.ndarray:
    """Samples per class for each client: int array [n_clients, n_classes]."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=n_classes)[:n_classes] for p in parts])


VAL_MIN_WORDS = {"sst2": 10}  # SST-2's training file is mostly phrases, its test split whole sentences


def text_of(task: str, row: dict) -> str:
    """The input text of a row (what two rows must differ in to be different examples)."""
    return row[tasks.text_key(task)]


def validation_index(rows: list[dict], task: str, n_val: int) -> np.ndarray:
    """Indices (into `<task>/train.jsonl`) of the fixed validation set: the first `n_val` of a permutation
    seeded by VAL_SEED of the rows that look like test examples (SST-2: sentences of >= 10 words, as its test
    split has, not the training file's short phrases), sorted. It does not depend on the run's seed, so every
    run and method of a study selects its learning rate on the same rows (`split_train_val`)."""
    eligible = np.array([i for i, r in enumerate(rows) if len(text_of(task, r).split()) >= VAL_MIN_WORDS.get(task, 0)],
                        dtype=np.int64)
    if not 0 <= n_val < len(eligible):
        words = f" (sentences of >= {VAL_MIN_WORDS[task]} words)" if task in VAL_MIN_WORDS else ""
        raise ValueError(f"validation size {n_val} must be smaller than the {len(eligible)} rows of the training "
                         f"file that can serve as validation rows{words}")
    return np.sort(eligible[np.random.default_rng(VAL_SEED).permutation(len(eligible))[:n_val]])


def split_train_val(rows: list[dict], task: str, n_val: int) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows) of one task's training file (`validation_index`). No client ever trains
    on a validation example: rows whose text repeats a validation row's text (SST-2 has duplicates) are
    dropped from the training rows too."""
    if n_val == 0:
        return list(rows), []
    held = validation_index(rows, task, n_val)
    texts = {text_of(task, rows[i]) for i in held}
    return [r for r in rows if text_of(task, r) not in texts], [rows[i] for i in held]


def client_datasets(task: str, n_clients: int, split: str, beta: float, seed: int,
                    max_per_client: int | None = None, val_size: int = 0,
                    pooled: int = 0) -> tuple[list[list[dict]], np.ndarray]:
    """Train rows per client and their label histogram; with max_per_client, each client keeps a
    deterministic random subset (seeded by (seed, client)) of its partition. The `val_size` validation
    rows of `validation_index` are removed before partitioning. pooled=K (with n_clients=1): the data of a
    K-client partition, pooled into one client (the centralized ceiling on the same examples)."""
    if pooled:
        parts, hist = client_datasets(task, pooled, split, beta, seed, max_per_client, val_size)
        return [[r for part in parts for r in part]], hist.sum(axis=0, keepdims=True)
    rows, _ = split_train_val(load_rows(task, "train"), task, val_size)
    labels = np.array([label_of(task, r) for r in rows])
    parts = partition(labels, n_clients, split, beta, seed)
    if max_per_client is not None:
        if max_per_client < 1:
            raise ValueError(f"max_per_client={max_per_client} must be >= 1")
        parts = [np.sort(np.random.default_rng([seed, k]).choice(p, min(len(p), max_per_client), replace=False))
                 for k, p in enumerate(parts)]
    return [[rows[i] for i in p] for p in parts], label_histogram(labels, parts, tasks.n_classes(task))
