"""A model folder, checked before any MPI work without loading weights: config.json (parsed, a supported family,
the fields fedsoda-mpi reads), the tokenizer, and the safetensors headers against the model config.json describes
(built on the meta device). Every failure is a `ModelError` with one line that names the file and the fix."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers as tf

from . import families

LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")


class ModelError(RuntimeError):
    """A model folder, state dict or layer selection that fedsoda-mpi cannot use."""


def layer_of(key: str) -> int | None:
    """The decoder-layer index in a parameter or module name (`...layers.<i>.`), or None."""
    match = LAYER_KEY.search(key)
    return int(match.group(1)) if match else None


def check_weights(path) -> None:
    """Open every safetensors header of a model folder: a truncated or damaged file fails here, before any
    MPI work, instead of inside from_pretrained on rank 0 (flipped bits in tensor data are not detected;
    `prepare` checks the download's sha256). Then the tensors the headers list must be those config.json
    describes (`check_weights_match_config`)."""
    check_weights_match_config(path, weight_shapes(path))


def weight_shapes(path) -> dict[str, tuple[tuple[int, ...], Path]]:
    """{tensor name: (shape, its file)} from every safetensors header of a model folder (no tensor is read);
    ModelError naming the file for a missing, truncated or damaged one."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ModelError(f"no *.safetensors weights in {path}; run `python -m fedsoda_mpi.prepare model ...` again")
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as st:
                shapes.update({k: (tuple(st.get_slice(k).get_shape()), f) for k in st.keys()})
        except Exception as e:  # SafetensorError or OSError
            raise ModelError(f"{f} is damaged ({e}); delete the folder and run `python -m fedsoda_mpi.prepare "
                             f"model ...` again") from None
    return shapes


def check_weights_match_config(path, stored: dict[str, tuple[tuple[int, ...], Path]]) -> None:
    """The weights' tensors (`stored`: name -> (shape, file), from the safetensors headers) against the model
    config.json describes (a skeleton on the meta device): the number of decoder layers, an output head
    (lm_head.weight) when tie_word_embeddings is false, every tensor present with its shape. A config.json that
    disagrees would load a smaller model, a random output head or fail inside transformers; ModelError names the
    file, the setting and both values. Extra tensors (e.g. a tied model's saved lm_head.weight) are allowed."""
    cfg_file = Path(path) / "config.json"
    skeleton = _skeleton(path)
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    n_cfg = skeleton.config.num_hidden_layers
    n_stored = 1 + max((layer_of(k) for k in stored if k.startswith("model.layers.")), default=-1)
    if n_stored != n_cfg:
        raise ModelError(f"{cfg_file}: num_hidden_layers is {n_cfg} but the weights hold {n_stored} decoder layers; "
                         f"set num_hidden_layers to {n_stored}, or {_REPREPARE}")
    tied = bool(getattr(skeleton.config, "tie_word_embeddings", False))
    if tied:
        want.pop("lm_head.weight", None)  # the output head is the embedding table
    elif "lm_head.weight" in want and "lm_head.weight" not in stored:
        raise ModelError(f"{cfg_file}: tie_word_embeddings is false but the weights have no lm_head.weight (the "
                         f"output head would be random); set tie_word_embeddings to true, or {_REPREPARE}")
    missing = sorted(set(want) - set(stored))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelError(f"{path}: the weights lack {missing[0]}{more}, which config.json's model has; {_REPREPARE}")
    for name, shape in want.items():
        have, f = stored[name]
        if have != shape:
            raise ModelError(f"{f}: {name} has shape {list(have)} but config.json {cfg_file} gives {list(shape)}; "
                             f"{_REPREPARE}")


# model types whose decoder layers the split forward (`families.run_layers`) drives through their own HF forward,
# each checked by tests/test_families.py (docs/models.md)
SUPPORTED_MODEL_TYPES = tuple(families.FAMILIES)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_REPREPARE = "delete the folder and run `python -m fedsoda_mpi.prepare model ...` again"


def model_config(path) -> dict:
    """config.json of a model folder, parsed and checked for what fedsoda-mpi reads before loading the model
    (`model_type`, `num_hidden_layers`). FileNotFoundError if there is no config.json (the folder is not a
    model: main reports it against model.name), ModelError naming the file for anything else."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model folder {path} has no config.json; prepare it with "
                                f"`python -m fedsoda_mpi.prepare model NAME` (a prepared name such as smollm2-135m, or "
                                "hf:org/model) or point model.name at an HF model folder")
    try:
        config = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ModelError(f"{cfg_file}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ModelError(f"{cfg_file}: not UTF-8 text (byte at offset {e.start}); {_REPREPARE}") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_file}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); "
                         f"{_REPREPARE}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{cfg_file}: expected a JSON object, got {type(config).__name__}; {_REPREPARE}")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(map(str, config.get("architectures") or [])) or "no architectures"
        raise ModelError(f"{cfg_file}: {families.refusal(model_type, arch, path)}")
    layers = config.get("num_hidden_layers")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        what = "has no num_hidden_layers" if layers is None else \
            f"num_hidden_layers must be an integer >= 1, got {layers!r}"
        raise ModelError(f"{cfg_file}: {what}; {_REPREPARE}")
    return config


def check_model_folder(path) -> int:
    """Everything about a model folder that can be checked without loading weights: config.json (parse,
    required fields, supported architecture) and the tokenizer (files present and loadable). Returns the
    number of decoder layers. The safetensors headers are checked by `check_weights`."""
    path = Path(path)
    config = model_config(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"model folder {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); {_REPREPARE}")
    try:
        tf.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a damaged tokenizer.json, a missing merges.txt, ...: transformers raises many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
        raise ModelError(f"model folder {path}: the tokenizer cannot be loaded ({type(e).__name__}: {first}); "
                         f"{_REPREPARE}") from None
    return int(config["num_hidden_layers"])


def _skeleton(path):
    """The model config.json of `path` describes, built on the meta device: no weights are read or allocated.
    ModelError naming config.json when transformers cannot build it."""
    try:
        config = tf.AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            return tf.AutoModelForCausalLM.from_config(config)
    except Exception as e:  # a config.json that transformers cannot build a model from
        first = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
        raise ModelError(f"{Path(path) / 'config.json'}: transformers cannot build the model "
                         f"({type(e).__name__}: {first}); {_REPREPARE}") from None


def linear_module_names(path) -> list[str]:
    """Full names of the torch.nn.Linear modules inside the decoder layers of the model in `path` (what
    lora.target_modules may name), from a skeleton built on the meta device (`_skeleton`)."""
    skeleton = _skeleton(path)
    return sorted(name for name, module in skeleton.named_modules()
                  if isinstance(module, torch.nn.Linear) and layer_of(name + ".") is not None)
