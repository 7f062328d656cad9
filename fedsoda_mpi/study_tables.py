"""The `tables` of a study file: the comparison tables analysis/report.py draws, declared as data.

    tables:
      table3:
        ref: main fedsoda                  # the row every other row's Δ is paired with (by seed)
        group: ablation                    # optional: the group's other variants follow, labelled by their name
        rows:                              # display order: [row, label, ...]; a row is a variant or `main <method>`
          - [main fedsoda, "FedSODA"]
          - [no_re_align, "w/o re-alignment", {ref: main fedsoda}]

A row may end with a mapping of options: `method` (only that method's runs of the variant), `split` (only runs of that
split) and `ref` (this row's own reference, one of the table's rows; default the table's `ref`). A row whose
reference is itself is a reference row.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

TABLE_KEYS = {"ref", "rows", "group"}  # group: optional
ROW_OPTIONS = {"method", "split", "ref"}


class TableError(ValueError):
    """A bad `tables` entry; the message is one line (study_expand raises it again as a StudyError)."""


@dataclass(frozen=True)
class TableRow:
    """One declared row: its runs (`row`: a variant name or `main <method>`, narrowed to `method` and `split` when
    given), its label cells and the row its Δ is paired with (`ref`)."""

    row: str
    labels: tuple
    ref: str
    method: str | None = None
    split: str | None = None

    @property
    def is_ref(self) -> bool:
        """Whether this row is a reference: its own runs, unnarrowed, are its reference."""
        return self.row == self.ref and self.method is None and self.split is None


@dataclass(frozen=True)
class Table:
    """A declared comparison table: its rows in display order, the table's reference row, its variant group."""

    ref: str
    rows: tuple
    group: str | None = None


@dataclass(frozen=True)
class Vocabulary:
    """What a study's tables may name: rows (its variants and `main <method>` of its grid methods), variant groups,
    methods and splits."""

    rows: set
    groups: set
    methods: set
    splits: set


def tables(spec: dict, known: Vocabulary) -> dict[str, Table]:
    """The study's validated `tables`; a row, group, method or split naming nothing of the study is refused."""
    declared = spec.get("tables") or {}
    if not isinstance(declared, dict):
        raise TableError(f"tables: expected a mapping of table name to {{ref, rows}}, got {declared!r}")
    return {str(name): _table(f"tables.{name}", table, known) for name, table in declared.items()}


def _table(where: str, table, known: Vocabulary) -> Table:
    """One validated table."""
    if not isinstance(table, dict) or not {"ref", "rows"} <= set(table) <= TABLE_KEYS \
            or not isinstance(table["rows"], list):
        raise TableError(f"{where}: expected the keys ref and rows (a list of [row, label]) and optionally "
                         f"group, got {table!r}")
    if "group" in table and table["group"] not in known.groups:
        raise TableError(f"{where}.group: '{table['group']}' is not a variant group of this study")
    rows = [_row(where, row, known, table["ref"]) for row in table["rows"]]
    if len({len(r.labels) for r in rows}) > 1:
        raise TableError(f"{where}.rows: every row has as many labels as the first")
    names = [r.row for r in rows]
    for r in rows:
        if r.ref not in names:
            what = f"{where}.ref" if r.ref == table["ref"] else f"{where}.rows: {r.row}: ref"
            raise TableError(f"{what}: '{r.ref}' is not one of its rows")
    return Table(table["ref"], tuple(rows), table.get("group"))


def _row(where: str, row, known: Vocabulary, ref: str) -> TableRow:
    """One validated row: [row, label, ...] with an optional mapping of ROW_OPTIONS last."""
    options = row[-1] if isinstance(row, list) and row and isinstance(row[-1], dict) else {}
    cells = row[:-1] if options else row
    if not (isinstance(cells, list) and len(cells) >= 2 and all(isinstance(x, str) for x in cells)):
        raise TableError(f"{where}.rows: expected [row, label] (strings; one label per label column; optionally a "
                         f"mapping of {', '.join(sorted(ROW_OPTIONS))} last), got {row!r}")
    if set(options) - ROW_OPTIONS or not all(isinstance(v, str) for v in options.values()):
        raise TableError(f"{where}.rows: {cells[0]}: options are strings among {', '.join(sorted(ROW_OPTIONS))}, "
                         f"got {options!r}")
    if cells[0] not in known.rows:
        raise TableError(f"{where}.rows: '{cells[0]}' is neither a variant of this study nor 'main <method>' "
                         "of a grid method")
    for key, have in (("method", known.methods), ("split", known.splits)):
        if key in options and options[key] not in have:
            raise TableError(f"{where}.rows: {cells[0]}: {key} '{options[key]}' is not a {key} of this study")
    return TableRow(cells[0], tuple(cells[1:]), options.get("ref", ref), options.get("method"), options.get("split"))


def read_spec(path: str | Path) -> dict:
    """A study file's mapping (TableError when unreadable)."""
    try:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise TableError(f"{path}: not a readable study file ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise TableError(f"{path}: a study file is a mapping")
    return spec
