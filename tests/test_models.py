"""Model surgery: layer dropping, NF4 sub-LLMs, LoRA state dicts and key maps, the split forward pass used by
the client's emulator cache, label loss, shipping bundles, and the exported PEFT adapter."""
import time

import pytest
import torch
import transformers as tf
from conftest import tiny_causal_lm

from fedsoda_mpi import models as M
from fedsoda_mpi.methods import layer_maps

FAMILIES = ["llama", "qwen2", "mistral"]


def batch(seq: int = 12, vocab: int = 128):
    """Two sequences, the second right-padded (pad id 0) after 7 tokens."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, seq), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = 0, 0
    return ids, mask


def randomize_lora_b(model, seed: int = 3) -> None:
    """LoRA B starts at zero; give it values so LoRA changes outputs and lora_A receives gradients."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def tiny_tokenizer(vocab: int = 128):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def nf4_lora(family: str = "llama", layers: int = 6, kept=(0, 2, 3, 5), lora_layers=(1, 2, 3)):
    full = tiny_causal_lm(family, layers=layers)
    sub = M.build_sub_model(full, list(kept), quantize=True)
    torch.manual_seed(0)
    peft_model = M.add_lora(sub, list(lora_layers), r=4, alpha=8, dropout=0.0)
    randomize_lora_b(peft_model)
    return peft_model


# ---------------------------------------------------------------------------------------- layer dropping

@pytest.mark.parametrize("family", FAMILIES)
def test_sub_model_keeps_the_layers_and_generates(family):
    """M* = the kept layers of M, renumbered (Algorithm 1's Prune_Layers): the same logits as M with the other
    layers cut out by hand, KV-cache indices and per-layer config lists follow."""
    import copy

    full = tiny_causal_lm(family, layers=6)
    keep = [0, 2, 3, 5]
    sub = M.build_sub_model(full, keep, quantize=False)
    assert sub.config.num_hidden_layers == 4 and len(M.get_layers(sub)) == 4 and len(M.get_layers(full)) == 6
    assert [layer.self_attn.layer_idx for layer in M.get_layers(sub)] == [0, 1, 2, 3]
    if family == "qwen2":
        assert len(sub.config.layer_types) == 4
    by_hand = copy.deepcopy(full)
    by_hand.model.layers = torch.nn.ModuleList(by_hand.model.layers[i] for i in keep)
    for new_idx, layer in enumerate(by_hand.model.layers):
        layer.self_attn.layer_idx = new_idx
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(sub(ids, attention_mask=mask).logits, by_hand(ids, attention_mask=mask).logits)
        cached = sub.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = sub.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 18) and torch.equal(cached, uncached)


@pytest.mark.parametrize("keep", [[], [2, 1], [1, 1], [0, 6], [-1, 2]])
def test_sub_model_rejects_bad_selection(keep):
    with pytest.raises(ValueError, match="kept layers"):
        M.build_sub_model(tiny_causal_lm(layers=6), keep, quantize=False)


def test_layer_maps_both_directions():
    to_sub, to_full = layer_maps([0, 3, 4, 9])
    assert to_sub == {0: 0, 3: 1, 4: 2, 9: 3}
    assert to_full == {0: 0, 1: 3, 2: 4, 3: 9}
    assert all(to_full[to_sub[f]] == f for f in to_sub)


def test_build_sub_model_leaves_full_model_untouched():
    full = tiny_causal_lm("qwen2", layers=6)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    sub = M.build_sub_model(full, [1, 4], quantize=True)
    assert len(M.get_layers(full)) == 6 and full.config.num_hidden_layers == 6
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items())
    assert sub.config.num_hidden_layers == 2 and sub.config.layer_types == ["full_attention"] * 2
    torch.testing.assert_close(sub.model.embed_tokens.weight, full.model.embed_tokens.weight)
    assert sub.model.embed_tokens.weight.data_ptr() != full.model.embed_tokens.weight.data_ptr()


# ---------------------------------------------------------------------------------- NF4 + LoRA on CPU

def lora_a_grad(model, ids, mask):
    """Gradient of the first LoRA A in the first adapted layer (upstream of three 4-bit layers)."""
    model.train()
    model.zero_grad(set_to_none=True)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    grad = M.get_layers(model)[1].self_attn.q_proj.lora_A["default"].weight.grad
    return None if grad is None else grad.clone()


def test_lora_grad_through_nf4_same_before_and_after_generate():
    """The CRITICAL bitsandbytes CPU trap (docs/design.md, toolchain facts): generate() must not silently kill LoRA
    gradients."""
    model = nf4_lora()
    ids, mask = batch()
    before = lora_a_grad(model, ids, mask)
    model.eval()
    with torch.no_grad():
        model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    after = lora_a_grad(model, ids, mask)
    assert before is not None and before.abs().sum() > 0
    assert torch.equal(before, after)


