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

How the table is drawn (all optional; LAYOUT_KEYS):

    heading: "Table 3: ablation of ODA"   # its heading in a new report file (default: its name)
    labels: [run]            # the headers of the label cells, one per label of a row
    before: [overrides]      # report columns (analysis/report_tables.py COLUMNS) before the accuracy
    after: [comm, client]    # ... and after the Δ
    left: 2                  # left-aligned columns (default: the label and `before` columns)
    seeds: true              # show the paired seeds
    delta: "Δ vs lr_pet (pts)"
    task: sst2               # drawn for this task only
    settings: variants       # which settings get a table: `variants or main` (default: those with runs of its
                             # variant rows other than references, else those of its main rows), `variants`, `group`
                             # (those of its variant group's runs)
    splits: across           # one table per (task, model) holding every split (rows narrow by `split`)
    empty: "_No ... yet._"   # the text when no setting has a table
    then: candidates         # a table drawn below from the rows (a name the report knows)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

LAYOUT_KEYS = {"heading", "labels", "before", "after", "left", "seeds", "delta", "task", "settings", "splits", "empty",
               "then"}
TABLE_KEYS = {"ref", "rows", "group"} | LAYOUT_KEYS  # ref and rows required
SETTINGS = ("variants or main", "variants", "group")
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
    """A declared comparison table: its rows in display order, the table's reference row, its variant group, and
    how it is drawn (the module docstring)."""

    ref: str
    rows: tuple
    group: str | None = None
    labels: tuple = ("run",)
    before: tuple = ()
    after: tuple = ()
    left: int | None = None
    seeds: bool = False
    delta: str = "Δ vs FedSODA (pts)"
    task: str | None = None
    settings: str = SETTINGS[0]
    splits: bool = False
    empty: str = "_No FedSODA or variant runs yet._"
    then: str | None = None
    heading: str | None = None

    @property
    def left_columns(self) -> int:
        """How many columns are left-aligned: `left`, else the label and `before` columns."""
        return len(self.labels) + len(self.before) if self.left is None else self.left


@dataclass(frozen=True)
class Vocabulary:
    """What a study's tables may name: rows (its variants and `main <method>` of its grid methods), variant groups,
    methods and splits."""

    rows: set
    groups: set
    methods: set
    splits: set


def tables(spec: dict, known: Vocabulary, columns: set | None = None, thens: set | None = None) -> dict[str, Table]:
    """The study's validated `tables`; a row, group, method or split naming nothing of the study is refused, and so
    is a column not in `columns` or a `then` not in `thens` (when given: the report's names)."""
    declared = spec.get("tables") or {}
    if not isinstance(declared, dict):
        raise TableError(f"tables: expected a mapping of table name to {{ref, rows}}, got {declared!r}")
    return {str(name): _table(f"tables.{name}", table, known, columns, thens) for name, table in declared.items()}


def _table(where: str, table, known: Vocabulary, columns: set | None, thens: set | None) -> Table:
    """One validated table."""
    if not isinstance(table, dict) or not {"ref", "rows"} <= set(table) <= TABLE_KEYS \
            or not isinstance(table["rows"], list):
        raise TableError(f"{where}: expected the keys ref and rows (a list of [row, label]) and optionally "
                         f"{', '.join(sorted(TABLE_KEYS - {'ref', 'rows'}))}, got {table!r}")
    if "group" in table and table["group"] not in known.groups:
        raise TableError(f"{where}.group: '{table['group']}' is not a variant group of this study")
    rows = [_row(where, row, known, table["ref"]) for row in table["rows"]]
    if len({len(r.labels) for r in rows}) > 1:
        raise TableError(f"{where}.rows: every row has as many labels as the first")
    names = [r.row for r in rows]
    if table["ref"] not in names:
        raise TableError(f"{where}.ref: '{table['ref']}' is not one of its rows")
    for r in rows:
        if r.ref not in names:
            raise TableError(f"{where}.rows: {r.row}: ref: '{r.ref}' is not one of its rows")
    return Table(table["ref"], tuple(rows), table.get("group"),
                 **_layout(where, table, len(rows[0].labels) if rows else 1, columns, thens))


def _layout(where: str, table: dict, n_labels: int, columns: set | None, thens: set | None) -> dict:
    """The validated drawing keys of one table (Table's fields)."""
    out = {}
    for key in ("labels", "before", "after"):
        if key in table:
            if not (isinstance(table[key], list) and all(isinstance(x, str) for x in table[key])):
                raise TableError(f"{where}.{key}: expected a list of names, got {table[key]!r}")
            unknown = [c for c in table[key] if key != "labels" and columns is not None and c not in columns]
            if unknown:
                raise TableError(f"{where}.{key}: unknown column '{unknown[0]}' (the report's columns: "
                                 f"{', '.join(sorted(columns))})")
            out[key] = tuple(table[key])
    if len(out.get("labels", ("run",))) != n_labels:
        raise TableError(f"{where}.labels: one header per label of a row ({n_labels}), got {table.get('labels')!r}")
    for key, kind, what in (("left", int, "an integer"), ("seeds", bool, "true or false"), ("delta", str, "a text"),
                            ("task", str, "a task"), ("empty", str, "a text"), ("then", str, "a name"),
                            ("heading", str, "a text")):
        if key in table:
            if not isinstance(table[key], kind) or (kind is int and isinstance(table[key], bool)):
                raise TableError(f"{where}.{key}: expected {what}, got {table[key]!r}")
            out[key] = table[key]
    if "then" in out and thens is not None and out["then"] not in thens:
        raise TableError(f"{where}.then: unknown table '{out['then']}' (known: {', '.join(sorted(thens))})")
    if "settings" in table:
        if table["settings"] not in SETTINGS:
            raise TableError(f"{where}.settings: expected one of {', '.join(SETTINGS)}, got {table['settings']!r}")
        if table["settings"] == "group" and "group" not in table:
            raise TableError(f"{where}.settings: 'group' needs the table's group")
        out["settings"] = table["settings"]
    if "splits" in table:
        if table["splits"] != "across":
            raise TableError(f"{where}.splits: the only value is 'across', got {table['splits']!r}")
        out["splits"] = True
    return out


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
