"""docs/config.md, generated from the config dataclasses: every key with its type, default, allowed values, meaning and
the methods it applies to, then the environment variables of the Slurm scripts and the code.

    python -m fedsoda_mpi.config_docs            # rewrite docs/config.md
    python -m fedsoda_mpi.config_docs --check    # exit 1 if docs/config.md is not what this module makes

Where each column comes from: type and default from the dataclasses of config.py; the meaning from the comment on the
field's line in config.py (and the comment lines right below it); allowed values from the `Literal` type of a choice
key and from what `validation.validate` checks (recorded while it validates the defaults); the methods from the
presets of methods.py; the default job's value from jobs/smollm2_sst2_iid.yaml. `tests/test_config_docs.py`
checks that the committed file is current and that every key has a meaning.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import re
import sys
import tokenize
import typing

from . import validation
from .config import DEFAULT_JOB, ROOT, Config, flatten, job_keys, set_key
from .methods import PRESETS

OUT = ROOT / "docs" / "config.md"

SECTIONS = {  # one line per section: the --help text and docs/config.md's headings
    "": "what runs: the method preset, the seed, resuming, the device",
    "model": "the LLM (a prepared name or an HF folder), its dtype and which layers form the adapter",
    "data": "the task, the client split, the validation rows and the public data D_public for SGP and ODA",
    "sgp": "similarity group pruning: which layer groups the sub-LLM drops (or a uniform drop)",
    "oda": "orchestrated distillation alignment of the sub-LLM to the full LLM (pre- and re-alignment)",
    "lora": "the LoRA adapters the clients train (and the server aligns with)",
    "quant": "NF4 quantization of the sub-LLM the clients receive (QLoRA)",
    "fed": "the federation: rounds, clients, local training, aggregation, emulator cache, checkpoints",
    "eval": "evaluation: per-round validation, the final test evaluation, GSM8K generation",
    "output": "where the run folder goes",
    "debug": "fault injection for tests, deterministic kernels",
}

# (keys, condition on a method's resolved preset): a key applies to the methods whose preset meets the first rule that
# names it (a key, or a prefix ending in "." or "_"); a key no rule names applies to every method
APPLIES = [
    (("sgp.n", "sgp.p", "sgp.enabled"), lambda c: c.sgp.p > 0),
    (("sgp.spacing",), lambda c: c.sgp.p > 0 and not c.sgp.enabled),
    (("sgp.",), lambda c: c.sgp.p > 0 and c.sgp.enabled),
    (("oda.every", "oda.re_", "oda.trigger", "oda.drift_threshold", "oda.max_interval"), lambda c: c.oda.re_align),
    (("oda.",), lambda c: c.oda.pre_align or c.oda.re_align),
    (("quant.",), lambda c: c.quant.enabled),
    (("data.public", "data.public_", "data.self_"), lambda c: c.sgp.p > 0 or c.oda.pre_align or c.oda.re_align),
    (("fed.emulator_cache", "fed.cache_"), lambda c: c.sgp.p > 0),
]

ENV_VARS = [  # (name, who reads it, meaning [default])
    ("FEDSODA_MODELS", "fedsoda_mpi", "folder of prepared models [~/.cache/fedsoda/models]"),
    ("FEDSODA_DATA", "fedsoda_mpi", "folder of the task data [../shared/data next to the checkout, else "
                                    "~/.cache/fedsoda/data]"),
    ("OMP_NUM_THREADS", "fedsoda_mpi, slurm/common.sh", "torch threads of each client rank [the Slurm scripts: "
                                                        "--cpus-per-task]"),
    ("HDF5_USE_FILE_LOCKING", "h5py", "FALSE to read a run.h5 while its run writes it (the Makefile and the Slurm "
                                      "scripts set it)"),
    ("HF_TOKEN", "huggingface_hub", "a read token for gated models (Llama-3, Mistral) on the login node; or "
                                    "`hf auth login`"),
    ("HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE", "slurm/common.sh", "the hub's offline mode on compute nodes [1; "
                                                                "slurm/prepare.sh: 0]"),
    ("FEDSODA_PROGRESS", "fedsoda_mpi", "0 hides the alignment's progress bar (the study route and the smoke "
                                        "check set 0) [1]"),
    ("FEDSODA_ROOT", "slurm/*.sh", "the repository [the submit directory]"),
    ("FEDSODA_PYTHON", "slurm/*.sh", "python with fedsoda_mpi and mpi4py, e.g. .venv/bin/python [python]"),
    ("FEDSODA_LAUNCHER", "slurm/*.sh", "srun (`srun --mpi=pmix`) or mpirun (mpi4py's own MPI) [srun]"),
    ("FEDSODA_OVERRIDES", "slurm/*.sh", "space-separated key=value config overrides, appended last (they win)"),
    ("FEDSODA_REQUEUE", "slurm/common.sh", "0: no `scontrol requeue` after a USR1 stop [1]"),
    ("RUN_ROOT", "slurm/*.sh", "where run folders go (output.root) [runs]"),
    ("RUN_TAG", "slurm/*_iid.sh (slurm/common.sh)", "a tag in the run folder's name: "
                                                    "$RUN_ROOT/<job name>-<RUN_TAG>-<job id>/ [none]"),
    ("JOB_CONFIG", "slurm/*_iid.sh, slurm/prepare.sh", "job YAML replacing the script's default "
                                                       "(jobs/<model>_gsm8k_iid.yaml)"),
    ("PREPARE_CONFIGS", "slurm/prepare.sh", "space-separated job files whose models to prepare [JOB_CONFIG, else "
                                            "jobs/*.yaml]"),
    ("SMOKE_DEVICE", "slurm/smoke.sh", "auto | cuda: cuda refuses the CPU fallback [auto]"),
    ("SMOKE_ARGS", "slurm/smoke.sh", "more arguments of `python -m fedsoda_mpi.smoke`"),
    ("FEDSODA_SMOKE_TRACEBACK", "fedsoda_mpi.smoke", "1: a failing step prints its traceback"),
    ("STUDY, STAGE", "slurm/study_task.sh", "the study file and the stage of an array task (submit_all.sh sets them)"),
    ("STUDY_RESULTS", "slurm/study_*.sh, slurm/submit_all.sh", "where run summaries go [results/<study name>]"),
    ("SUBMIT_PREPARE", "slurm/submit_all.sh", "0: no prepare job (as --no-prepare) [1]"),
    ("SUBMIT_ARGS, SUBMIT_RUN_ARGS", "slurm/submit_all.sh", "extra sbatch options for every job / the run arrays"),
    ("FIGURES", "slurm/analyze.sh", "where figures and tables go [$RUN_ROOT/figures]"),
]


def field_comments(cls) -> dict[str, str]:
    """{field name: its comment} of a dataclass: the comment on the field's line and the comment-only lines right
    below it, joined."""
    source = inspect.getsource(cls)
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    out = {}
    for f in dataclasses.fields(cls):
        row = next((i for i, line in enumerate(lines, 1) if re.match(rf"\s+{f.name}\s*:", line)), None)
        if row is None or row not in comments:
            continue
        parts = [comments[row]]
        while row + 1 <= len(lines) and lines[row].strip().startswith("#"):
            row += 1
            parts.append(comments[row])
        out[f.name] = " ".join(parts)
    return out


def type_name(typ) -> str:
    """`int`, `float`, `bool`, `str` or `list[str]`; a `Literal` choice key by the type of its choices (`str`)."""
    if typing.get_origin(typ) is list or typ is list:
        return "list[str]"
    if typing.get_origin(typ) is typing.Literal:
        typ = type(typing.get_args(typ)[0])
    return getattr(typ, "__name__", str(typ))


def allowed_values() -> dict[str, list[str]]:
    """{key: what validation.validate requires of it}: the choices of a key's `Literal` type (the method: the
    presets), then, recorded while it validates the defaults, the bound of `_at_least` and the "must be ..." of the
    `_check` messages that start with the key."""
    found: dict[str, list[str]] = {}

    def note(key: str, text: str) -> None:
        text = re.sub(r" \([\d.]+\)", "", text)  # the current value in a bound (`fed.clients (10)`): not a rule
        if text != "a finite number" and text not in found.setdefault(key, []):  # (every float key: said once)
            found[key].append(text)

    for key, choices in {"method": tuple(PRESETS), **validation.choice_keys(Config())}.items():
        note(key, ", ".join(f"`{c}`" for c in choices))

    def at_least(key, value, low):
        note(key, f">= {low}")

    def check(ok, msg):
        m = re.match(r"^([\w.]+): (?:[^,]*? )?must be (.+?), got", msg)
        if m:
            note(m.group(1), m.group(2))

    saved = validation._at_least, validation._check
    validation._at_least, validation._check = at_least, check
    try:
        validation.validate(Config())
    finally:
        validation._at_least, validation._check = saved
    return {key: texts for key, texts in found.items() if texts}


def method_column(key: str, presets: dict[str, Config]) -> str:
    """The methods `key` applies to (APPLIES) and the value each method's preset gives it."""
    rule = next((cond for keys, cond in APPLIES for k in keys
                 if key == k or (k.endswith((".", "_")) and key.startswith(k))), None)
    names = [m for m, c in presets.items() if rule is None or rule(c)]
    text = "all" if len(names) == len(presets) else ", ".join(names)
    set_by = [f"{m}: `{p[key]}`" for m, p in PRESETS.items() if key in p]
    return text + (f" (preset {'; '.join(set_by)})" if set_by else "")