def test_without_fix_bnb_cpu_grads_vanish_and_fix_repairs():
    """Reproduces the trap on AVX512-BF16 CPUs (skipped elsewhere); fix_bnb_cpu also undoes a repacking that
    already happened."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks, the trap cannot occur")
    model = nf4_lora()
    ids, mask = batch()
    before = lora_a_grad(model, ids, mask)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True
    model.eval()
    with torch.no_grad():
        model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        broken = lora_a_grad(model, ids, mask)
    assert broken is None or not torch.equal(broken, before)
    assert M.fix_bnb_cpu(model) == 4 * 7
    repaired = lora_a_grad(model, ids, mask)  # unpacking is lossy (bf16 absmax), hence close, not equal
    torch.testing.assert_close(repaired, before, rtol=0.05, atol=1e-5)


def test_nf4_logits_close_to_fp32():
    full = tiny_causal_lm("llama", layers=4, hidden=128)
    quant = M.build_sub_model(full, range(4), quantize=True)
    assert sum(type(m).__name__ == "Linear4bit" for m in quant.modules()) == 4 * 7
    assert type(quant.lm_head).__name__ == "Linear" and quant.lm_head.weight.dtype == torch.float32
    ids, mask = batch()
    with torch.no_grad():
        ref, got = full(ids, attention_mask=mask).logits, quant(ids, attention_mask=mask).logits
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"NF4 vs fp32 logits, relative error {rel:.3f}")
    assert 0.0 < rel < 0.25


def test_add_lora_is_deterministic_and_rejects_empty_layers():
    full = tiny_causal_lm(layers=4)
    with pytest.raises(ValueError, match="at least one layer"):
        M.add_lora(full, [])
    with pytest.raises(ValueError, match="outside"):
        M.add_lora(full, [4])
    states = []
    for _ in range(2):
        torch.manual_seed(7)
        states.append(M.lora_state(M.add_lora(tiny_causal_lm(layers=4), [1, 2])))
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ------------------------------------------------------------------------------- LoRA state dicts

def test_lora_state_load_and_remap_round_trip():
    from peft import get_peft_model_state_dict

    model = nf4_lora(kept=(0, 2, 3, 5), lora_layers=(1, 2, 3))
    state = M.lora_state(model)
    assert list(state) == sorted(get_peft_model_state_dict(model))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in state
    only2 = M.lora_state(model, [2])
    assert only2 and all(".layers.2." in k for k in only2)
    assert len(only2) == len(state) // 3

    _, to_full = layer_maps([0, 2, 3, 5])
    full_keys = M.remap_layers(state, to_full)
    assert "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight" in full_keys  # sub 1 = full 2
    assert M.remap_layers(full_keys, {v: k for k, v in to_full.items()}) == state

    params = {id(p) for p in model.parameters()}
    new = {k: torch.full_like(v, 0.5) for k, v in only2.items()}
    M.load_lora_state(model, new)
    assert {id(p) for p in model.parameters()} == params
    after = M.lora_state(model)
    assert all(torch.equal(after[k], new[k]) for k in new)
    assert all(torch.equal(after[k], state[k]) for k in state if k not in new)

    key = next(iter(new))
    with pytest.raises(M.ModelError, match="not in the model"):
        M.load_lora_state(model, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": new[key]})
    with pytest.raises(M.ModelError, match="shape mismatch"):
        M.load_lora_state(model, {key: torch.zeros(3, 3)})
    with pytest.raises(M.ModelError, match="no entry in the layer map"):
        M.remap_layers(state, {1: 2})


def test_set_trainable_counts():
    model = M.add_lora(tiny_causal_lm(layers=4), [0, 1, 2, 3], r=4)
    trainable = M.set_trainable(model, [2, 3])
    per_layer = 4 * (64 + 64) + 4 * (64 + 32) * 2 + 4 * (64 + 64) + 3 * 4 * (64 + 128)  # r * (in + out) per module
    assert len(trainable) == 2 * 7 * 2
    assert sum(p.numel() for p in trainable) == 2 * per_layer
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".layers.2." in n or ".layers.3." in n for n in names)
    assert trainable == [p for p in model.parameters() if p.requires_grad]
    assert M.set_trainable(model, []) == [] and not any(p.requires_grad for p in model.parameters())


# -------------------------------------------------------------------------------- split forward pass

@pytest.mark.parametrize("variant", ["fp32", "lora", "nf4_lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_split_forward_equals_full_forward(family, variant):
    if variant == "nf4_lora":
        model = nf4_lora(family)
    else:
        model = tiny_causal_lm(family, layers=4)
        if variant == "lora":
            model = M.add_lora(model, [1, 3], r=4, dropout=0.0)
            randomize_lora_b(model)
    ids, mask = batch(seq=40)  # longer than mistral's sliding window (32)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for split in (0, 1, 3, 4):
            hidden = M.hidden_before_layer(model, ids, mask, split)
            if split < 4:  # HF's last hidden state is after the final norm
                torch.testing.assert_close(hidden, ref[split], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(M.forward_from_layer(model, hidden, mask, split), ref[-1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        M.hidden_before_layer(model, ids, mask, 5)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_outputs_equal_hf_hidden_states_and_run_only_those_layers(family):
    model = tiny_causal_lm(family, layers=6)
    ids, mask = batch(seq=40)
    ran = []
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
             for k, layer in enumerate(M.get_layers(model))]
    with torch.no_grad():
        got = M.layer_outputs(model, ids, mask, 4)  # x^0..x^3
        assert ran == [0, 1, 2, 3]
        ref = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    assert got.shape == (ids.shape[0], ids.shape[1], 4, model.config.hidden_size)
    torch.testing.assert_close(got, torch.stack(ref[1:5], dim=2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        M.layer_outputs(model, ids, mask, 0)


@pytest.mark.parametrize("quantized", [False, True])
def test_label_loss_equals_hf_loss(quantized):
    model = nf4_lora() if quantized else tiny_causal_lm(layers=4)
    ids, mask = batch()
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :4] = -100  # prompt tokens are not scored
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, labels=labels).loss
        hidden = M.forward_from_layer(model, M.hidden_before_layer(model, ids, mask, 2), mask, 2)
        torch.testing.assert_close(M.label_loss(model, hidden, labels), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="every label is -100"):
        M.label_loss(model, hidden, torch.full_like(labels, -100))


# ---------------------------------------------------------------------------------- shipping

def test_load_causal_lm_missing_folder_names_prepare(tmp_path):
    with pytest.raises(M.ModelError, match=r"prepare model") as err:
        M.load_causal_lm(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)


@pytest.mark.parametrize("quantize", [False, True])
def test_bundle_round_trip(tmp_path, quantize):
    full = tiny_causal_lm(layers=6)
    sub = M.build_sub_model(full, [0, 2, 5], quantize=quantize)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = M.add_lora(sub, [1, 2], r=4, dropout=0.0)
    randomize_lora_b(model)
    files = M.model_bundle(model, tokenizer)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    loaded, loaded_tok = M.load_bundle(files, tmp_path / "client")
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    n4 = sum(type(m).__name__ == "Linear4bit" for m in loaded.modules())
    assert n4 == (3 * 7 if quantize else 0)
    assert M.stored_bytes(loaded) == M.stored_bytes(M.causal_lm(model)) - sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    assert loaded_tok.padding_side == "right" and loaded_tok.pad_token == "</s>"
    assert loaded_tok("w5 w9")["input_ids"] == [5, 9]
    ids, mask = batch()
    with torch.no_grad(), model.disable_adapter():
        expected = model(ids, attention_mask=mask).logits
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, expected)


def test_load_bundle_rejects_escaping_names(tmp_path):
    with pytest.raises(M.ModelError, match="escapes"):
        M.load_bundle({"../evil.json": b"{}"}, tmp_path / "client")


def test_stored_bytes_nf4_ratio():
    full = tiny_causal_lm("llama", layers=2, hidden=256)
    fp32 = M.build_sub_model(full, [0, 1], quantize=False)
    nf4 = M.build_sub_model(full, [0, 1], quantize=True)
    weights = sum(m.weight.numel() for m in M.get_layers(fp32).modules() if isinstance(m, torch.nn.Linear))
    ratio = M.stored_bytes(M.get_layers(nf4)) / M.stored_bytes(M.get_layers(fp32))
    bits = 8 * M.stored_bytes(M.get_layers(nf4)) / weights
    whole = M.stored_bytes(nf4) / M.stored_bytes(fp32)
    print(f"decoder layers NF4/fp32 = {ratio:.4f} ({bits:.3f} bits per weight); whole model {whole:.3f}")
    assert 4.127 < bits < 4.5  # 4 bits + uint8 absmax per 64 + fp32 per 256 blocks + code books and norms
    assert 1 / 8 < ratio < 0.14
    assert M.stored_bytes(nf4) - M.stored_bytes(M.get_layers(nf4)) == M.stored_bytes(fp32) - M.stored_bytes(
        M.get_layers(fp32))  # embeddings (tied with lm_head, counted once) and final norm stay fp32


def test_export_peft_adapter_round_trip(tmp_path):
    from peft import PeftModel

    base_dir = tmp_path / "base"
    tiny_causal_lm(layers=6).save_pretrained(base_dir)
    kept, lora_sub = [0, 2, 3, 5], [1, 3]
    to_sub, to_full = layer_maps(kept)
    sub = M.build_sub_model(tf.AutoModelForCausalLM.from_pretrained(base_dir), kept, quantize=False)
    torch.manual_seed(0)
    sub = M.add_lora(sub, lora_sub, r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "down_proj"))
    randomize_lora_b(sub)
    state_full = M.remap_layers(M.lora_state(sub), to_full)
    full_layers = [to_full[i] for i in lora_sub]

    in_memory = M.add_lora(tf.AutoModelForCausalLM.from_pretrained(base_dir), full_layers, r=4, alpha=8,
                           dropout=0.0, target_modules=("q_proj", "down_proj"))
    M.load_lora_state(in_memory, state_full)
    M.export_peft_adapter(base_dir, state_full, full_layers, 4, 8, 0.0, ("q_proj", "down_proj"), tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    assert reloaded.peft_config["default"].base_model_name_or_path == str(base_dir)
    ids, mask = batch()
    with torch.no_grad():
        got, expected = reloaded(ids, attention_mask=mask).logits, in_memory(ids, attention_mask=mask).logits
        with in_memory.disable_adapter():
            plain = in_memory(ids, attention_mask=mask).logits
    assert torch.equal(got, expected) and not torch.allclose(got, plain)
    with pytest.raises(ValueError, match="not a LoRA tensor of layers"):
        M.export_peft_adapter(base_dir, state_full, [2], 4, 8, 0.0, ("q_proj", "down_proj"), tmp_path / "bad")


# ---------------------------------------------------------------------------------- real SmolLM2

@pytest.mark.real
def test_smollm2_nf4_sub_model(smollm2_dir):
    full, tokenizer = M.load_causal_lm(smollm2_dir)
    assert len(M.get_layers(full)) == 30
    kept = list(range(0, 12)) + list(range(24, 30))  # 18 of 30 layers
    start = time.perf_counter()
    sub = M.build_sub_model(full, kept, quantize=True)
    seconds = time.perf_counter() - start
    full_bytes, sub_bytes = M.stored_bytes(full), M.stored_bytes(sub)
    bf16_bytes = full_bytes // 2
    print(f"SmolLM2 NF4 sub-model (18/30 layers): {sub_bytes / 2**20:.1f} MiB vs full fp32 "
          f"{full_bytes / 2**20:.1f} MiB ({sub_bytes / full_bytes:.3f}) / bf16 {bf16_bytes / 2**20:.1f} MiB "
          f"({sub_bytes / bf16_bytes:.3f}); built in {seconds:.1f} s")
    layer_ratio = M.stored_bytes(M.get_layers(sub)) / (M.stored_bytes(M.get_layers(full)) * 18 / 30)
    print(f"decoder layers NF4/fp32 {layer_ratio:.4f}")
    assert 1 / 8 < layer_ratio < 0.135
    # what is not a decoder layer (tied embedding/lm_head, final norm) stays fp32 and dominates: 21% of SmolLM2
    assert sub_bytes - M.stored_bytes(M.get_layers(sub)) == full_bytes - M.stored_bytes(M.get_layers(full))
    assert sub_bytes < 0.3 * full_bytes
    batch_enc = tokenizer(["The capital of France is", "One, two, three,"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = sub(**batch_enc).logits
    assert torch.isfinite(logits).all()


def test_the_bundle_serializes_its_weights_in_memory_to_the_bytes_a_file_would_hold(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    """model_bundle writes only the small files (config, tokenizer) to TMPDIR; its model.safetensors is the same
    bytes that writing the checkpoint to a folder gives (at 8B that file was ~4 GB of TMPDIR and a read back)."""
    import tempfile

    from fedsoda_mpi import models

    full, tok = models.load_causal_lm(tiny_model_dir)
    sub = models.add_lora(models.build_sub_model(full, list(range(0, 30, 2)), quantize=True), [0, 1])
    written = []
    save_file = models._write_checkpoint
    monkeypatch.setattr(models, "_write_checkpoint", lambda *a, **k: written.append(k.get("weights", True)) or
                        save_file(*a, **k))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    bundle = models.model_bundle(sub, tok)
    assert written == [False] and list((tmp_path / "tmp").iterdir()) == []
    causal = models.causal_lm(sub)
    state = {k.replace(".base_layer.", "."): v for k, v in causal.state_dict().items() if "lora_" not in k}
    save_file(causal, causal.config, state, tmp_path / "ref")
    tok.save_pretrained(tmp_path / "ref")
    ref = {str(p.relative_to(tmp_path / "ref")): p.read_bytes() for p in sorted((tmp_path / "ref").rglob("*"))}
    assert bundle.keys() == ref.keys() and all(bundle[k] == ref[k] for k in ref)
