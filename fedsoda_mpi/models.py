"""Model surgery for FedSODA: the full LLM M = [E, A], the sub-LLM M* = [E*, A] and their LoRA adapters.

Layer indices follow docs/design.md: decoder layer l of the full model produces x^l; a sub-LLM keeps the full-model
layers `kept` (sorted) and renumbers them 0..L*-1 (`methods.layer_maps`). The client's sub-LLM is NF4-quantized with
bitsandbytes (QLoRA, paper Sec. 3.1; Algorithm 2 step 2) and trains LoRA only; LoRA tensors travel as peft
state-dict entries (`base_model.model.model.layers.{i}.<module>.lora_{A,B}.weight`), renamed between full and
sub indices by `remap_layers`. The forward helpers split one forward pass at a layer boundary so a client can
cache the frozen emulator's output x^{L*-a} once and train the adapter A on top of it (Sec. 4.4, Eq. 9).
"""
from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as tf

from . import families
from .quantize import (EmbedQuantError, fix_bnb_cpu, nf4_config, quantize_embeddings, restore_embeddings,
                       tables_restored_later)
from .host import readable, to_host_state
from .methods import layer_maps
from .model_folder import LAYER_KEY, ModelError, layer_of
from .reaper import scratch

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def torch_dtype(name: str):
    """Map a config dtype name ("float32", "bfloat16", "float16", "auto") to what from_pretrained takes."""
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


# ----------------------------------------------------------------------------------------------- loading

def load_causal_lm(path, dtype: str = "float32", device: str = "cpu"):
    """Load the full LLM M (or a shipped sub-LLM M*) and its tokenizer in eval mode.

    The tokenizer pads on the right; a tokenizer without a pad token gets eos as pad token (labels and
    attention masks, not the pad id, decide what counts, so reusing eos is harmless)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"no model at {path} (config.json missing); run "
                         f"`python -m fedsoda_mpi.prepare model ...` on a machine with internet first")
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), device_map=device)
    fix_bnb_cpu(model)
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


@contextmanager
def mode(*models, training: bool = False) -> Iterator[None]:
    """models[i].train(training) for the block (eval mode by default); every module's own training flag is
    restored afterwards. Eval mode also keeps bitsandbytes from repacking 4-bit weights for its CPU inference
    path (`fix_bnb_cpu`): a repacked Linear4bit has no backward, so later LoRA gradients would silently vanish."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        if not training:
            fix_bnb_cpu(model)
        model.train(training)
    try:
        yield
    finally:
        for m, was_training in saved:
            m.training = was_training


# ------------------------------------------------------------------------------------------ layer surgery

def causal_lm(model):
    """The HF *ForCausalLM of a plain model or of a PeftModel wrapping it."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def decoder(model):
    """The decoder stack of a plain or peft-wrapped causal LM: the inner HF *Model (embeddings, decoder layers,
    final norm) without the LM head (not PEFT's `base_model`, which is the wrapped causal LM)."""
    try:
        return families.decoder_of(causal_lm(model))
    except families.FamilyError as e:
        raise ModelError(str(e)) from None


def get_layers(model) -> torch.nn.ModuleList:
    """Decoder layers of a plain HF causal LM or a PeftModel wrapping it."""
    return decoder(model).layers


def _check_kept(kept: Sequence[int], n_layers: int) -> list[int]:
    kept = [int(i) for i in kept]
    if not kept or kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= n_layers:
        raise ValueError(f"kept layers must be a non-empty sorted list of distinct indices in [0, {n_layers}), "
                         f"got {kept}")
    return kept


def _sub_config(config, kept: list[int]):
    """Config of the sub-LLM: L* = len(kept) layers; per-layer lists (`layer_types`, SmolLM3's `no_rope_layers`:
    `families.cut_per_layer`) keep the kept layers' entries."""
    families.cut_per_layer(config, kept)
    return config


def _sub_state(full_model, kept: list[int]) -> dict[str, torch.Tensor]:
    """State dict of the kept layers renamed to sub indices (tensors shared with the full model, not copied)."""
    to_sub, _ = layer_maps(kept)
    state = {}
    for key, tensor in full_model.state_dict().items():
        layer = layer_of(key)
        if layer is not None:
            if layer not in to_sub:
                continue
            key = LAYER_KEY.sub(f".layers.{to_sub[layer]}.", key, count=1)
        state[key] = tensor
    return state


def _write_checkpoint(model, config, state: dict[str, torch.Tensor], folder: Path, weights: bool = True) -> None:
    """Write config (+ generation config) and, with `weights`, one safetensors file (`_unique_tensors`).

    Used instead of save_pretrained because transformers 5 ignores save_pretrained(state_dict=...) for
    bitsandbytes-quantized models, and the sub-LLM and the peft base model both need a custom state dict."""
    from safetensors.torch import save_file

    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if weights:
        save_file(_unique_tensors(state), str(folder / "model.safetensors"), metadata={"format": "pt"})


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state in host memory (`host.readable`) with tied tensors once (the first key that names them)."""
    unique, seen = {}, set()
    for key, tensor in state.items():
        storage = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and storage in seen:
            continue
        seen.add(storage)
        unique[key] = readable(tensor)
    return unique


def build_sub_model(full_model, kept: Sequence[int], quantize: bool, compute_dtype: str = "float32",
                    double_quant: bool = True, workdir: Path | None = None, device: str = "cpu", embed_bits: int = 16):
    """Build the sub-LLM M* = [E*, A] (kept layers only) as a NEW model; NF4 decoder Linears if `quantize`.

    The kept layers are written once to `workdir` (safetensors + config, no copy of the full model) and loaded
    back with from_pretrained, quantizing on load (NF4, Algorithm 2 step 2); embeddings, norms and lm_head keep
    the full model's dtype, unless `embed_bits` (8 or 4, with `quantize` only) quantizes the embedding and LM head
    (`quantize.quantize_embeddings`). On CUDA (`device="cuda:0"`) bitsandbytes quantizes while placing the weights on
    the GPU through device_map; that branch is the same call and cannot be exercised on the CPU-only test machines."""
    from peft import PeftModel

    if isinstance(full_model, PeftModel):
        raise ModelError("build_sub_model needs the plain full model, not a PeftModel")
    kept = _check_kept(kept, len(get_layers(full_model)))
    if embed_bits != 16 and not quantize:
        raise EmbedQuantError(f"quant.embed_bits={embed_bits} needs quant.enabled=true (an NF4 sub-LLM)")
    quant = nf4_config(torch_dtype(compute_dtype), double_quant) if quantize else None
    with scratch("server") as tmp:
        folder = Path(workdir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        _write_checkpoint(full_model, _sub_config(copy.deepcopy(full_model.config), kept),
                          _sub_state(full_model, kept), folder)
        model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=full_model.dtype, quantization_config=quant,
                                                        device_map=device)
    fix_bnb_cpu(model)
    return quantize_embeddings(model, embed_bits, double_quant).eval()


# ------------------------------------------------------------------------------------------------- LoRA

def add_lora(model, layers: Sequence[int], r: int = 8, alpha: int = 16, dropout: float = 0.05,
             target_modules: Sequence[str] = DEFAULT_TARGETS):
    """Wrap `model` in a peft LoRA model with adapters on the decoder layers `layers` only (QLoRA on M*'s
    kept emulator layers s_i and the adapter A, Algorithm 2 step 2). lora_A is drawn from torch's RNG, so
    torch.manual_seed fixes it."""
    from peft import LoraConfig, get_peft_model

    layers = sorted({int(i) for i in layers})
    if not layers:
        raise ValueError("add_lora needs at least one layer index")
    n_layers = len(get_layers(model))
    if layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(f"LoRA layers {layers} outside [0, {n_layers})")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        layers_to_transform=layers, layers_pattern="layers", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    fix_bnb_cpu(peft_model)
    return peft_model


def lora_state(model, layers: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
    """Copies in host memory (host.to_host) of the LoRA tensors of `layers` (all if None), keyed as in
    get_peft_model_state_dict: what the strategies, MPI and checkpoints work on, whatever the model's device."""
    from peft import get_peft_model_state_dict

    wanted = None if layers is None else {int(i) for i in layers}
    state = get_peft_model_state_dict(model, save_embedding_layers=False)  # no embedding LoRA; skips a hub lookup
    return to_host_state({k: state[k] for k in sorted(state) if wanted is None or layer_of(k) in wanted})


def _lora_params(model) -> dict[str, torch.nn.Parameter]:
    """LoRA parameters of the active adapter, keyed like get_peft_model_state_dict (adapter name removed)."""
    name = re.compile(rf"(lora_[AB])\.{re.escape(model.active_adapter)}\.")
    return {name.sub(r"\1.", k): p for k, p in model.named_parameters() if name.search(k)}


def load_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    """Copy LoRA values into the existing parameters in place (optimizer state stays attached)."""
    params = _lora_params(model)
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ModelError(f"{len(unknown)} LoRA keys not in the model, e.g. {unknown[0]}")
    with torch.no_grad():
        for key, value in state.items():
            if params[key].shape != value.shape:
                raise ModelError(f"shape mismatch for {key}: model {tuple(params[key].shape)}, "
                                 f"state {tuple(value.shape)}")
            params[key].copy_(value)


def remap_layers(state: dict, mapping: dict[int, int]) -> dict:
    """Rename `.layers.{i}.` to `.layers.{mapping[i]}.` in every key (full <-> sub indices, docs/design.md)."""
    out = {}
    for key, value in state.items():
        layer = layer_of(key)
        if layer is not None:
            if layer not in mapping:
                raise ModelError(f"layer {layer} of {key} has no entry in the layer map")
            key = LAYER_KEY.sub(f".layers.{mapping[layer]}.", key, count=1)
        out[key] = value
    return out


def set_trainable(model, layers: Iterable[int]) -> list[torch.nn.Parameter]:
    """Freeze everything except the LoRA parameters of `layers`; returns those in named_parameters order."""
    wanted = {int(i) for i in layers}
    trainable = []
    for key, param in model.named_parameters():
        param.requires_grad = "lora_" in key and layer_of(key) in wanted
        if param.requires_grad:
            trainable.append(param)
    return trainable


# ------------------------------------------------------------------------------------- split forward pass
# Every helper runs a window of decoder layers through the model's own HF forward (`families.run_layers`).

def layer_outputs(model, input_ids, attention_mask, stop: int) -> torch.Tensor:
    """Outputs x^0..x^{stop-1} of decoder layers 0..stop-1 as [B, S, stop, D], running those layers only
    (no later layers, no final norm, no LM head): what SGP's distance profile (eq. 5) needs."""
    n_layers = len(get_layers(model))
    if not 1 <= stop <= n_layers:
        raise ValueError(f"stop layer {stop} outside [1, {n_layers}]")
    outs: list[torch.Tensor] = []
    families.run_layers(causal_lm(model), attention_mask, 0, stop, input_ids=input_ids, collect=outs)
    return torch.stack(outs, dim=2)


def hidden_before_layer(model, input_ids, attention_mask, layer: int) -> torch.Tensor:
    """Hidden state entering decoder layer `layer` (x^{layer-1}; the embedding output, scaled as the family
    scales it, for 0), running layers 0..layer-1 only. With layer = L* - a this is the frozen sub-emulator output
    E*(x) a client caches (Sec. 4.4)."""
    n_layers = len(get_layers(model))
    if not 0 <= layer <= n_layers:
        raise ValueError(f"layer {layer} outside [0, {n_layers}]")
    return families.run_layers(causal_lm(model), attention_mask, 0, layer, input_ids=input_ids)


def forward_from_layer(model, hidden, attention_mask, start: int) -> torch.Tensor:
    """Run decoder layers start..L-1 on `hidden`, then the final norm: the adapter A on top of a cached
    emulator output. Returns the final hidden state [B, S, D]. Positions are 0..S-1 as in HF's own forward
    (right padding)."""
    n_layers = len(get_layers(model))
    if not 0 <= start <= n_layers:
        raise ValueError(f"start layer {start} outside [0, {n_layers}]")
    return families.run_layers(causal_lm(model), attention_mask, start, n_layers, hidden=hidden, final_norm=True)


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of final hidden states: the LM head and the family's logit transforms (`families.head_logits`)."""
    return families.head_logits(causal_lm(model), hidden)


def label_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal LM cross-entropy (next-token, shift by one) on the final hidden state; the LM head runs only at
    positions whose shifted label is not -100, which keeps the [N, vocab] logits small."""
    keep = labels[:, 1:] != -100
    if not keep.any():
        raise ValueError("label_loss: every label is -100, nothing to score")
    logits = head_logits(model, hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), labels[:, 1:][keep])


# ------------------------------------------------------------------------------------- shipping the model

def model_bundle(model, tokenizer) -> dict[str, bytes]:
    """The sub-LLM M* as files {relative name: bytes} (config, safetensors with NF4 weights pre-quantized,
    tokenizer): what the server ships once to every client (Algorithm 2 step 6). A PeftModel ships its base
    model only (LoRA entries dropped, `.base_layer.` unwrapped); LoRA values travel separately."""
    from safetensors.torch import save

    causal = causal_lm(model)
    state = {k.replace(".base_layer.", "."): v for k, v in causal.state_dict().items() if "lora_" not in k}
    with scratch("server") as tmp:  # the small files only: the weights are serialized in memory, not via TMPDIR
        _write_checkpoint(causal, causal.config, state, tmp, weights=False)
        tokenizer.save_pretrained(tmp)
        files = {str(p.relative_to(tmp)): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
    files["model.safetensors"] = save(_unique_tensors(state), metadata={"format": "pt"})
    return dict(sorted(files.items()))


def load_bundle(files: dict[str, bytes], workdir: Path, device: str = "cpu"):
    """Write a shipped bundle to `workdir` and load it (4-bit weights load as Linear4bit; a quantized embedding /
    LM head as `quantize.QuantEmbedding` / `QuantHead`) in eval mode."""
    workdir = Path(workdir).resolve()
    for name, data in files.items():
        target = (workdir / name).resolve()
        if workdir not in target.parents:
            raise ModelError(f"bundle file name {name!r} escapes {workdir}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    with tables_restored_later(workdir):
        model, tokenizer = load_causal_lm(workdir, dtype="auto", device=device)
    return restore_embeddings(model, workdir), tokenizer


def safetensors_tensor_bytes(blob: bytes) -> int:
    """Bytes of tensor data in a safetensors file's contents (its size minus the 8-byte length and JSON header)."""
    import struct

    if len(blob) < 8:
        raise ModelError(f"not a safetensors file ({len(blob)} bytes)")
    return len(blob) - 8 - struct.unpack("<Q", blob[:8])[0]


def stored_bytes(model) -> int:
    """Bytes of all parameters and buffers as stored (tied tensors once; NF4 packed weights plus their
    quantization constants: absmax, nested absmax, code books; about 4.127 bits per weight, paper App. C)."""
    import bitsandbytes as bnb

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if isinstance(module, bnb.nn.Linear4bit) and state is not None:
            tensors.update({id(t): t for t in state.as_dict(packed=True).values() if torch.is_tensor(t)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def export_peft_adapter(base_path, adapter_state_full: dict, layers: Sequence[int], r: int, alpha: int,
                        dropout: float, target_modules: Sequence[str], out_dir) -> None:
    """Write the final adapter as a standard PEFT folder for the FULL model (full-model layer indices), so
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), out_dir)` rebuilds it."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    allowed = {int(i) for i in layers}
    stray = [k for k in adapter_state_full if "lora_" not in k or layer_of(k) not in allowed]
    if stray:
        raise ValueError(f"adapter key {stray[0]} is not a LoRA tensor of layers {sorted(allowed)}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        layers_to_transform=sorted(allowed), layers_pattern="layers", task_type="CAUSAL_LM",
                        base_model_name_or_path=str(base_path))
    out_dir = Path(out_dir)
    config.save_pretrained(out_dir)
    tensors = to_host_state(dict(sorted(adapter_state_full.items())))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
