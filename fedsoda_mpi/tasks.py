"""What a task is: the built-in ones (SST-2, BoolQ: classification; GSM8K: generation with a final answer) and a
user's own dataset (`data.task=custom data.custom=NAME`, schema in docs/datasets.md).

A task is named by a string everywhere in the code: "sst2", "boolq", "gsm8k", or "custom:<data.custom>"
(`task_id`). A custom task is a folder (`custom_folder`) holding `task.json` (its kind, label words, instruction
and final-answer rule: `CustomTask`) and `train.jsonl` / `test.jsonl`; `python -m fedsoda_mpi.prepare data
--custom NAME` writes one from any `datasets` dataset. Nothing in a task file is run: the instruction is filled by
plain placeholder substitution and the final-answer rule is a regular expression.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .paths import cache_data_dir, shared_data_dir

TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ANSWER_LEAD = "the correct answer is"
FIX = "run `python -m fedsoda_mpi.prepare data` (or set FEDSODA_DATA to a folder laid out like shared/data)"
LABEL_WORDS = {"sst2": ("negative", "positive"), "boolq": ("false", "true")}
BUILTIN_KINDS = {"sst2": "classification", "boolq": "classification", "gsm8k": "generation"}
CUSTOM = "custom:"  # prefix of a custom task's id
SPEC_FILE = "task.json"
SPEC_FIX = "see docs/datasets.md, or write the folder with `python -m fedsoda_mpi.prepare data --custom NAME ...`"
KINDS = ("classification", "generation")
COMPARES = ("number", "text")
DEFAULT_FINAL = r"####\s*(.+)"  # GSM8K's rule: the final answer is what follows "####"
DEFAULT_INSTRUCTION = {
    "classification": "Please classify the following text as {labels}, text: {text}\n\nAnswer format: {choices}",
    "generation": "{prompt}"}
TEXT_KEY = {"classification": "text", "generation": "prompt"}  # the row field a long row is cut in
SPEC_KEYS = {"kind", "labels", "instruction", "final_regex", "compare", "source"}
_PLACEHOLDER = re.compile(r"\{(text|prompt|labels|choices)\}")
_FINAL_NUMBER = re.compile(r"[-\u2212]?\$?\d+(\.\d+)?")  # what `gsm8k_final_number` returns for a valid answer
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NUMBER = re.compile(r"([-\u2212]?)\$?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)")


class DataError(RuntimeError):
    """A data file is missing or malformed; the message names the file (and line) and the fix."""


def data_dir() -> Path:
    """`$FEDSODA_DATA` if set; else `<repo>/../shared/data` if it exists; else `~/.cache/fedsoda/data`."""
    if os.environ.get("FEDSODA_DATA"):
        return Path(os.environ["FEDSODA_DATA"]).expanduser()
    shared = shared_data_dir()
    return shared if shared.is_dir() else cache_data_dir()


@dataclass(frozen=True)
class CustomTask:
    """The task.json of a custom task: kind, label words (classification, index = class), the instruction (with
    {text} or {prompt}; {labels} "a or b", {choices} "a/b"), and for generation the final-answer regex (group 1,
    else the whole match, of its first match) and how two final answers compare (number | text)."""
    folder: Path
    kind: str
    labels: tuple = ()
    instruction: str = ""
    final_regex: str = DEFAULT_FINAL
    compare: str = "number"

    @property
    def pattern(self) -> re.Pattern:
        return re.compile(self.final_regex)


def task_id(data_cfg) -> str:
    """The task string of a config's `data` section: data.task, or "custom:<data.custom>"."""
    return CUSTOM + data_cfg.custom if data_cfg.task == "custom" else data_cfg.task


def task_label(data_cfg) -> str:
    """The task as run files and reports name it: data.task, or "custom:<folder name>"."""
    return CUSTOM + Path(data_cfg.custom).name if data_cfg.task == "custom" else data_cfg.task


def is_custom(task: str) -> bool:
    return task.startswith(CUSTOM)


def custom_folder(name: str) -> Path:
    """The folder of custom task `name`: for a plain name the first of `<data_dir>/custom/<name>` and
    `~/.cache/fedsoda/data/custom/<name>` that exists (else the first), else the path `name` (one holding a '/' or
    starting with '~')."""
    if "/" in name or name.startswith("~"):
        return Path(name).expanduser()
    if not NAME.fullmatch(name):
        raise DataError(f"data.custom: '{name}' is neither a plain name (letters, digits, '.', '_', '-') nor a folder "
                        "path")
    places = [data_dir() / "custom" / name, cache_data_dir() / "custom" / name]
    return next((p for p in places if p.is_dir()), places[0])


