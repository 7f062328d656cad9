"""`python -m fedsoda_mpi.prepare data --custom NAME --from SOURCE ...`: write a custom task folder (task.json,
train.jsonl, test.jsonl; schema in docs/datasets.md) from any `datasets` dataset and a column mapping.

SOURCE is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, a data file (csv, json, jsonl,
parquet) or a folder of them (files named train.* / test.* / validation.* give those splits), or else a Hugging
Face hub id (login node: compute nodes are offline). The training split is --train-split; the test split is
--test-split, else the source's "test", else its "validation", else a seeded --test-fraction of the training rows.
The folder is written beside its destination, checked as a run checks it (`data.load_rows`), then moved into place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from . import tasks

DATA_SUFFIXES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLIT_SEED = 2508


def add_arguments(d) -> None:
    """The --custom options of `prepare data`."""
    g = d.add_argument_group("your own dataset (docs/datasets.md)")
    g.add_argument("--custom", metavar="NAME", default=None,
                   help="write the custom task NAME (data.task=custom data.custom=NAME) from --from")
    g.add_argument("--subset", default=None, help="the dataset's configuration name (hub datasets)")
    g.add_argument("--kind", choices=tasks.KINDS, default="classification")
    g.add_argument("--text", metavar="COL", help="classification: the text column")
    g.add_argument("--label", metavar="COL", help="classification: the label column (class index or label word)")
    g.add_argument("--labels", default=None,
                   help="classification: label words in class order, comma-separated (default: the column's class "
                        "names, else its distinct string values sorted)")
    g.add_argument("--prompt", metavar="COL", help="generation: the prompt column")
    g.add_argument("--answer", metavar="COL", help="generation: the target answer column")
    g.add_argument("--final-regex", default=None,
                   help=f"generation: regex of the final answer (group 1), default {tasks.DEFAULT_FINAL!r}")
    g.add_argument("--compare", choices=tasks.COMPARES, default=None, help="generation: number (default) | text")
    g.add_argument("--instruction", default=None,
                   help="the instruction, with {text} or {prompt} (and {labels}, {choices}); default in docs")
    g.add_argument("--train-split", default="train")
    g.add_argument("--test-split", default=None, help="default: test, else validation, else --test-fraction")
    g.add_argument("--test-fraction", type=float, default=0.1, help="of the training rows, when no test split")


def options_given(args) -> str | None:
    """The first --custom-only option set on the command line (None if none): without --custom it is a mistake."""
    for option in ("text", "label", "labels", "prompt", "answer", "final_regex", "instruction", "subset"):
        if getattr(args, option) is not None:
            return "--" + option.replace("_", "-")
    return None


class CustomError(RuntimeError):
    """A custom dataset cannot be written as asked; the message says why (prepare prints it as one line)."""


def load_source(src: str, subset: str | None):
    """The DatasetDict of `src` (save_to_disk folder, data file(s) or hub id)."""
    import datasets

    path = Path(src).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            ds = datasets.load_from_disk(str(path))
        elif path.exists():
            builder, files = _data_files(path)
            ds = datasets.load_dataset(builder, data_files=files)
        else:
            ds = datasets.load_dataset(src, subset)
    except CustomError:
        raise
    except Exception as e:  # offline hub, unknown id, unreadable file
        where = "the Hugging Face hub (run on a machine with internet access)" if not path.exists() else str(path)
        raise CustomError(f"could not load {src} from {where} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})


def _data_files(path: Path) -> tuple[str, dict]:
    """(builder, data_files) of a data file or a folder of them; files named <split>.* give that split."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
    builders = {DATA_SUFFIXES.get(p.suffix) for p in files}
    if not files or None in builders or len(builders) != 1:
        raise CustomError(f"{path}: expected a save_to_disk folder, or csv / json / jsonl / parquet files of one kind")
    splits: dict[str, list[str]] = {}
    for p in files:
        split = p.stem if path.is_dir() and p.stem in ("train", "test", "validation") else "train"
        splits.setdefault(split, []).append(str(p))
    return builders.pop(), splits


def pick_splits(ds, train: str, test: str | None, fraction: float):
    """(train Dataset, test Dataset) of a DatasetDict (see the module docstring)."""
    if train not in ds:
        raise CustomError(f"no split '{train}' (splits: {', '.join(ds)}); pass --train-split")
    if test is not None and test not in ds:
        raise CustomError(f"no split '{test}' (splits: {', '.join(ds)}); pass another --test-split")
    test = test or next((s for s in ("test", "validation") if s in ds and s != train), None)
    if test is not None:
        return ds[train], ds[test]
    if not 0 < fraction < 1:
        raise CustomError(f"--test-fraction must be in (0, 1), got {fraction}")
    parts = ds[train].train_test_split(test_size=fraction, seed=SPLIT_SEED)
    return parts["train"], parts["test"]


