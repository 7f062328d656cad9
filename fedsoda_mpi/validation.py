"""Validation of a run configuration: the value checks of every key, the checks that need the MPI world size or the
model's layer count, and the checks of the environment and folders a run writes to. A failed check raises
ConfigError with the one line the user sees (every rank raises the same one before any collective,
`main.prepare_config`).

The allowed values of a choice key are the arguments of its `typing.Literal` type on the config dataclass
(config.py): `_one_of` reads them from there, so the type is their one source. This module walks the dataclasses
by their fields and types only and imports nothing of config.py (config.load_config calls `validate`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from pathlib import Path

from .methods import METHODS


class ConfigError(ValueError):
    """A bad configuration value; the message is the one line the user sees."""


def leaves(obj, prefix: str = ""):
    """(dotted key, value) of every non-section field of a config dataclass, in field order."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def choices_of(cls, name: str) -> tuple | None:
    """The allowed values of field `name` of dataclass `cls` when its type is a `typing.Literal`, else None."""
    typ = _hints(cls)[name]
    return typing.get_args(typ) if typing.get_origin(typ) is typing.Literal else None


def choice_keys(cfg) -> dict[str, tuple]:
    """{dotted key: allowed values} of every `Literal`-typed field of `cfg` (a Config)."""
    out = {}

    def walk(obj, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif (allowed := choices_of(type(obj), f.name)) is not None:
                out[prefix + f.name] = allowed

    walk(cfg, "")
    return out


def _field(cfg, key: str):
    """(the section holding dotted `key`, the field's name)."""
    *path, name = key.split(".")
    return functools.reduce(getattr, path, cfg), name


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(cfg, key: str) -> None:
    """Dotted `key` of `cfg` must be one of the values of its field's `Literal` type."""
    section, name = _field(cfg, key)
    choices, value = choices_of(type(section), name), getattr(section, name)
    expected = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
    _check(value in choices, f"{key}: expected {expected}, got '{value}'")


def _at_least(key: str, value, low) -> None:
    _check(value >= low, f"{key}: must be >= {low}, got {value}")


def _finite_numbers(cfg) -> None:
    """Every float key must be a finite number: `fed.lr=inf` would otherwise pass `> 0` and train nothing."""
    for key, value in leaves(cfg):
        if isinstance(value, float):
            _check(math.isfinite(value), f"{key}: must be a finite number, got {value}")


def _validate_top(cfg) -> None:
    """method, seed, resume, model.*, quant.*."""
    _check(cfg.method in METHODS, f"method: '{cfg.method}' is not one of {', '.join(METHODS)}")
    _check(0 <= cfg.seed < 2**32, f"seed: must be in [0, 2**32), got {cfg.seed}")  # numpy seeds are unsigned
    _one_of(cfg, "resume")
    _one_of(cfg, "device")
    _check(bool(cfg.model.name.strip()), "model.name: must name a prepared model or a model folder, got ''")
    _one_of(cfg, "model.dtype")
    _at_least("model.adapter_layers", cfg.model.adapter_layers, 0)
    _at_least("model.adapter_first", cfg.model.adapter_first, 0)
    _one_of(cfg, "quant.compute_dtype")
    _check(cfg.quant.embed_bits in (16, 8, 4) and (cfg.quant.enabled or cfg.quant.embed_bits == 16),
           f"quant.embed_bits: must be 16, 8 or 4 (8 and 4 need quant.enabled=true), got {cfg.quant.embed_bits}")
    name = cfg.output.name
    _check(not name or (name not in (".", "..") and "/" not in name and "\\" not in name),
           f"output.name: must be a plain folder name under output.root (no '/', not '.' or '..'; use output.dir for a "
           f"path), got '{name}'")


def _validate_data(cfg) -> None:
    """data.* (the checks that need the files themselves are in main.prepare_inputs)."""
    d = cfg.data
    tasks = choices_of(type(d), "task")
    _check(d.task in tasks, f"data.task: '{d.task}' is not one of {', '.join(tasks)}")
    _check(d.task != "custom" or bool(d.custom.strip()),
           "data.custom: data.task=custom needs the custom task's folder (a name under <data>/custom/ or a path; "
           "docs/datasets.md)")
    _check(d.task == "custom" or not d.custom,
           f"data.custom='{d.custom}': only data.task=custom reads it; set data.task=custom, or leave it empty")
    _one_of(cfg, "data.public")
    _one_of(cfg, "data.split")
    _check(d.dirichlet_beta > 0, f"data.dirichlet_beta: must be > 0, got {d.dirichlet_beta}")
    _at_least("data.max_len", d.max_len, 8)
    _at_least("data.max_train_per_client", d.max_train_per_client, 0)
    _at_least("data.pooled_clients", d.pooled_clients, 0)
    _check(d.pooled_clients == 0 or cfg.fed.clients == 1,
           f"data.pooled_clients={d.pooled_clients}: pools every partition into one client; set fed.clients=1")
    _at_least("data.val_size", d.val_size, 0)
    _at_least("data.public_samples", d.public_samples, 1)
    _at_least("data.public_max_len", d.public_max_len, 8)
    _check(d.self_temperature > 0, f"data.self_temperature: must be > 0 (sampling), got {d.self_temperature}")
    _at_least("data.self_max_new_tokens", d.self_max_new_tokens, 1)
    _at_least("data.self_batch_size", d.self_batch_size, 1)


def _validate_sgp_oda(cfg) -> None:
    """sgp.* and oda.* (the checks against the model's layer count are in _validate_layers)."""
    s, o = cfg.sgp, cfg.oda
    _at_least("sgp.n", s.n, 1)
    _at_least("sgp.p", s.p, 0)
    _at_least("sgp.n_max", s.n_max, 0)
    _check(s.auto or s.n_max == 0 or s.n_max >= s.n,
           f"sgp.n_max: must be 0 (automatic) or >= sgp.n ({s.n}), got {s.n_max}")
    _one_of(cfg, "sgp.token")
    _one_of(cfg, "sgp.spacing")
    _validate_sgp_auto(cfg)
    _check(o.every >= 1, f"oda.every: the re-alignment interval r must be >= 1, got {o.every}")
    _one_of(cfg, "oda.trigger")
    _check(o.drift_threshold > 1, f"oda.drift_threshold: the ratio tau must be > 1, got {o.drift_threshold}")
    _at_least("oda.max_interval", o.max_interval, 0)
    _check(o.max_interval == 0 or o.trigger == "drift",
           f"oda.max_interval={o.max_interval}: applies to oda.trigger=drift only (oda.trigger=every re-aligns every "
           "oda.every rounds); set oda.trigger=drift, or leave oda.max_interval at 0")
    _check(o.trigger == "every" or o.re_align,
           "oda.trigger=drift: re-alignment is off (oda.re_align=false); "
           "set oda.re_align=true, or leave oda.trigger=every")
    _at_least("oda.pre_epochs", o.pre_epochs, 0)
    _at_least("oda.re_epochs", o.re_epochs, 0)
    _at_least("oda.re_samples", o.re_samples, 1)
    _at_least("oda.alpha", o.alpha, 0)
    _at_least("oda.beta", o.beta, 0)
    _check(o.alpha + o.beta > 0 or not (o.pre_align or o.re_align),
           "oda.alpha=0 and oda.beta=0: the alignment loss (eq. 8) is 0, so M* would ship unaligned; set one of them "
           "> 0, or turn alignment off with oda.pre_align=false oda.re_align=false")
    _check(o.lr > 0, f"oda.lr: must be > 0, got {o.lr}")
    _at_least("oda.batch_size", o.batch_size, 1)


def _validate_sgp_auto(cfg) -> None:
    """sgp.auto, sgp.remove_layers, sgp.max_distance and how they combine with sgp.n / sgp.p / sgp.enabled (the
    check against the emulator's size is in _validate_layers)."""
    s, default = cfg.sgp, type(cfg.sgp)()
    _at_least("sgp.remove_layers", s.remove_layers, 0)
    _check(0 <= s.max_distance <= 1, f"sgp.max_distance: must be in [0, 1] (an angular distance; 0 = off), "
                                     f"got {s.max_distance}")
    _check(s.max_distance == 0 or s.enabled, f"sgp.max_distance={s.max_distance:g}: caps SGP's group distances, but "
                                              "sgp.enabled=false drops layers uniformly (no distance profile)")
    _check(s.max_distance == 0 or s.p > 0, f"sgp.max_distance={s.max_distance:g}: caps SGP's group distances, but "
                                           "sgp.p=0 turns pruning off (e.g. method=fedpetuning); use method=fedsoda")
    if not s.auto:
        _check(s.remove_layers == 0, f"sgp.remove_layers={s.remove_layers}: only sgp.auto=true uses it; set "
                                     "sgp.auto=true, or give the groups with sgp.n and sgp.p")
        return
    _check(s.enabled, "sgp.auto=true: chooses SGP groups from the distance profile, but sgp.enabled=false drops "
                      "layers uniformly (e.g. method=fedot, fedbiot); set sgp.enabled=true or sgp.auto=false")
    _check(s.p > 0, "sgp.auto=true: sgp.p=0 turns pruning off (e.g. method=fedpetuning); use method=fedsoda or "
                    "sgp.auto=false")
    _check(s.remove_layers >= 1, "sgp.remove_layers: sgp.auto=true needs the number K of emulator layers to "
                                 "remove (>= 1; it chooses n and p with n * p = K), got 0")
    for key in ("n", "p"):
        _check(getattr(s, key) == getattr(default, key),
               f"sgp.{key}={getattr(s, key)}: sgp.auto=true chooses n and p (n * p = sgp.remove_layers="
               f"{s.remove_layers}); leave sgp.{key} at {getattr(default, key)}, or set sgp.auto=false")


def _validate_lora(cfg, module_names: list[str] | None = None) -> None:
    """lora.*; with `module_names` (the Linear layer names of the model's decoder layers) the targets too."""
    c = cfg.lora
    _at_least("lora.r", c.r, 1)
    _check(c.alpha > 0, f"lora.alpha: must be > 0, got {c.alpha}")
    _check(0 <= c.dropout < 1, f"lora.dropout: must be in [0, 1), got {c.dropout}")
    _check(bool(c.target_modules), "lora.target_modules: must name at least one module")
    if module_names is not None:
        # peft matches a target against a module's full name: equal to it or a dotted suffix (self_attn.q_proj)
        choices = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in module_names}))
        for target in c.target_modules:
            _check(any(n == target or n.endswith("." + target) for n in module_names),
                   f"lora.target_modules: '{target}' is not a Linear layer of the model's decoder layers "
                   f"(choose from {choices}), got {','.join(c.target_modules)}")


