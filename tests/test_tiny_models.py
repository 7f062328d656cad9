"""The tiny model folders of tests/tiny_models.py (fixtures `tiny_model_dir`, `tiny_qwen2_dir`) are real model
folders for fedsoda-mpi: they pass every check `prepare_inputs` makes, load, score the label words, quantize to
NF4 on CPU, generate, and are rebuilt byte for byte. No MPI, no real model."""
import hashlib

import pytest
import torch

from fedsoda_mpi import evaluate as E
from fedsoda_mpi import model_folder as F, models as M
from fedsoda_mpi.data import load_rows
from tests import tiny_models as T


def test_the_tiny_llama_passes_the_model_checks(tiny_model_dir):
    assert F.check_model_folder(tiny_model_dir) == T.LAYERS == 30  # the default sgp n=3, p=4, 3 adapter layers fit
    F.check_weights(tiny_model_dir)
    names = F.linear_module_names(tiny_model_dir)
    assert len(names) == 30 * 7 and all(n.rsplit(".", 1)[-1] in M.DEFAULT_TARGETS for n in names)
    assert sum(p.stat().st_size for p in tiny_model_dir.iterdir()) < 10 * 2**20


def test_the_tiny_llama_loads_like_smollm2(tiny_model_dir):
    model, tok = M.load_causal_lm(tiny_model_dir)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.tie_word_embeddings and cfg.hidden_size == 64
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in SmolLM2
    assert len(tok) == cfg.vocab_size == T.VOCAB
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    assert tok.decode(tok("The answer is 42.\n\n### Response:").input_ids) == "The answer is 42.\n\n### Response:"
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)


@pytest.mark.parametrize("task", ["sst2", "boolq"])
def test_label_words_are_scorable(tiny_model_dir, task):
    model, tok = M.load_causal_lm(tiny_model_dir)
    ids = E.label_word_ids(tok, task)  # distinct first tokens
    assert len(set(ids)) == 2
    res = E.evaluate(model, tok, task, max_examples=4)
    assert res["n"] == 4 and 0 <= res["accuracy"] <= 1


def test_gsm8k_generation_runs(tiny_model_dir):
    model, tok = M.load_causal_lm(tiny_model_dir)
    res = E.gsm8k_accuracy(model, tok, load_rows("gsm8k", "test")[:2], load_rows("gsm8k", "train")[:8], k=2,
                           max_new_tokens=8, batch_size=2)
    assert res["n"] == 2 and len(res["outputs"]) == 2


def test_nf4_sub_model_on_cpu(tiny_model_dir):
    """bitsandbytes NF4 (blocksize 64) quantizes every kept decoder Linear, and LoRA gets gradients through it."""
    import bitsandbytes as bnb

    model, tok = M.load_causal_lm(tiny_model_dir)
    sub = M.build_sub_model(model, list(range(18)), quantize=True)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in sub.modules()) == 18 * 7
    assert M.stored_bytes(sub) < 0.3 * M.stored_bytes(model)
    sub = M.add_lora(sub, [15, 16, 17])
    params = M.set_trainable(sub, [15, 16, 17])
    ids = tok(["a short sentence to train on"], return_tensors="pt").input_ids
    sub(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)  # layer 15's LoRA gets its gradient through 4-bit 16, 17


def test_the_qwen2_folder_has_an_untied_output_head(tiny_qwen2_dir):
    assert F.check_model_folder(tiny_qwen2_dir) == 30
    model, tok = M.load_causal_lm(tiny_qwen2_dir)
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings is False
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.shape == emb.shape == (T.VOCAB, 64)
    assert head.data_ptr() != emb.data_ptr() and not torch.equal(head, emb)  # a separate lm_head tensor
    from safetensors import safe_open

    with safe_open(str(tiny_qwen2_dir / "model.safetensors"), "pt") as st:
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(st.keys())  # both stored


def test_the_folder_is_deterministic(tiny_model_dir, tmp_path):
    again = T.build_model(tmp_path / "again", "llama")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        digest = [hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (tiny_model_dir, again)]
        assert digest[0] == digest[1], name