def _columns(split, cols: dict[str, str | None]) -> None:
    for option, col in cols.items():
        if not col:
            raise CustomError(f"--{option}: name the column (columns: {', '.join(split.column_names)})")
        if col not in split.column_names:
            raise CustomError(f"--{option} {col}: no such column (columns: {', '.join(split.column_names)})")


def label_words(split, col: str, given: str | None) -> list[str]:
    """--labels, else the column's class names, else its distinct string values sorted."""
    if given:
        return [w.strip() for w in given.split(",")]
    names = getattr(split.features[col], "names", None)
    if names:
        return list(names)
    values = set(split[col])
    if all(isinstance(v, str) for v in values):
        return sorted(values)
    raise CustomError(f"--label {col}: holds class indices without names; give the label words with --labels")


def _label_word(value, words: list[str], names: list[str] | None, i: int, split: str) -> str:
    """The label word of one label value: an index into `words`, a class name, or a label word itself."""
    if isinstance(value, bool) or value is None:
        value = None if value is None else int(value)
    if isinstance(value, int) and 0 <= value < len(words):
        return words[value]
    if isinstance(value, str) and value in words:
        return value
    if isinstance(value, str) and names and value in names and names.index(value) < len(words):
        return words[names.index(value)]
    raise CustomError(f"{split} row {i}: label {value!r} is not a class index 0..{len(words) - 1} nor one of "
                      f"{', '.join(words)} (a test split without labels? pass --test-split or --test-fraction)")


def rows_of(split, args, words: list[str], name: str) -> list[dict]:
    """The JSONL rows of one split."""
    if args.kind == "generation":
        return [{"prompt": str(r[args.prompt]), "answer": str(r[args.answer])} for r in split]
    names = getattr(split.features[args.label], "names", None)
    return [{"text": str(r[args.text]), "label": _label_word(r[args.label], words, names, i, name)}
            for i, r in enumerate(split)]


def write_custom(args, dest_root: Path) -> Path:
    """Write `<dest_root>/custom/<args.custom>` from `args.src` (see the module docstring); returns the folder."""
    from .data import DataError, load_rows

    if not tasks.NAME.fullmatch(args.custom):
        raise CustomError(f"--custom {args.custom}: a plain name (letters, digits, '.', '_', '-')")
    folder = (tasks.custom_root() if dest_root is None else Path(dest_root) / "custom") / args.custom
    train, test = pick_splits(load_source(str(args.src), args.subset), args.train_split, args.test_split,
                              args.test_fraction)
    cols = {"text": args.text, "label": args.label} if args.kind == "classification" else \
        {"prompt": args.prompt, "answer": args.answer}
    _columns(train, cols)
    _columns(test, cols)
    words = label_words(train, args.label, args.labels) if args.kind == "classification" else None
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.tmp-", dir=folder.parent) as tmp:
        staged = Path(tmp) / folder.name
        staged.mkdir()
        try:
            tasks.write_spec(staged, args.kind, words, args.instruction, args.final_regex, args.compare,
                             _source(args.src))
        except ValueError as e:
            raise CustomError(f"task.json: {e}") from None
        for split_name, split in (("train", train), ("test", test)):
            rows = rows_of(split, args, words, split_name)
            (staged / f"{split_name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                for r in rows), encoding="utf-8")
        try:
            for split_name in ("train", "test"):
                load_rows(tasks.CUSTOM + str(staged), split_name)
        except DataError as e:
            raise CustomError(str(e).replace(str(staged), str(folder))) from None
        _replace(staged, folder)
    return folder


def _replace(staged: Path, folder: Path) -> None:
    """Move `staged` to `folder`, replacing an earlier custom task folder (one holding task.json) only."""
    if folder.exists():
        if not (folder / tasks.SPEC_FILE).is_file():
            raise CustomError(f"{folder} exists and is not a custom task folder (no {tasks.SPEC_FILE}); remove it or "
                              "choose another --custom name")
        shutil.rmtree(folder)
    os.replace(staged, folder)


def _source(src) -> str:
    """What task.json records as the source: an existing path made absolute, else the hub id."""
    path = Path(src).expanduser()
    return str(path.resolve()) if path.exists() else str(src)