def _validate_fed(cfg) -> None:
    """fed.*."""
    f = cfg.fed
    _at_least("fed.rounds", f.rounds, 1)
    _at_least("fed.clients", f.clients, 1)
    _check(0 <= f.clients_per_round <= f.clients,
           f"fed.clients_per_round: must be in 0..fed.clients ({f.clients}), got {f.clients_per_round}")
    _at_least("fed.local_steps", f.local_steps, 0)
    _at_least("fed.local_epochs", f.local_epochs, 0)
    _check(f.local_steps > 0 or f.local_epochs >= 1,
           f"fed.local_epochs: must be >= 1 when fed.local_steps = 0, got {f.local_epochs}")
    _at_least("fed.batch_size", f.batch_size, 1)
    _check(f.lr > 0, f"fed.lr: must be > 0, got {f.lr}")
    _at_least("fed.mu", f.mu, 0)
    _at_least("fed.checkpoint_every", f.checkpoint_every, 0)
    _at_least("fed.keep_checkpoints", f.keep_checkpoints, 1)
    _at_least("fed.cache_max_gb", f.cache_max_gb, 0)
    _check(f.stall_timeout == 0 or f.stall_timeout >= 5,
           "fed.stall_timeout: must be 0 (never) or >= 5 seconds (heartbeats come every tenth of it), "
           f"got {f.stall_timeout}")
    _one_of(cfg, "fed.aggregator")
    for key in ("upload_density", "download_density"):
        d = getattr(f, key)
        _check(0 < d <= 1, f"fed.{key}: must be in (0, 1], got {d}")
        _check(d == 1 or f.aggregator != "fedavg",
               f"fed.{key}={d}: sparse transfer needs fed.aggregator=fedsrd or fedsrd-e (FedAvg sends dense LoRA)")


def _validate_eval_debug(cfg) -> None:
    """eval.*, debug.* (output.* is checked against the file system in main.prepare_config)."""
    e, d = cfg.eval, cfg.debug
    _at_least("eval.every", e.every, 0)
    _at_least("eval.max_examples", e.max_examples, 0)
    _at_least("eval.batch_size", e.batch_size, 1)
    _one_of(cfg, "eval.dtype")
    _at_least("eval.k_shot", e.k_shot, 0)
    _at_least("eval.max_new_tokens", e.max_new_tokens, 1)
    _at_least("eval.max_len", e.max_len, 8)
    _at_least("debug.fail_rank", d.fail_rank, -1)
    _at_least("debug.fail_round", d.fail_round, -1)
    _one_of(cfg, "debug.fail_kind")
    if not d.allow_degenerate:
        _degenerate(cfg)


def _degenerate(cfg) -> None:
    """Settings that are legal but make a run meaningless stop with one line unless debug.allow_degenerate=true.
    (A zero LoRA scaling, lora.alpha=0, and targets that match no layer are refused outright by _validate_lora; a
    sgp.max_distance under which no group qualifies stops rank 0 right after SGP, Server.sgp_groups.)"""
    _check(cfg.sgp.p > 0 or cfg.method == "fedpetuning",
           f"sgp.p=0 with method={cfg.method}: the plan removes no layer, so the clients' sub-LLM is the whole "
           "emulator "
           "(nothing compressed, nothing for ODA to align); give sgp.p >= 1, use method=fedpetuning for an "
           "uncompressed baseline, or set debug.allow_degenerate=true to run it anyway")


def _validate_world(cfg, world_size: int) -> None:
    """The checks that need the MPI world size."""
    _check(world_size >= 2, f"world size {world_size}: need rank 0 (server) plus at least one client rank "
                            "(e.g. mpirun -n 3 python -m mpi4py -m fedsoda_mpi.main)")
    _check(cfg.fed.clients >= world_size - 1,
           f"fed.clients={cfg.fed.clients} is fewer than the {world_size - 1} client ranks; "
           f"set fed.clients>={world_size - 1} or launch with -n {cfg.fed.clients + 1}")
    _check(cfg.debug.fail_rank < world_size,
           f"debug.fail_rank: must be -1 (none) or a rank below the world size {world_size}, got {cfg.debug.fail_rank}")


def _validate_layers(cfg, num_layers: int) -> None:
    """The checks that need the model's number of decoder layers."""
    la = cfg.model.adapter_layers or num_layers
    _check(cfg.model.adapter_layers + cfg.model.adapter_first < num_layers,
           f"model.adapter_layers={la} (+ adapter_first={cfg.model.adapter_first}) must be smaller than the "
           f"model's {num_layers} layers")
    emulator = num_layers - la - cfg.model.adapter_first
    if cfg.sgp.p > 0 and not cfg.sgp.enabled:
        _check(cfg.sgp.n * cfg.sgp.p < emulator,
               f"sgp: a uniform drop of n*p={cfg.sgp.n * cfg.sgp.p} layers needs more than the {emulator}-layer "
               "emulator")
    elif cfg.sgp.auto:
        from .sgp import auto_pairs  # torch is loaded by now (main.prepare_config)

        s = cfg.sgp
        cap = f" and n <= sgp.n_max={s.n_max}" if s.n_max else ""
        _check(bool(auto_pairs(s.remove_layers, emulator, s.n_max)),
               f"sgp.remove_layers={s.remove_layers}: no n * p = {s.remove_layers}{cap} fits the {emulator}-layer "
               f"emulator (p groups of n + 1 layers need p * (n + 1) <= {emulator})")
    elif cfg.sgp.p > 0:
        _check(cfg.sgp.p * (cfg.sgp.n + 1) <= emulator,
               f"sgp: p={cfg.sgp.p} groups of n+1={cfg.sgp.n + 1} layers do not fit in the {emulator}-layer emulator")