def custom_root() -> Path:
    """Where `prepare data --custom` writes by default: `<data_dir>/custom` if it can be written, else
    `~/.cache/fedsoda/data/custom` (a read-only shared data folder)."""
    root = data_dir()
    return (root if root.is_dir() and os.access(root, os.W_OK) else cache_data_dir()) / "custom"


def spec(task: str) -> CustomTask:
    """The CustomTask of a custom task id (read again only when its task.json changes); DataError naming task.json
    if it is missing or bad."""
    path = custom_folder(task[len(CUSTOM):]) / SPEC_FILE
    try:
        changed = path.stat().st_mtime_ns
    except OSError:
        raise DataError(f"missing custom task file {path}; {SPEC_FIX}") from None
    return _load_spec(str(path.parent), changed)


@lru_cache(maxsize=16)
def _load_spec(folder: str, changed: int) -> CustomTask:
    """The CustomTask of `folder`/task.json (`changed`, its modification time, keys the cache)."""
    path, fix = Path(folder) / SPEC_FILE, SPEC_FIX
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a JSON file ({e}); {fix}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: must hold a JSON object; {fix}")
    problem = _spec_problem(raw)
    if problem:
        raise DataError(f"{path}: {problem}; {fix}")
    kind = raw["kind"]
    return CustomTask(Path(folder), kind, tuple(raw.get("labels", ())),
                      raw.get("instruction") or DEFAULT_INSTRUCTION[kind], raw.get("final_regex", DEFAULT_FINAL),
                      raw.get("compare", "number"))


def _spec_problem(raw: dict) -> str | None:
    """What is wrong with a task.json object, or None."""
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        return f"unknown key '{unknown[0]}' (keys: {', '.join(sorted(SPEC_KEYS))})"
    kind = raw.get("kind")
    if kind not in KINDS:
        return f"'kind' must be classification or generation, got {kind!r}"
    instruction = raw.get("instruction", DEFAULT_INSTRUCTION[kind])
    if not isinstance(instruction, str) or "{" + TEXT_KEY[kind] + "}" not in instruction:
        return f"'instruction' must be a string holding {{{TEXT_KEY[kind]}}}, got {instruction!r}"
    if kind == "classification":
        labels = raw.get("labels")
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(w, str) and w.strip() == w and w
                                                                      for w in labels):
            return f"'labels' must list at least two label words (no surrounding spaces), got {labels!r}"
        if len(set(labels)) != len(labels):
            return f"'labels' must be distinct, got {labels!r}"
        return None
    if raw.get("compare", "number") not in COMPARES:
        return f"'compare' must be number or text, got {raw.get('compare')!r}"
    try:
        re.compile(raw.get("final_regex", DEFAULT_FINAL))
    except (re.error, TypeError) as e:
        return f"'final_regex' is not a regular expression ({e})"
    return None


def kind(task: str) -> str:
    """classification | generation; ValueError for an unknown task."""
    if is_custom(task):
        return spec(task).kind
    if task not in BUILTIN_KINDS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(BUILTIN_KINDS)} or custom:<name>")
    return BUILTIN_KINDS[task]


def is_generation(task: str) -> bool:
    return kind(task) == "generation"


def label_words(task: str) -> tuple | None:
    """The label words of a classification task (index = class), None for a generation task."""
    if is_custom(task):
        s = spec(task)
        return s.labels if s.kind == "classification" else None
    return LABEL_WORDS.get(task)


def text_key(task: str) -> str:
    """The row field holding the text a long row is cut in (from the left)."""
    if is_custom(task):
        return TEXT_KEY[spec(task).kind]
    return "sentence" if task == "sst2" else "question"


def n_classes(task: str) -> int:
    """Classes of the label histogram: label words; GSM8K 4 step buckets; a custom generation task 1."""
    words = label_words(task)
    return len(words) if words else (4 if task == "gsm8k" else 1)


def empty_row(task: str) -> dict:
    """A row of `task` with empty text and answer (the template's own length, `lengths.check_max_len`)."""
    if is_custom(task):
        return {TEXT_KEY[spec(task).kind]: "", "label": 0, "answer": ""}
    return {"sentence": "", "question": "", "label": 0, "answer": "" if task == "gsm8k" else False}


# ---- rows ----------------------------------------------------------------------------------------------------

def check_row(task: str, row: object) -> str | None:
    """Return what is wrong with one row of `task`, or None if it is valid."""
    if is_custom(task):
        return check_custom_row(spec(task), row)
    if not isinstance(row, dict):
        return "row is not a JSON object"
    if not isinstance(row.get("question" if task != "sst2" else "sentence"), str):
        return "missing text field"
    if task == "sst2" and row.get("label") not in (0, 1):
        return "label must be 0 or 1"
    if task == "boolq" and not isinstance(row.get("answer"), bool):
        return "answer must be true/false"
    if task == "gsm8k":
        answer = row.get("answer")
        if not isinstance(answer, str) or "####" not in answer:
            return "answer lacks the '#### N' final answer"
        final = gsm8k_final_number(answer)
        if not _FINAL_NUMBER.fullmatch(final):
            return f"the final answer after '####' must be a number (e.g. '#### 72'), got '#### {final}'"
    return None


