"""Run configuration: dataclass sections + YAML + dotted `key=value` overrides, validated before MPI work.

    python -m fedsoda_mpi.main --config jobs/smollm2_sst2_iid.yaml fed.rounds=2 lora.r=4 method=fedsoda

Every rank parses and validates the same files and arguments, so a bad config fails identically on
all ranks with one line and exit code 2 before any collective is entered (`main.prepare_config`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .methods import METHODS, PRESETS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JOB = ROOT / "jobs" / "smollm2_sst2_iid.yaml"
TASKS = ("sst2", "boolq", "gsm8k")
PUBLIC_SETS = ("wikitext2", "gsm8k", "self")  # data.public; self: text the full LLM generates (data.self_public)


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
    task: str = "sst2"  # the task the clients train on and the model is evaluated on: sst2 | boolq | gsm8k | custom (your own dataset: data.custom, docs/datasets.md)
    custom: str = ""  # data.task=custom: the task folder, a name under <data>/custom/ or a path (docs/datasets.md)
    public: str = "wikitext2"  # D_public for SGP and ODA: wikitext2 | gsm8k (train split, disjoint from eval) |
    #                            self (text the full LLM samples itself, cached in <run>/public_self.jsonl)
    split: str = "iid"  # iid | dirichlet (label skew)
    dirichlet_beta: float = 0.5  # data.split=dirichlet: concentration of the label skew (smaller: more skewed)
    max_len: int = 128  # tokens per training example
    max_train_per_client: int = 0  # 0 = the client's whole partition
    pooled_clients: int = 0  # K > 0: partition over K clients as usual, then pool it all into the one client
    #                          (fed.clients=1): a centralized run on the same examples and steps as K clients
    val_size: int = 500  # validation rows held out of the training file (fixed rows, data.VAL_SEED); no client
    #                      trains on them; per-round evaluation and learning-rate selection use them (0 = none)
    public_samples: int = 64  # paragraphs of D_public used for SGP and pre-alignment (public=self: texts generated)
    public_max_len: int = 128  # tokens per public text (SGP, alignment, KL, drift probe); longer texts are cut
    self_temperature: float = 0.8  # public=self: sampling temperature of the full LLM (> 0)
    self_max_new_tokens: int = 64  # public=self: tokens generated after each generic prompt
    self_batch_size: int = 16  # public=self: prompts per batched generate() call


@dataclass
class SGPConfig:
    enabled: bool = True  # False: uniform layer drop instead (ablation / FedOT, FedBiOT)
    n: int = 3  # layers pruned per group
    p: int = 4  # number of groups
    token: str = "last"  # last | all: which tokens the angular distance is averaged over
    spacing: str = "round"  # uniform drop (sgp.enabled=false): round (offsite-tuning) | int (FederatedScope)
    n_max: int = 0  # distance profile computed for n = 1..n_max (0 = max(n, 4); auto: the largest group size tried)
    auto: bool = False  # choose (n, p) with n * p = remove_layers from the distance profile (sgp.choose_auto)
    remove_layers: int = 0  # K, the emulator layers auto removes (an upper bound when max_distance is set)
    max_distance: float = 0.0  # prune only groups with d(x^t, x^{t+n}) <= max_distance (0 = off; sgp.py docstring)


@dataclass
class ODAConfig:
    pre_align: bool = True  # align M* to the full LLM once before round 1 (pre-alignment, E_p epochs)
    re_align: bool = True  # re-align M* during training (oda.trigger) and send the emulator LoRA again
    every: int = 5  # r: re-align every r rounds (oda.trigger=every)
    trigger: str = "every"  # every: every r rounds | drift: when the output drift probe (KL on the held-out probe
    #                         batch) after a round exceeds drift_threshold x its value just after the last alignment
    drift_threshold: float = 2.0  # tau (> 1) of oda.trigger=drift
    max_interval: int = 0  # oda.trigger=drift: also re-align when this many rounds passed since the last alignment (0 = never)
    pre_epochs: int = 1  # E_p
    re_epochs: int = 1  # E_r
    re_samples: int = 32  # random public paragraphs per re-alignment
    alpha: float = 1.0  # weight of L_rep (eq. 8)
    beta: float = 1.0  # weight of L_KL (eq. 8)
    lr: float = 1e-4  # learning rate of the alignment (AdamW on the emulator LoRA)
    batch_size: int = 4  # public texts per alignment step (also per batch of SGP's profile and the KL probes)


@dataclass
class LoraConfig:
    r: int = 8  # LoRA rank
    alpha: int = 16  # LoRA scaling alpha (the update is scaled by alpha / r)
    dropout: float = 0.05  # LoRA dropout
    target_modules: list = field(  # Linear layers of each decoder layer that get LoRA (comma-separated)
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def kwargs(self) -> dict:
        """Keyword arguments of `models.add_lora` (the same LoRA on the server's and the clients' models)."""
        return dict(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=list(self.target_modules))


@dataclass
class QuantConfig:
    enabled: bool = True  # NF4 sub-LLM on the clients (QLoRA)
    compute_dtype: str = "float32"  # dtype the NF4 layers compute in (bitsandbytes bnb_4bit_compute_dtype)
    double_quant: bool = True  # quantize the NF4 scales too (bitsandbytes double quantization)
    embed_bits: int = 16  # the sub-LLM's frozen input embedding and LM head: 16 (the model's dtype) | 8 (int8 rows) |
    #                       4 (NF4); server's M* and the clients' copy alike (fedsoda_mpi/quantize.py)


@dataclass
class FedConfig:
    rounds: int = 10  # T: federated rounds
    clients: int = 10  # N virtual clients, spread over the client ranks
    clients_per_round: int = 0  # 0 = all clients every round
    local_steps: int = 10  # optimizer steps per round; 0 = run local_epochs full epochs
    local_epochs: int = 1  # H (used when local_steps = 0)
    batch_size: int = 4  # examples per local step
    lr: float = 1e-4  # local learning rate (AdamW, betas 0.9 / 0.95)
    mu: float = 0.01  # proximal weight (eq. 9)
    emulator_cache: bool = True  # cache the frozen sub-emulator's outputs between re-alignments
    cache_dir: str = ""  # node-local folder of the cache's disk tier ("": $SLURM_TMPDIR, else $TMPDIR, else /tmp)
    cache_max_gb: float = 0.0  # disk tier cap per client rank, GB (10^9 bytes), LRU eviction; 0 = no disk tier (opt-in)
    checkpoint_every: int = 1  # rounds between checkpoints (0: none; resume=auto then has nothing to resume from)
    keep_checkpoints: int = 2  # newest checkpoints kept (>= 1; with 2 or more a corrupted newest one has a fallback)
    aggregator: str = "fedavg"  # fedavg | fedsrd | fedsrd-e (fedsoda_mpi/fedsrd.py)
    upload_density: float = 1.0  # fedsrd*: fraction of each LoRA update tensor a client uploads
    download_density: float = 1.0  # fedsrd*: fraction of the global update the server broadcasts
    stall_timeout: float = 1800.0  # seconds a rank may give no heartbeat before a waiting rank ends the job (0: never)

    @property
    def disk_tier(self) -> bool:
        """Whether client ranks spill the emulator cache to disk (fed.emulator_cache and fed.cache_max_gb > 0)."""
        return self.emulator_cache and self.cache_max_gb > 0


@dataclass
class EvalConfig:
    every: int = 5  # evaluate the full LLM + adapter on the validation rows every k rounds (0 = only at the end)
    max_examples: int = 200  # test examples of the final evaluation (the first ones; bounds CPU time); 0 = all
    batch_size: int = 8  # examples per evaluation forward (GSM8K: questions per generate() call)
    dtype: str = "float32"  # float32 | bfloat16: evaluation forwards under autocast (bfloat16: ~2.5x faster on CPUs with AVX512-BF16)
    base: bool = True  # evaluate the base model (round 0) on the test split; a study evaluates it once per task
    k_shot: int = 4  # GSM8K shots
    max_new_tokens: int = 256  # GSM8K: tokens generated per answer at most (greedy decoding)
    max_len: int = 512  # tokens of an evaluation prompt (SST-2 / BoolQ), of each GSM8K shot (question + solution) and
    #                     each GSM8K question; longer rows are cut as training rows are (fedsoda_mpi/lengths.py), so
    #                     a batch holds at most batch_size x (k_shot + 1) x max_len (+ max_new_tokens) tokens


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
    deterministic: bool = False  # deterministic kernels (devices.deterministic): bit-identical repeats on one GPU
    allow_degenerate: bool = False  # run settings that are legal but make the run meaningless (config._degenerate)


@dataclass
class Config:
    method: str = "fedsoda"  # the method preset (fedsoda_mpi/methods.py), applied before the job file
    seed: int = 0  # seeds the client split, sampling, batch order and dropout (every draw: seed, round, client)
    resume: str = "none"  # none | auto: continue from the run folder's newest valid checkpoint (output.dir), else start
    device: str = "auto"  # auto | cuda | cpu: each rank's compute device (fedsoda_mpi/devices.py)
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


def flatten(d: dict, prefix: str = "") -> dict:
    """{"fed": {"rounds": 2}} -> {"fed.rounds": 2}; a key given both nested and dotted raises ConfigError."""
    out = {}
    for k, v in d.items():
        items = flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        for key, value in items.items():
            if key in out:
                raise ConfigError(f"key '{key}' is given twice (once nested, once dotted); keep one")
            out[key] = value
    return out


def parse_override(arg: str) -> tuple[str, str]:
    if "=" not in arg:
        raise ConfigError(f"bad argument '{arg}': overrides are key=value (e.g. fed.rounds=2)")
    key, value = arg.split("=", 1)
    return key.strip(), value


class _DuplicateKey(Exception):
    """A YAML mapping key given twice: (dotted key, first line, second line)."""


def _unique_keys(node, prefix: str = "", seen_nodes: set | None = None) -> None:
    """Raise _DuplicateKey if any mapping of the composed YAML tree has a key twice (PyYAML keeps the last)."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias to a node already walked (or a recursive structure)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key != "<<":
                if key in lines:
                    raise _DuplicateKey(f"{prefix}{key}", lines[key], key_node.start_mark.line + 1)
                lines[key] = key_node.start_mark.line + 1
            _unique_keys(value_node, f"{prefix}{key}." if key else prefix, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _unique_keys(item, prefix, seen_nodes)


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key given twice instead of silently keeping the last value."""

    def construct_document(self, node):
        _unique_keys(node)
        return super().construct_document(node)


def read_yaml(path: Path):
    """Parse a job YAML file; ConfigError naming the file (and line) for a non-UTF-8 byte, bad YAML, a key
    given twice or an empty file (which would otherwise silently run the defaults)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)
    except _DuplicateKey as e:
        key, first, again = e.args
        raise ConfigError(f"{path}:{again}: key '{key}' is given twice (first on line {first}); keep one") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        raise ConfigError(f"{path}: is empty (no settings); give it at least one key, or leave out --config to "
                          f"run the default job {DEFAULT_JOB.name}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults < method preset < YAML file (default: jobs/smollm2_sst2_iid.yaml) < `key=value` overrides.

    The method (`method=` on the command line, else the file's `method:`) picks the preset; every key the job file
    or the command line gives explicitly wins over it (`method=fedpetuning model.adapter_layers=3`: LoRA on the last
    3 layers). The shipped job files leave the keys a preset owns (methods.PRESETS) to the presets, so one job file
    serves every method. A run's saved config.yaml, given as the job file, resolves to exactly that run's settings."""
    path = Path(path) if path else DEFAULT_JOB
    flat = job_keys(path)
    cfg = Config()
    method = dict(parse_override(a) for a in overrides).get("method", flat.get("method", cfg.method))
    if method not in PRESETS:
        raise ConfigError(f"method: '{method}' is not one of {', '.join(PRESETS)}")
    for key, value in PRESETS[method].items():  # the method's defaults ...
        set_key(cfg, key, value)
    for key, value in flat.items():  # ... then what the job file says ...
        set_key(cfg, key, value)
    for arg in overrides:  # ... then the command line (ablations: method=fedbiot oda.re_align=false)
        set_key(cfg, *parse_override(arg))
    cfg.job = str(path)
    validate(cfg)
    return cfg


def job_keys(path: Path) -> dict:
    """The dotted keys of a job YAML file; ConfigError for a folder, a missing file or bad YAML."""
    if path.is_dir():
        raise ConfigError(f"--config {path}: is a folder; give a job YAML file (e.g. jobs/smollm2_sst2_iid.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = read_yaml(path)
    try:
        return flatten(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def preset_keys_set_by_job(cfg: Config) -> list[str]:
    """The keys of cfg.method's preset whose value in cfg comes from the job file and differs from the preset's,
    e.g. ["oda.every=5 (the fedbiot preset: 1)"]: the run log names them. None in the shipped job files."""
    try:
        job, resolved = job_keys(Path(cfg.job)), flatten(cfg.to_dict())
    except ConfigError:  # the file is gone or was edited into bad YAML since the start: nothing to name
        return []
    out = []
    for key, value in PRESETS.get(cfg.method, {}).items():
        if key in job:
            from_job = Config()
            set_key(from_job, key, job[key])
            got = flatten(from_job.to_dict())[key]
            if got == resolved[key] != value:  # (not when the command line set the key)
                out.append(f"{key}={got} (the {cfg.method} preset: {value})")
    return out


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    """`key` must be one of `choices` (a string key)."""
    expected = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
    _check(value in choices, f"{key}: expected {expected}, got '{value}'")


def _at_least(key: str, value, low) -> None:
    _check(value >= low, f"{key}: must be >= {low}, got {value}")


def _finite_numbers(cfg: Config) -> None:
    """Every float key must be a finite number: `fed.lr=inf` would otherwise pass `> 0` and train nothing."""
    for key, value in flatten(cfg.to_dict()).items():
        if isinstance(value, float):
            _check(math.isfinite(value), f"{key}: must be a finite number, got {value}")


def _validate_top(cfg: Config) -> None:
    """method, seed, resume, model.*, quant.*."""
    _check(cfg.method in METHODS, f"method: '{cfg.method}' is not one of {', '.join(METHODS)}")
    _check(0 <= cfg.seed < 2**32, f"seed: must be in [0, 2**32), got {cfg.seed}")  # numpy seeds are unsigned
    _one_of("resume", cfg.resume, ("none", "auto"))
    _one_of("device", cfg.device, ("auto", "cuda", "cpu"))
    _check(bool(cfg.model.name.strip()), "model.name: must name a prepared model or a model folder, got ''")
    _one_of("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16"))
    _at_least("model.adapter_layers", cfg.model.adapter_layers, 0)
    _at_least("model.adapter_first", cfg.model.adapter_first, 0)
    _one_of("quant.compute_dtype", cfg.quant.compute_dtype, ("float32", "bfloat16", "float16"))
    _check(cfg.quant.embed_bits in (16, 8, 4) and (cfg.quant.enabled or cfg.quant.embed_bits == 16),
           f"quant.embed_bits: must be 16, 8 or 4 (8 and 4 need quant.enabled=true), got {cfg.quant.embed_bits}")
    name = cfg.output.name
    _check(not name or (name not in (".", "..") and "/" not in name and "\\" not in name),
           f"output.name: must be a plain folder name under output.root (no '/', not '.' or '..'; use output.dir for a "
           f"path), got '{name}'")


def _validate_data(cfg: Config) -> None:
    """data.* (the checks that need the files themselves are in main.prepare_inputs)."""
    d = cfg.data
    _check(d.task in (*TASKS, "custom"), f"data.task: '{d.task}' is not one of {', '.join(TASKS)}, custom")
    _check(d.task != "custom" or bool(d.custom.strip()),
           "data.custom: data.task=custom needs the custom task's folder (a name under <data>/custom/ or a path; "
           "docs/datasets.md)")
    _check(d.task == "custom" or not d.custom,
           f"data.custom='{d.custom}': only data.task=custom reads it; set data.task=custom, or leave it empty")
    _one_of("data.public", d.public, PUBLIC_SETS)
    _one_of("data.split", d.split, ("iid", "dirichlet"))
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


def _validate_sgp_oda(cfg: Config) -> None:
    """sgp.* and oda.* (the checks against the model's layer count are in _validate_layers)."""
    s, o = cfg.sgp, cfg.oda
    _at_least("sgp.n", s.n, 1)
    _at_least("sgp.p", s.p, 0)
    _at_least("sgp.n_max", s.n_max, 0)
    _check(s.auto or s.n_max == 0 or s.n_max >= s.n,
           f"sgp.n_max: must be 0 (automatic) or >= sgp.n ({s.n}), got {s.n_max}")
    _one_of("sgp.token", s.token, ("last", "all"))
    _one_of("sgp.spacing", s.spacing, ("round", "int"))
    _validate_sgp_auto(cfg)
    _check(o.every >= 1, f"oda.every: the re-alignment interval r must be >= 1, got {o.every}")
    _one_of("oda.trigger", o.trigger, ("every", "drift"))
    _check(o.drift_threshold > 1, f"oda.drift_threshold: the ratio tau must be > 1, got {o.drift_threshold}")
    _at_least("oda.max_interval", o.max_interval, 0)
    _check(o.max_interval == 0 or o.trigger == "drift",
           f"oda.max_interval={o.max_interval}: applies to oda.trigger=drift only (oda.trigger=every re-aligns every "
           "oda.every rounds); set oda.trigger=drift, or leave oda.max_interval at 0")
    _check(o.trigger == "every" or o.re_align,
           "oda.trigger=drift: re-alignment is off (oda.re_align=false); set oda.re_align=true, or leave oda.trigger=every")
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


def _validate_sgp_auto(cfg: Config) -> None:
    """sgp.auto, sgp.remove_layers, sgp.max_distance and how they combine with sgp.n / sgp.p / sgp.enabled (the
    check against the emulator's size is in _validate_layers)."""
    s, default = cfg.sgp, SGPConfig()
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


def _validate_lora(cfg: Config, module_names: list[str] | None = None) -> None:
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


def _validate_fed(cfg: Config) -> None:
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
           f"fed.stall_timeout: must be 0 (never) or >= 5 seconds (heartbeats come every tenth of it), got {f.stall_timeout}")
    _one_of("fed.aggregator", f.aggregator, ("fedavg", "fedsrd", "fedsrd-e"))
    for key in ("upload_density", "download_density"):
        d = getattr(f, key)
        _check(0 < d <= 1, f"fed.{key}: must be in (0, 1], got {d}")
        _check(d == 1 or f.aggregator != "fedavg",
               f"fed.{key}={d}: sparse transfer needs fed.aggregator=fedsrd or fedsrd-e (FedAvg sends dense LoRA)")


def _validate_eval_debug(cfg: Config) -> None:
    """eval.*, debug.* (output.* is checked against the file system in main.prepare_config)."""
    e, d = cfg.eval, cfg.debug
    _at_least("eval.every", e.every, 0)
    _at_least("eval.max_examples", e.max_examples, 0)
    _at_least("eval.batch_size", e.batch_size, 1)
    _one_of("eval.dtype", e.dtype, ("float32", "bfloat16"))
    _at_least("eval.k_shot", e.k_shot, 0)
    _at_least("eval.max_new_tokens", e.max_new_tokens, 1)
    _at_least("eval.max_len", e.max_len, 8)
    _at_least("debug.fail_rank", d.fail_rank, -1)
    _at_least("debug.fail_round", d.fail_round, -1)
    _one_of("debug.fail_kind", d.fail_kind, ("raise", "oom", "nan"))
    if not d.allow_degenerate:
        _degenerate(cfg)


def _degenerate(cfg: Config) -> None:
    """Settings that are legal but make a run meaningless stop with one line unless debug.allow_degenerate=true.
    (A zero LoRA scaling, lora.alpha=0, and targets that match no layer are refused outright by _validate_lora; a
    sgp.max_distance under which no group qualifies stops rank 0 right after SGP, Server.sgp_groups.)"""
    _check(cfg.sgp.p > 0 or cfg.method == "fedpetuning",
           f"sgp.p=0 with method={cfg.method}: the plan removes no layer, so the clients' sub-LLM is the whole emulator "
           "(nothing compressed, nothing for ODA to align); give sgp.p >= 1, use method=fedpetuning for an "
           "uncompressed baseline, or set debug.allow_degenerate=true to run it anyway")


def _validate_world(cfg: Config, world_size: int) -> None:
    """The checks that need the MPI world size."""
    _check(world_size >= 2, f"world size {world_size}: need rank 0 (server) plus at least one client rank "
                            "(e.g. mpirun -n 3 python -m mpi4py -m fedsoda_mpi.main)")
    _check(cfg.fed.clients >= world_size - 1,
           f"fed.clients={cfg.fed.clients} is fewer than the {world_size - 1} client ranks; "
           f"set fed.clients>={world_size - 1} or launch with -n {cfg.fed.clients + 1}")
    _check(cfg.debug.fail_rank < world_size,
           f"debug.fail_rank: must be -1 (none) or a rank below the world size {world_size}, got {cfg.debug.fail_rank}")


def _validate_layers(cfg: Config, num_layers: int) -> None:
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


def validate(cfg: Config, world_size: int | None = None, num_layers: int | None = None,
             module_names: list[str] | None = None) -> None:
    """Value checks of every key that need no model or MPI; `world_size`, `num_layers` and `module_names` (the
    names of the Linear layers in the model's decoder layers, `models.linear_module_names`) add the checks
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


def check_cache_dir(cfg: Config) -> None:
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


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
