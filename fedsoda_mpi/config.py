"""Run configuration: dataclass sections + YAML + dotted `key=value` overrides, validated before MPI work.

    python -m fedsoda_mpi.main --config jobs/smollm2_sst2_iid.yaml fed.rounds=2 lora.r=4 method=fedsoda

Every rank parses and validates the same files and arguments, so a bad config fails identically on
all ranks with one line and exit code 2 before any collective is entered (see `main.py`).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .methods import PRESETS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JOB = ROOT / "jobs" / "smollm2_sst2_iid.yaml"
METHODS = tuple(PRESETS)
TASKS = ("sst2", "boolq", "gsm8k")


class ConfigError(ValueError):
    """A bad configuration value; the message is the one line the user sees."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # a prepared model name under $FEDSODA_MODELS, or a path to an HF folder
    dtype: str = "float32"  # dtype of the full model on the server: float32 | bfloat16 | float16
    adapter_layers: int = 3  # L_A: the last L_A decoder layers form the adapter (0 = all layers)
    adapter_first: int = 0  # ... plus this many bottom layers (FedOT: 1)


@dataclass
class DataConfig:
    task: str = "sst2"  # sst2 | boolq | gsm8k
    public: str = "wikitext2"  # D_public for SGP and ODA: wikitext2 | gsm8k (train split, disjoint from eval)
    split: str = "iid"  # iid | dirichlet (label skew)
    dirichlet_beta: float = 0.5
    max_len: int = 128  # tokens per training example
    max_train_per_client: int = 0  # 0 = the client's whole partition
    pooled_clients: int = 0  # K > 0: partition over K clients as usual, then pool it all into the one client
    #                          (fed.clients=1): a centralized run on the same examples and steps as K clients
    val_size: int = 500  # validation rows held out of the training file (fixed rows, data.VAL_SEED); no client
    #                      trains on them; per-round evaluation and learning-rate selection use them (0 = none)
    public_samples: int = 64  # paragraphs of D_public used for SGP and pre-alignment
    public_max_len: int = 128


@dataclass
class SGPConfig:
    enabled: bool = True  # False: uniform layer drop instead (ablation / FedOT, FedBiOT)
    n: int = 3  # layers pruned per group
    p: int = 4  # number of groups
    token: str = "last"  # last | all: which tokens the angular distance is averaged over
    spacing: str = "round"  # uniform drop (sgp.enabled=false): round (offsite-tuning) | int (FederatedScope)
    n_max: int = 0  # distance profile computed for n = 1..n_max (0 = max(n, 4))


@dataclass
class ODAConfig:
    pre_align: bool = True
    re_align: bool = True
    every: int = 5  # r: re-align every r rounds
    pre_epochs: int = 1  # E_p
    re_epochs: int = 1  # E_r
    re_samples: int = 32  # random public paragraphs per re-alignment
    alpha: float = 1.0  # weight of L_rep (eq. 8)
    beta: float = 1.0  # weight of L_KL (eq. 8)
    lr: float = 1e-4
    batch_size: int = 4


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class QuantConfig:
    enabled: bool = True  # NF4 sub-LLM on the clients (QLoRA)
    compute_dtype: str = "float32"
    double_quant: bool = True


@dataclass
class FedConfig:
    rounds: int = 10
    clients: int = 10  # N virtual clients, spread over the client ranks
    clients_per_round: int = 0  # 0 = all clients every round
    local_steps: int = 10  # optimizer steps per round; 0 = run local_epochs full epochs
    local_epochs: int = 1  # H (used when local_steps = 0)
    batch_size: int = 4
    lr: float = 1e-4
    mu: float = 0.01  # proximal weight (eq. 9)
    emulator_cache: bool = True  # cache the frozen sub-emulator's outputs between re-alignments
    checkpoint_every: int = 1  # rounds between checkpoints (0: none; resume=auto then has nothing to resume from)
    keep_checkpoints: int = 2  # newest checkpoints kept (>= 2, so a corrupted newest one has a fallback)
    aggregator: str = "fedavg"  # fedavg | fedsrd | fedsrd-e (fedsoda_mpi/fedsrd.py)
    upload_density: float = 1.0  # fedsrd*: fraction of each LoRA update tensor a client uploads
    download_density: float = 1.0  # fedsrd*: fraction of the global update the server broadcasts