def validate(cfg, world_size: int | None = None, num_layers: int | None = None,
             module_names: list[str] | None = None) -> None:
    """Value checks of every key that need no model or MPI; `world_size`, `num_layers` and `module_names` (the
    names of the Linear layers in the model's decoder layers, `model_folder.linear_module_names`) add the checks
    that need them. Raises ConfigError with one line naming the key."""
    _finite_numbers(cfg)
    _validate_top(cfg)
    _validate_data(cfg)
    _validate_sgp_oda(cfg)
    _validate_lora(cfg, module_names)
    _validate_fed(cfg)
    _validate_eval_debug(cfg)
    if world_size is not None:
        _validate_world(cfg, world_size)
    if num_layers is not None:
        _validate_layers(cfg, num_layers)


def omp_num_threads(env=None) -> int | None:
    """OMP_NUM_THREADS (the client ranks' torch threads, comm.Comm.torch_threads): None when unset or empty, else a
    positive integer, or an OpenMP list of them ("4,2": the first counts); ConfigError naming it otherwise."""
    value = (os.environ if env is None else env).get("OMP_NUM_THREADS", "")
    if not value.strip():
        return None
    first = value.split(",")[0].strip()
    _check(first.isdigit() and int(first) >= 1,
           f"OMP_NUM_THREADS: must be a positive integer (the client ranks' torch threads), got '{value}'; "
           "unset it or set e.g. OMP_NUM_THREADS=1")
    return int(first)


def check_environment(env=None) -> None:
    """Environment variables the ranks read after start-up, checked before it: OMP_NUM_THREADS."""
    omp_num_threads(env)


def check_run_folder(run_dir: Path, key: str) -> None:
    """The run folder that rank 0 will create must be usable: an existing one a writable directory, a new one
    creatable (its nearest existing parent a writable directory). Nothing is created here. `key` is the
    config key the folder comes from (output.dir, or output.root for output.root/<name>)."""
    _check_folder(Path(run_dir), key, "run")


def check_cache_dir(cfg) -> None:
    """The folder of the emulator cache's disk tier (fed.cache_dir, or the job's local scratch it defaults to)
    must be a writable directory, or creatable; checked only when there is a disk tier (fed.emulator_cache and
    fed.cache_max_gb > 0). Each client rank makes its own subfolder there at its first write."""
    from .paths import scratch_dir

    if not cfg.fed.disk_tier:
        return
    folder, source = scratch_dir(cfg.fed.cache_dir)
    _check_folder(folder, "fed.cache_dir" if cfg.fed.cache_dir else f"fed.cache_dir (default: {source})",
                  "emulator cache")


def _check_folder(folder: Path, key: str, what: str) -> None:
    """An existing `folder` must be a writable directory; a missing one creatable (its nearest existing parent a
    writable directory). ConfigError naming `key` and the "<what> folder" otherwise; nothing is created."""
    try:
        folder.resolve(strict=False)
    except (RuntimeError, OSError) as e:  # RuntimeError: a symlink loop (Python 3.11)
        raise ConfigError(f"{key}: cannot use the {what} folder {folder} ({getattr(e, 'strerror', None) or e})") \
            from None
    try:
        if folder.exists():
            _check(folder.is_dir(), f"{key}: must name a folder for the {what}, got the file {folder}")
            _check(os.access(folder, os.W_OK | os.X_OK), f"{key}: the {what} folder must be writable, got {folder}")
            return
        parent = folder.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    except OSError as e:  # e.g. a parent folder that may not be searched
        raise ConfigError(f"{key}: cannot use the {what} folder {folder} ({e.strerror})") from None
    _check(parent.is_dir(), f"{key}: cannot create the {what} folder {folder}: {parent} is a file")
    _check(os.access(parent, os.W_OK | os.X_OK),
           f"{key}: cannot create the {what} folder {folder}: {parent} is not writable")

