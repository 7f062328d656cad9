"""Model families: which decoder-only HF causal LMs fedsoda-mpi runs, and the split forward that runs any window
of their decoder layers through the model's OWN HF forward (docs/models.md).

A supported family keeps its decoder layers in one `nn.ModuleList` at `<causal LM>.model.layers` and its decoder
forward loops over `self.layers[: config.num_hidden_layers]` (per-layer settings read from `config.layer_types[i]`
by position). `run_layers` then runs layers start..stop-1 by cutting that list and the config's
`num_hidden_layers` / `layer_types` to the window for the duration of one HF forward, with forward hooks that
inject a cached hidden state into the window's first layer and collect layer outputs. Whatever the family does
around its layers (embedding scaling, sliding-window masks per layer type, per-type rotary tables, granite's
embedding multiplier, extra norms inside the layers) is its own code, so the split forward equals the HF forward.
The one step outside the decoder forward, the LM head, is `head_logits` (plus the final logit transforms a family
applies in its *ForCausalLM forward: softcapping, scaling).

`FAMILIES` lists the model types tests/test_families.py checks on a tiny random model (split forward == HF
forward, a pruned NF4 sub-LLM trains LoRA); `refusal` says in one line why any other model type is refused.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

# model_type -> what the family adds to the Llama layout (all of it handled by the family's own HF forward)
FAMILIES = {
    "llama": "the reference layout",
    "mistral": "one sliding-window mask for every layer (config.sliding_window)",
    "qwen2": "layer_types (sliding above max_window_layers when use_sliding_window)",
    "qwen3": "q/k norms; layer_types as qwen2",
    "gemma": "scaled embeddings (x sqrt(hidden)), GeLU MLP",
    "gemma2": "scaled embeddings, pre/post feedforward norms, layer_types sliding/full, attention and final logit "
              "softcapping",
    "gemma3_text": "scaled embeddings, pre/post feedforward norms, q/k norms, layer_types with a rotary table per "
                   "type, final logit softcapping",
    "phi3": "fused qkv_proj and gate_up_proj (set lora.target_modules), sliding window",
    "olmo2": "post-attention and post-feedforward norms, q/k norms",
    "granite": "embedding_multiplier, residual_multiplier, attention_multiplier, logits_scaling",
    "olmo3": "olmo2's norms, layer_types with a rotary table per type",
    "smollm3": "layer_types (no rotary on some layers)",
    "ministral": "layer_types (sliding)",
    "starcoder2": "LayerNorm with biases, c_fc/c_proj MLP, sliding window",
    "cohere": "LayerNorm, parallel attention and MLP, logit_scale",
    "cohere2": "cohere's layout with sliding/full layer_types, logit_scale",
    "exaone4": "post-norms, q/k norms, sliding/full layer_types",
}

# config lists with one entry per decoder layer (read by position in the forward, or by layer_idx when a layer is
# built): cut with the layer list, for a window (`_window`) as for a sub-LLM (`models.build_sub_model`)
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")


def cut_per_layer(config, kept: list[int]) -> None:
    """Keep the entries of `kept` in every per-layer list of `config` (PER_LAYER_KEYS) and set num_hidden_layers."""
    for key in PER_LAYER_KEYS:
        values = getattr(config, key, None)
        if values is not None:
            setattr(config, key, [values[i] for i in kept])
    config.num_hidden_layers = len(kept)


class FamilyError(RuntimeError):
    """A model whose structure the split forward cannot drive."""


class _Stop(Exception):
    """Raised by a hook to end a forward once the wanted hidden state is captured (the rest is not computed)."""


def decoder_of(causal) -> torch.nn.Module:
    """The decoder stack (`.model`: embeddings, `.layers`, final norm) of a plain HF *ForCausalLM."""
    inner = getattr(causal, "model", None)
    if not isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        raise FamilyError(f"{type(causal).__name__}: {_missing_layers(causal)}")
    return inner


def _missing_layers(model) -> str:
    """What a model lacks for the split forward: one line naming where its layers are instead, if anywhere."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config  # multimodal: its text model
    n = getattr(text, "num_hidden_layers", None)
    lists = [name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    where = f" (its {n} layers are at `{lists[0]}`)" if lists else ""
    return f"no single decoder layer list at `model.layers`{where}"


def structure_problem(causal) -> str | None:
    """What the split forward needs and `causal` (a model, possibly on the meta device) lacks, or None: a decoder
    stack `model` holding a ModuleList `layers` of config.num_hidden_layers layers, and an output head."""
    try:
        layers = decoder_of(causal).layers
    except FamilyError:
        return _missing_layers(causal)
    if len(layers) != causal.config.num_hidden_layers:
        return f"`model.layers` holds {len(layers)} layers, config.num_hidden_layers {causal.config.num_hidden_layers}"
    if causal.get_output_embeddings() is None:
        return "no output head (get_output_embeddings() is None)"
    return None


def refusal(model_type, architectures: str, path) -> str:
    """The one-line reason an unsupported `model_type` is refused: what its structure lacks (from a skeleton of
    the folder's config on the meta device), or that it fits but no test covers it."""
    import transformers as tf

    supported = ", ".join(FAMILIES)
    head = f"model_type {model_type!r} ({architectures}) is not supported"
    tail = f"fedsoda-mpi runs {supported} models (docs/models.md)"
    try:
        config = tf.AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            skeleton = tf.AutoModelForCausalLM.from_config(config)
    except Exception as e:  # an unknown model_type, an encoder-only family, a damaged config
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"{head}: transformers builds no causal LM from it ({first}); {tail}"
    problem = structure_problem(skeleton)
    if problem is None:
        problem = ("its layout fits (`model.layers`) but tests/test_families.py does not check it yet; add it as "
                   "docs/models.md describes")
    return f"{head}: {problem}; {tail}"


# --------------------------------------------------------------------------------------------- split forward

@contextmanager
def _window(inner, start: int, stop: int) -> Iterator[torch.nn.ModuleList]:
    """For the block, `inner.layers` is layers start..stop-1 and its config's num_hidden_layers and per-layer lists
    (`cut_per_layer`; the HF forward reads `layer_types[i]` by position) are cut to match; all restored afterwards."""
    config, layers = inner.config, inner.layers
    saved = {key: getattr(config, key) for key in ("num_hidden_layers", *PER_LAYER_KEYS) if hasattr(config, key)}
    window = torch.nn.ModuleList(layers[start:stop])
    inner.layers = window
    cut_per_layer(config, list(range(start, start + len(window))))
    try:
        yield window
    finally:
        inner.layers = layers
        for key, value in saved.items():
            setattr(config, key, value)


def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a decoder layer is called with (positional, or the `hidden_states` keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def _output(out) -> torch.Tensor:
    """A decoder layer's output hidden state (families return the tensor, or a tuple starting with it)."""
    return out[0] if isinstance(out, tuple) else out


def run_layers(causal, attention_mask: torch.Tensor, start: int, stop: int, input_ids: torch.Tensor | None = None,
               hidden: torch.Tensor | None = None, collect: list | None = None, final_norm: bool = False
               ) -> torch.Tensor:
    """Decoder layers start..stop-1 of `causal` (a plain or LoRA-wrapped HF *ForCausalLM) through its own HF
    decoder forward, on `input_ids` (start = 0) or on `hidden`, the hidden state entering layer `start`.

    Returns the output of layer stop-1 (the embedding output when stop = start = 0), or with `final_norm` (needs
    stop = L) the final normed hidden state. `collect` receives each layer's output. Positions are 0..S-1 and the
    attention masks are the family's own (causal, sliding per layer type), built from `attention_mask`."""
    inner = decoder_of(causal)
    if (input_ids is None) == (hidden is None) or (input_ids is not None and start != 0):
        raise ValueError("run_layers needs input_ids (from layer 0) or hidden (from layer `start`), not both")
    if final_norm and stop != len(inner.layers):
        raise ValueError("final_norm needs the window to end at the last layer")
    if hidden is not None and start == stop:
        return inner.norm(hidden) if final_norm else hidden
    captured: list[torch.Tensor] = []
    with _window(inner, start, max(stop, start + 1)) as window:
        handles = [window[0].register_forward_pre_hook(_entry_hook(hidden, stop == start, captured),
                                                       with_kwargs=True)]
        for i, layer in enumerate(window if stop > start else []):
            last = i == len(window) - 1 and not final_norm
            handles.append(layer.register_forward_hook(_exit_hook(collect, captured if last else None)))
        embeds = hidden if input_ids is None else None
        try:
            out = inner(input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            return captured[-1]
        finally:
            for h in handles:
                h.remove()
    return out.last_hidden_state


def _entry_hook(hidden: torch.Tensor | None, stop_here: bool, captured: list):
    """Forward pre-hook of the window's first layer: its input becomes `hidden` (when given); with `stop_here`
    that input is captured and the forward ends before the layer runs."""
    def hook(module, args, kwargs):
        if hidden is not None:
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": hidden}
        if stop_here:
            captured.append(_first_arg(args, kwargs))
            raise _Stop
        return args, kwargs
    return hook


def _exit_hook(collect: list | None, captured: list | None):
    """Forward hook of a window layer: its output goes to `collect`; the last layer's to `captured`, which ends the
    forward (no final norm)."""
    def hook(module, args, out):
        if collect is not None:
            collect.append(_output(out))
        if captured is not None:
            captured.append(_output(out))
            raise _Stop
    return hook


def head_logits(causal, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of final (normed) hidden states as the family's *ForCausalLM forward computes them: the LM head,
    then the family's logit transforms (gemma2/3 final softcapping, granite's 1/logits_scaling, cohere's
    logit_scale)."""
    config = causal.config
    logits = causal.get_output_embeddings()(hidden)
    if getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    if getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits
