"""Run configuration: dataclass sections + YAML + dotted `key=value` overrides, validated before MPI work.

    python -m fedsoda_mpi.main --config jobs/smollm2_sst2_iid.yaml fed.rounds=2 lora.r=4 method=fedsoda

Every rank parses and validates the same files and arguments, so a bad config fails identically on
all ranks with one line and exit code 2 before any collective is entered (`main.prepare_config`).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from .methods import PRESETS
from .validation import ConfigError, leaves, validate

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JOB = ROOT / "jobs" / "smollm2_sst2_iid.yaml"

# The choices of a key are the arguments of its Literal type; validation._one_of reads them from there.
Dtype = Literal["float32", "bfloat16", "float16"]
Task = Literal["sst2", "boolq", "gsm8k", "custom"]  # custom: a task folder of your own (data.custom)
PublicSet = Literal["wikitext2", "gsm8k", "self"]  # self: text the full LLM generates (data.self_public)
TASKS = tuple(t for t in typing.get_args(Task) if t != "custom")  # the built-in tasks


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # a prepared model name under $FEDSODA_MODELS, or a path to an HF folder
    dtype: Dtype = "float32"  # dtype of the full model on the server: float32 | bfloat16 | float16
    adapter_layers: int = 3  # L_A: the last L_A decoder layers form the adapter (0 = all layers)
    adapter_first: int = 0  # ... plus this many bottom layers (FedOT: 1)


@dataclass
class DataConfig:
    task: Task = "sst2"  # the task the clients train on and the model is evaluated on: sst2 | boolq | gsm8k | custom
    #                      (your own dataset: data.custom, docs/datasets.md)
    custom: str = ""  # data.task=custom: the task folder, a name under <data>/custom/ or a path (docs/datasets.md)
    public: PublicSet = "wikitext2"  # D_public for SGP and ODA: wikitext2 | gsm8k (train split, disjoint from eval) |
    #                                  self (text the full LLM samples itself, cached in <run>/public_self.jsonl)
    split: Literal["iid", "dirichlet"] = "iid"  # iid | dirichlet (label skew)
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
    token: Literal["last", "all"] = "last"  # last | all: which tokens the angular distance is averaged over
    spacing: Literal["round", "int"] = "round"  # uniform drop (sgp.enabled=false): round (offsite-tuning) | int
    #                                             (FederatedScope)
    n_max: int = 0  # distance profile computed for n = 1..n_max (0 = max(n, 4); auto: the largest group size tried)
    auto: bool = False  # choose (n, p) with n * p = remove_layers from the distance profile (sgp.choose_auto)
    remove_layers: int = 0  # K, the emulator layers auto removes (an upper bound when max_distance is set)
    max_distance: float = 0.0  # prune only groups with d(x^t, x^{t+n}) <= max_distance (0 = off; sgp.py docstring)


@dataclass
class ODAConfig:
    pre_align: bool = True  # align M* to the full LLM once before round 1 (pre-alignment, E_p epochs)
    re_align: bool = True  # re-align M* during training (oda.trigger) and send the emulator LoRA again
    every: int = 5  # r: re-align every r rounds (oda.trigger=every)
    trigger: Literal["every", "drift"] = "every"  # every: every r rounds | drift: when the output drift probe (KL on
    #                                               the held-out probe batch) after a round exceeds drift_threshold x
    #                                               its value just after the last alignment
    drift_threshold: float = 2.0  # tau (> 1) of oda.trigger=drift
    max_interval: int = 0  # oda.trigger=drift: also re-align when this many rounds passed since the last alignment
    #                        (0 = never)
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
    compute_dtype: Dtype = "float32"  # dtype the NF4 layers compute in (bitsandbytes bnb_4bit_compute_dtype)
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
    aggregator: Literal["fedavg", "fedsrd", "fedsrd-e"] = "fedavg"  # fedavg | fedsrd | fedsrd-e (fedsoda_mpi/fedsrd.py)
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
    dtype: Literal["float32", "bfloat16"] = "float32"  # float32 | bfloat16: evaluation forwards under autocast
    #                                                    (bfloat16: ~2.5x faster on CPUs with AVX512-BF16)
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
    fail_kind: Literal["raise", "oom", "nan"] = "raise"  # raise: an exception; oom: a simulated out-of-memory; nan: a
    #                                                      client uploads NaN
    deterministic: bool = False  # deterministic kernels (devices.deterministic): bit-identical repeats on one GPU
    allow_degenerate: bool = False  # run settings that are legal but make the run meaningless (validation._degenerate)


@dataclass
class Config:
    method: str = "fedsoda"  # the method preset (fedsoda_mpi/methods.py), applied before the job file
    seed: int = 0  # seeds the client split, sampling, batch order and dropout (every draw: seed, round, client)
    resume: Literal["none", "auto"] = "none"  # none | auto: continue from the run folder's newest valid checkpoint
    #                                           (output.dir), else start
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto | cuda | cpu: each rank's compute device
    #                                                  (fedsoda_mpi/devices.py)
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


def _all_keys(cfg: Config) -> list[str]:
    return [key for key, _ in leaves(cfg)]


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
                raise ConfigError(f"config key '{key}' is a section; set one of its keys, "
                                  f"e.g. '{key}.{dataclasses.fields(value)[0].name}'")
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
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                          "save the file as UTF-8") from None
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


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