@dataclass
class EvalConfig:
    every: int = 5  # evaluate the full LLM + adapter on the validation rows every k rounds (0 = only at the end)
    max_examples: int = 200  # test examples of the final evaluation (the first ones; bounds CPU time); 0 = all
    batch_size: int = 8
    dtype: str = "float32"  # float32 | bfloat16: evaluation forwards under autocast (bfloat16: ~2.5x faster on CPUs with AVX512-BF16)
    base: bool = True  # evaluate the base model (round 0) on the test split; a study evaluates it once per task
    k_shot: int = 4  # GSM8K shots
    max_new_tokens: int = 256


@dataclass
class OutputConfig:
    root: str = "runs"  # run folders go under here ...
    dir: str = ""  # ... unless this names the run folder explicitly
    name: str = ""  # run name (default: <job>-<method>-<timestamp>)


@dataclass
class DebugConfig:
    fail_rank: int = -1  # inject an exception on this rank ...
    fail_round: int = -1  # ... in this round (tests of the abort path)
    fail_kind: str = "raise"  # raise: an exception; oom: a simulated out-of-memory; nan: a client uploads NaN


@dataclass
class Config:
    method: str = "fedsoda"
    seed: int = 0
    resume: str = "none"  # none | auto
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sgp: SGPConfig = field(default_factory=SGPConfig)
    oda: ODAConfig = field(default_factory=ODAConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    job: str = ""  # the YAML file this config came from (set by load_config)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _all_keys(obj, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _coerce(key: str, raw, current, typ):
    """Convert a YAML or command-line value to the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(typ) or typ
    if origin is list or isinstance(current, list):
        if isinstance(raw, str):
            raw = [s for s in raw.split(",") if s]
        if not isinstance(raw, list):
            raise ConfigError(f"{key}: expected a list (comma-separated on the command line), got {raw!r}")
        return [str(x) for x in raw]
    if origin is bool or isinstance(current, bool):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return raw.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {raw!r}")
    if origin is int or isinstance(current, int):
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {raw!r}")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None
    if origin is float or isinstance(current, float):
        if isinstance(raw, bool):
            raise ConfigError(f"{key}: expected a number, got {raw!r}")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {raw!r}") from None
    if isinstance(raw, (dict, list)):
        raise ConfigError(f"{key}: expected a string, got {raw!r}")
    return "" if raw is None else str(raw)


def set_key(cfg: Config, key: str, raw) -> None:
    """Set a dotted key (e.g. `fed.rounds`) with type checking; unknown keys get a closest-match hint."""
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(obj)}
        if part not in names:
            close = difflib.get_close_matches(key, _all_keys(cfg), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        value = getattr(obj, part)
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(value):
                raise ConfigError(f"unknown config key '{key}': '{'.'.join(parts[:i + 1])}' is not a section")
            obj = value
        else:
            if dataclasses.is_dataclass(value):
                raise ConfigError(f"config key '{key}' is a section; set one of its keys, e.g. '{key}.{dataclasses.fields(value)[0].name}'")
            hints = typing.get_type_hints(type(obj))
            setattr(obj, part, _coerce(key, raw, value, hints[part]))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_override(arg: str) -> tuple[str, str]:
    if "=" not in arg:
        raise ConfigError(f"bad argument '{arg}': overrides are key=value (e.g. fed.rounds=2)")
    key, value = arg.split("=", 1)
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults < YAML file (default: jobs/smollm2_sst2_iid.yaml) < method preset < `key=value` overrides.

    The preset sits above the job file so that one job file serves every method (`method=fedbiot`
    sets oda.every=1 even though the file says 5); the command line can still change any key."""
    path = Path(path) if path else DEFAULT_JOB
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    cfg = Config()
    flat = _flatten(data)
    method = dict(parse_override(a) for a in overrides).get("method", flat.get("method", cfg.method))
    if method not in PRESETS:
        raise ConfigError(f"method: '{method}' is not one of {', '.join(PRESETS)}")
    for key, value in flat.items():
        set_key(cfg, key, value)
    for key, value in PRESETS[method].items():  # the keys a method owns win over the job file ...
        set_key(cfg, key, value)
    for arg in overrides:  # ... and the command line wins over both (ablations: method=fedbiot oda.re_align=false)
        set_key(cfg, *parse_override(arg))
    cfg.job = str(path)
    validate(cfg)
    return cfg


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config, world_size: int | None = None, num_layers: int | None = None) -> None:
    """Value checks that need no model or MPI; `world_size` and `num_layers` add the checks that need them."""
    _check(cfg.method in METHODS, f"method: '{cfg.method}' is not one of {', '.join(METHODS)}")
    _check(cfg.resume in ("none", "auto"), f"resume: expected none or auto, got '{cfg.resume}'")
    _check(cfg.data.task in TASKS, f"data.task: '{cfg.data.task}' is not one of {', '.join(TASKS)}")
    _check(cfg.data.public in ("wikitext2", "gsm8k"), f"data.public: expected wikitext2 or gsm8k, got '{cfg.data.public}'")
    _check(cfg.data.split in ("iid", "dirichlet"), f"data.split: expected iid or dirichlet, got '{cfg.data.split}'")
    _check(cfg.data.dirichlet_beta > 0, f"data.dirichlet_beta: must be > 0, got {cfg.data.dirichlet_beta}")
    _check(cfg.data.val_size >= 0, f"data.val_size: must be >= 0, got {cfg.data.val_size}")
    _check(cfg.data.pooled_clients >= 0, f"data.pooled_clients: must be >= 0, got {cfg.data.pooled_clients}")
    _check(cfg.data.pooled_clients == 0 or cfg.fed.clients == 1,
           f"data.pooled_clients={cfg.data.pooled_clients}: pools every partition into one client; set fed.clients=1")
    _check(cfg.eval.dtype in ("float32", "bfloat16"), f"eval.dtype: expected float32 or bfloat16, got '{cfg.eval.dtype}'")
    _check(cfg.eval.batch_size >= 1, f"eval.batch_size: must be >= 1, got {cfg.eval.batch_size}")
    _check(cfg.data.max_len >= 8, f"data.max_len: must be >= 8, got {cfg.data.max_len}")
    _check(cfg.data.public_samples >= 1, f"data.public_samples: must be >= 1, got {cfg.data.public_samples}")
    _check(cfg.model.dtype in ("float32", "bfloat16", "float16"), f"model.dtype: unsupported '{cfg.model.dtype}'")
    _check(cfg.quant.compute_dtype in ("float32", "bfloat16", "float16"),
           f"quant.compute_dtype: unsupported '{cfg.quant.compute_dtype}'")
    _check(cfg.model.adapter_layers >= 0, f"model.adapter_layers: must be >= 0, got {cfg.model.adapter_layers}")
    _check(cfg.sgp.n >= 1 and cfg.sgp.p >= 0, f"sgp: need n >= 1 and p >= 0, got n={cfg.sgp.n} p={cfg.sgp.p}")
    _check(cfg.sgp.token in ("last", "all"), f"sgp.token: expected last or all, got '{cfg.sgp.token}'")
    _check(cfg.sgp.spacing in ("round", "int"), f"sgp.spacing: expected round or int, got '{cfg.sgp.spacing}'")
    _check(cfg.model.adapter_first >= 0, f"model.adapter_first: must be >= 0, got {cfg.model.adapter_first}")
    _check(cfg.oda.every >= 1, f"oda.every: the re-alignment interval r must be >= 1, got {cfg.oda.every}")
    _check(cfg.oda.pre_epochs >= 0 and cfg.oda.re_epochs >= 0, "oda.pre_epochs / oda.re_epochs: must be >= 0")
    _check(cfg.lora.r >= 1, f"lora.r: must be >= 1, got {cfg.lora.r}")
    _check(bool(cfg.lora.target_modules), "lora.target_modules: must name at least one module")
    _check(cfg.fed.rounds >= 1, f"fed.rounds: must be >= 1, got {cfg.fed.rounds}")
    _check(cfg.fed.clients >= 1, f"fed.clients: must be >= 1, got {cfg.fed.clients}")
    _check(0 <= cfg.fed.clients_per_round <= cfg.fed.clients,
           f"fed.clients_per_round: must be in 0..fed.clients ({cfg.fed.clients}), got {cfg.fed.clients_per_round}")
    _check(cfg.fed.local_steps >= 0, f"fed.local_steps: must be >= 0, got {cfg.fed.local_steps}")
    _check(cfg.fed.local_steps > 0 or cfg.fed.local_epochs >= 1, "fed.local_epochs: must be >= 1 when fed.local_steps = 0")
    _check(cfg.fed.batch_size >= 1, f"fed.batch_size: must be >= 1, got {cfg.fed.batch_size}")
    _check(cfg.fed.lr > 0, f"fed.lr: must be > 0, got {cfg.fed.lr}")
    _check(cfg.fed.mu >= 0, f"fed.mu: must be >= 0, got {cfg.fed.mu}")
    _check(cfg.fed.aggregator in ("fedavg", "fedsrd", "fedsrd-e"),
           f"fed.aggregator: expected fedavg, fedsrd or fedsrd-e, got '{cfg.fed.aggregator}'")
    for key in ("upload_density", "download_density"):
        d = getattr(cfg.fed, key)
        _check(0 < d <= 1, f"fed.{key}: must be in (0, 1], got {d}")
        _check(d == 1 or cfg.fed.aggregator != "fedavg",
               f"fed.{key}={d}: sparse transfer needs fed.aggregator=fedsrd or fedsrd-e (FedAvg sends dense LoRA)")
    _check(cfg.fed.checkpoint_every >= 0, f"fed.checkpoint_every: must be >= 0, got {cfg.fed.checkpoint_every}")
    _check(cfg.debug.fail_kind in ("raise", "oom", "nan"),
           f"debug.fail_kind: expected raise, oom or nan, got '{cfg.debug.fail_kind}'")
    _check(cfg.fed.keep_checkpoints >= 1, f"fed.keep_checkpoints: must be >= 1, got {cfg.fed.keep_checkpoints}")
    _check(cfg.eval.every >= 0 and cfg.eval.max_examples >= 0, "eval.every / eval.max_examples: must be >= 0")
    if world_size is not None:
        _check(world_size >= 2, f"world size {world_size}: need rank 0 (server) plus at least one client rank "
                                "(e.g. mpirun -n 3 python -m mpi4py -m fedsoda_mpi.main)")
        _check(cfg.fed.clients >= world_size - 1,
               f"fed.clients={cfg.fed.clients} is fewer than the {world_size - 1} client ranks; "
               f"set fed.clients>={world_size - 1} or launch with -n {cfg.fed.clients + 1}")
    if num_layers is not None:
        la = cfg.model.adapter_layers or num_layers
        _check(cfg.model.adapter_layers + cfg.model.adapter_first < num_layers,
               f"model.adapter_layers={la} (+ adapter_first={cfg.model.adapter_first}) must be smaller than the "
               f"model's {num_layers} layers")
        emulator = num_layers - la - cfg.model.adapter_first
        if cfg.sgp.p > 0 and not cfg.sgp.enabled:
            _check(cfg.sgp.n * cfg.sgp.p < emulator,
                   f"sgp: a uniform drop of n*p={cfg.sgp.n * cfg.sgp.p} layers needs more than the {emulator}-layer emulator")
        elif cfg.sgp.p > 0:
            _check(cfg.sgp.p * (cfg.sgp.n + 1) <= emulator,
                   f"sgp: p={cfg.sgp.p} groups of n+1={cfg.sgp.n + 1} layers do not fit in the {emulator}-layer emulator")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