def preset_configs() -> dict[str, Config]:
    """Each method's defaults: Config() with its preset applied."""
    out = {}
    for method, keys in PRESETS.items():
        cfg = Config()
        for key, value in keys.items():
            set_key(cfg, key, value)
        out[method] = cfg
    return out


def key_rows() -> list[tuple[str, list[tuple]]]:
    """[(section, [(key, type, default, allowed, meaning, methods, default job's value)])] for every key of Config."""
    allowed, presets = allowed_values(), preset_configs()
    job = job_keys(DEFAULT_JOB)
    defaults = flatten(Config().to_dict())
    sections: dict[str, list[tuple]] = {name: [] for name in SECTIONS}

    def walk(cls, prefix: str) -> None:
        hints, comments = typing.get_type_hints(cls), field_comments(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            key = prefix + f.name
            meaning = comments.get(f.name, "")
            sections.setdefault(prefix.rstrip("."), []).append(
                (key, type_name(hints[f.name]), defaults[key], "; ".join(allowed.get(key, [])), meaning,
                 method_column(key, presets), job.get(key, "")))

    walk(Config, "")
    return list(sections.items())


def cell(value) -> str:
    """A value as a table cell: code, a list comma-separated, "" shown as such."""
    if isinstance(value, list):
        value = ",".join(value)
    return '`""`' if value == "" else f"`{value}`"


def render() -> str:
    """The text of docs/config.md."""
    out = ["# Configuration", "",
           "<!-- generated by `python -m fedsoda_mpi.config_docs` from fedsoda_mpi/config.py; do not edit by hand "
           "(tests/test_config_docs.py checks it is current) -->", "",
           "Settings apply in one order: the defaults below, then the method's preset (`method=`, "
           "fedsoda_mpi/methods.py), then the job file (`--config`, default `jobs/smollm2_sst2_iid.yaml`), then "
           "`key=value` overrides on the command line; the later wins. "
           "`python -m fedsoda_mpi.main --print-config [--config JOB] [key=value ...]` prints the result as YAML "
           "without starting a run; a run writes it to `config.yaml` and the top of `log.txt`. A bad key or value "
           "stops every rank before any work with one line and exit code 2.", "",
           "Columns: the default of the dataclass; what the validation accepts (every float must also be finite); "
           "the methods whose pipeline reads the key (and the value a method's preset gives it); the value in the "
           "default job file "
           "`jobs/smollm2_sst2_iid.yaml` where it sets one (what `make demo` runs). Note `eval.max_examples`: 200 by "
           "default, so a run's final test accuracy is on the first 200 test rows unless it sets "
           "`eval.max_examples=0` (the whole test split; the study and the 7-8B job files do).", ""]
    for section, rows in key_rows():
        title = f"`{section}.*`" if section else "Top level"
        out += [f"## {title}", "", SECTIONS.get(section, "") + ".", "",
                "| key | type | default | allowed | meaning | methods | default job |",
                "|---|---|---|---|---|---|---|"]
        for key, typ, default, allowed, meaning, methods, job in rows:
            out.append(f"| `{key}` | {typ} | {cell(default)} | {allowed.replace('|', chr(92) + '|')} | "
                       f"{meaning.replace('|', chr(92) + '|')} | {methods} | {cell(job) if job != '' else ''} |")
        out.append("")
    out += ["## Environment variables", "",
            "Read by fedsoda_mpi or by the Slurm scripts (`slurm/common.sh` lists the scripts' own); "
            "[default] in brackets.", "",
            "| variable | read by | meaning |", "|---|---|---|"]
    out += [f"| `{name}` | {who} | {meaning.replace('|', chr(92) + '|')} |" for name, who, meaning in ENV_VARS]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write docs/config.md, or with --check report whether it is current (exit 1 if not)."""
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        current = OUT.is_file() and OUT.read_text() == text
        print(f"{OUT}: {'current' if current else 'out of date; run python -m fedsoda_mpi.config_docs'}")
        return 0 if current else 1
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