def gsm8k_final_number(answer: str) -> str:
    """The number after the first '####' (commas and a trailing period stripped); ValueError if absent."""
    if "####" not in answer:
        raise ValueError("answer has no '#### N' final answer")
    tail = answer.split("####", 1)[1].split()
    return tail[0].replace(",", "").rstrip(".") if tail else ""


# ---- custom rows ------------------------------------------------------------------------------------------------

def check_custom_row(s: CustomTask, row: object) -> str | None:
    """What is wrong with one row of a custom task, or None if it is valid."""
    if not isinstance(row, dict):
        return "row is not a JSON object"
    if s.kind == "classification":
        if not isinstance(row.get("text"), str):
            return "missing field 'text' (a string)"
        if "label" not in row:
            return "missing field 'label'"
        if _label_index(s, row["label"]) is None:
            return (f"unknown label {row['label']!r}: use one of {', '.join(s.labels)} or its index "
                    f"0..{len(s.labels) - 1}")
        return None
    for key in ("prompt", "answer"):
        if not isinstance(row.get(key), str):
            return f"missing field '{key}' (a string)"
    final = final_answer(s, row["answer"])
    if final is None:
        return f"answer has no final answer (final_regex {s.final_regex!r} does not match it)"
    if s.compare == "number" and number_of(final) is None:
        return f"final answer {final!r} holds no number (compare=number)"
    return None


def _label_index(s: CustomTask, label) -> int | None:
    """A row's label as a class index: a label word, or an integer index; None if it is neither."""
    if isinstance(label, str):
        return s.labels.index(label) if label in s.labels else None
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(s.labels):
        return label
    return None


def custom_label(task: str, row: dict) -> int:
    """The class of a custom row: its label's index (classification), 0 (generation: no classes)."""
    s = spec(task)
    return _label_index(s, row["label"]) if s.kind == "classification" else 0


def custom_prompt_and_answer(task: str, row: dict) -> tuple[str, str]:
    """Prompt and target answer of a custom row, as the built-in tasks build them: classification, the template of
    the instruction + "the correct answer is" and " <label word>"; generation, the template of the instruction and
    the row's answer."""
    s = spec(task)
    values = {"text": row.get("text", "").strip(), "prompt": row.get("prompt", "").strip(),
              "labels": " or ".join(s.labels), "choices": "/".join(s.labels)}
    instruction = _PLACEHOLDER.sub(lambda m: values[m.group(1)], s.instruction)
    if s.kind == "classification":
        return TEMPLATE.format(instruction=instruction) + ANSWER_LEAD, " " + s.labels[custom_label(task, row)]
    return TEMPLATE.format(instruction=instruction), row["answer"].strip()


# ---- final answers of a custom generation task -------------------------------------------------------------------

def final_answer(s: CustomTask, text: str) -> str | None:
    """The final answer in `text`: group 1 (else the whole match) of the first match of final_regex, stripped."""
    m = s.pattern.search(text)
    if m is None:
        return None
    return (m.group(1) if m.re.groups else m.group(0)).strip()


def number_of(text: str) -> float | None:
    """The first number of `text` ("1,234" -> 1234.0, "$-3" -> -3.0), None if it has none."""
    m = _NUMBER.search(text)
    if m is None:
        return None
    return (-1.0 if m.group(1) else 1.0) * float(m.group(2).replace(",", ""))


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(".!")


def custom_correct(task: str, output: str, row: dict) -> bool:
    """Whether a generated `output` gives the row's final answer: both extracted with final_regex, then equal as
    numbers (compare=number, within 1e-6) or as text (compare=text: case and runs of spaces ignored, a trailing
    '.' or '!' dropped)."""
    s = spec(task)
    got, want = final_answer(s, output), final_answer(s, row["answer"])
    if got is None or want is None:
        return False
    if s.compare == "text":
        return _normalise(got) == _normalise(want)
    a, b = number_of(got), number_of(want)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=0.0, abs_tol=1e-6)


def write_spec(folder: Path, kind_: str, labels: list[str] | None = None, instruction: str | None = None,
               final_regex: str | None = None, compare: str | None = None, source: str | None = None) -> dict:
    """Write `folder/task.json` (only the keys given); ValueError naming the problem if it would be invalid."""
    raw = {"kind": kind_, "labels": labels, "instruction": instruction, "final_regex": final_regex,
           "compare": compare, "source": source}
    raw = {k: v for k, v in raw.items() if v is not None}
    problem = _spec_problem(raw)
    if problem:
        raise ValueError(problem)
    (folder / SPEC_FILE).write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return raw
