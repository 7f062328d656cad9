"""Tests of fedsoda_mpi.evaluate: final-number extraction, label-word likelihood (fast path == naive full
forward, for plain / LoRA / NF4 models), batched == unbatched greedy GSM8K generation, perplexity, and the
real SmolLM2-135M base accuracy (marked `real`)."""
import json
import time

import numpy as np
import pytest
import torch

from conftest import tiny_causal_lm
from fedsoda_mpi import answers
from fedsoda_mpi import evaluate as ev
from fedsoda_mpi import models as M
from fedsoda_mpi.data import LABEL_WORDS, gsm8k_final_number, label_of, load_rows, prompt_and_answer


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A byte-level BPE (vocab 2000) trained on the task prompts; ids 0/1/2 = endoftext/im_start/im_end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["".join(prompt_and_answer(task, row)) for task in ("sst2", "boolq", "gsm8k")
             for row in load_rows(task, "train")[:1500]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>")


@pytest.fixture
def tiny_lm(tiny_tokenizer):
    return tiny_causal_lm("llama", layers=2, hidden=64, vocab=len(tiny_tokenizer))


def naive_label_logits(model, tokenizer, task, rows):
    """Reference: the full model on each unpadded prompt alone, logits of the label words at the last token."""
    ids = ev.label_word_ids(tokenizer, task)
    out = []
    with torch.no_grad():
        for row in rows:
            x = torch.tensor([tokenizer(prompt_and_answer(task, row)[0]).input_ids])
            out.append(model(input_ids=x).logits[0, -1, ids].numpy())
    return np.stack(out)


# ---------------------------------------------------------------- extract_number

@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("The total is 1,234,567 dollars.", "1234567"),
    ("She pays $5.", "5"),
    ("It costs $1,250.50 in total.", "1250.5"),
    ("The answer is 12.", "12"),
    ("So the answer is: $18 per day. Then 3 more days pass.", "18"),
    ("First 3 apples, then 4 more.\nThe answer is 7. Check: 3 + 4 = 7, not 8", "7"),
    ("He is 5 now, so the answer is 6 years.\n#### 42", "42"),
    ("#### 42\n\n#### 7", "42"),
    ("####\nShe ends with 9 cookies", "9"),
    ("The temperature dropped to -3 degrees.", "-3"),
    ("The change is -12.50 dollars.", "-12.5"),
    ("#### -8", "-8"),
    ("Pages 3-4 are missing, so 10-4 = 6", "6"),
    ("- 5 apples\n- 7 pears", "7"),
    ("It weighs 5.0 kg", "5"),
    ("0.50 of the cake, i.e. 0.5", "0.5"),
    ("She has 007 marbles", "7"),
    ("-0 degrees", "0"),
    ("A ratio of 2.5.", "2.5"),
    ("About 50% of 20 is 10.", "10"),
    ("The answer is 3\n\n", "3"),
    ("I do not know.", None),
    ("", None),
    ("#### none", None),
])
def test_extract_number(text, expected):
    assert answers.extract_number(text) == expected


def test_extract_number_agrees_with_every_gsm8k_reference():
    for row in load_rows("gsm8k", "test"):
        assert float(answers.extract_number(row["answer"])) == float(gsm8k_final_number(row["answer"]))


def test_truncate_and_stop_on_strings(tiny_tokenizer):
    solution, reasoning = "3 + 4 = 7\n#### 7", "3 + 4 = 7"
    for stop in answers.STOP_STRINGS:
        assert answers.truncate_at_stop(f"{reasoning}\n\n{stop}:\nWhat is 2+2?") == reasoning + "\n\n"
        assert answers.truncate_at_stop(f"{solution}\n\n{stop}:\nWhat is 2+2?") == solution  # the answer line ends it
    assert answers.truncate_at_stop(solution) == solution
    assert answers.truncate_at_stop(solution + "\n#### 22\n#### 22") == solution  # a model that repeats answers
    assert answers.truncate_at_stop("####\n7\n#### 8\n") == "####\n7\n#### 8\n"  # no number on the "####" line
    prompt = tiny_tokenizer("### Response:\n").input_ids
    rows = [prompt + tiny_tokenizer(solution).input_ids,
            prompt + tiny_tokenizer(solution + "\n\nBelow is an instruction").input_ids,
            prompt + tiny_tokenizer(reasoning + "\n").input_ids,
            prompt + tiny_tokenizer(solution + "\n").input_ids]
    width = max(map(len, rows))
    batch = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    stop = ev._StopOnStrings(tiny_tokenizer, len(prompt))(batch, torch.zeros(4, 5))
    assert stop.tolist() == [False, True, False, True]


def test_stopping_at_the_answer_line_never_changes_the_answer():
    """Generation stops at the first prefix `answers.truncate_at_stop` cuts; the answer extracted there must be the one
    the whole text (cut at stop strings only, as before the answer-line end existed) gives, for every character prefix
    of real GSM8K solutions followed by what models go on to write."""
    tails = ["", "\n#### 22\n#### 22\n", "\n\n### Instruction:\nWhat is 5 - 1?\n#### 4\n", ". So 12.\nThe answer is 9",
             "\nBelow is an instruction #### 3\n", "0\n", ".5 dollars\n", ",000\n#### 1\n"]
    heads = ["", "####\n6\n", "#### $\n", "#### -", "So the answer is 8\n"]
    texts = [h + answers.truncate_at_stop(r["answer"]) + t
             for i, r in enumerate(load_rows("gsm8k", "test")[:40]) for h, t in [(heads[i % 5], tails[i % 8])]]
    texts += ["#### 8.", "#### 8.\n5", "#### 1,23\n4", "####8\n9", "no marker 5 and 7\n#### \n 9\n", "#### x\ny 3\n"]
    fired = 0
    for text in texts:
        # journal format 1: no answer-line end
        whole = answers.extract_number(answers.cut_at_stop_strings(text).rstrip())
        for n in range(len(text) + 1):
            cut = answers.truncate_at_stop(text[:n])
            if cut != text[:n]:  # the stopping criterion fires here
                assert answers.extract_number(cut.rstrip()) == whole, (text, n)
                fired += 1
                break
        assert answers.extract_number(answers.truncate_at_stop(text).rstrip()) == whole
    assert fired >= len(texts) // 2  # the criterion did fire on most texts, so the check above ran


# ---------------------------------------------------------------- label-word likelihood

def test_label_word_ids(tiny_tokenizer, monkeypatch):
    for task, words in LABEL_WORDS.items():
        ids = ev.label_word_ids(tiny_tokenizer, task)
        assert ids == [tiny_tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in words]
        assert len(set(ids)) == 2
    with pytest.raises(ValueError, match="no label words"):
        ev.label_word_ids(tiny_tokenizer, "gsm8k")
    monkeypatch.setitem(LABEL_WORDS, "sst2", ("positive", "positive"))
    with pytest.raises(ValueError, match="share a first token"):
        ev.label_word_ids(tiny_tokenizer, "sst2")


@pytest.mark.parametrize("task", ["sst2", "boolq"])
def test_label_accuracy_matches_naive_full_forward(tiny_lm, tiny_tokenizer, task):
    rows = load_rows(task, "test")[:40]
    head_inputs = []
    hook = tiny_lm.lm_head.register_forward_hook(lambda m, args, out: head_inputs.append(tuple(args[0].shape)))
    res = ev.label_accuracy(tiny_lm, tiny_tokenizer, task, rows, batch_size=8, max_examples=13)
    hook.remove()
    assert res["n"] == 13
    # the LM head only ever sees one hidden vector per row: batches of 8 + 5 rows, never a sequence
    assert sorted(head_inputs) == [(5, 64), (8, 64)]
    ref = naive_label_logits(tiny_lm, tiny_tokenizer, task, rows[:13])
    np.testing.assert_allclose(res["label_logits"], ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(res["predictions"], ref.argmax(1))
    labels = np.array([label_of(task, r) for r in rows[:13]])
    assert res["accuracy"] == pytest.approx(np.mean(res["predictions"] == labels))
    # per-class counts of predictions and answers (a one-class model scores the majority share)
    assert res["pred_counts"] == [int(np.sum(res["predictions"] == c)) for c in range(2)]
    assert res["label_counts"] == [int(np.sum(labels == c)) for c in range(2)] and sum(res["label_counts"]) == 13


def test_label_accuracy_peft_lora_restores_training_mode(tiny_lm, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    rows = load_rows("sst2", "test")[:9]
    base_ref = naive_label_logits(tiny_lm, tiny_tokenizer, "sst2", rows)
    model = get_peft_model(tiny_lm, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                                               init_lora_weights=False))
    model.train()
    frozen = model.base_model.model.model.layers[0].self_attn
    frozen.eval()
    before = {name: m.training for name, m in model.named_modules()}
    res = ev.label_accuracy(model, tiny_tokenizer, "sst2", rows, batch_size=4)
    assert {name: m.training for name, m in model.named_modules()} == before
    model.eval()
    ref = naive_label_logits(model, tiny_tokenizer, "sst2", rows)
    assert np.abs(ref - base_ref).max() > 1e-3  # the LoRA is active ...
    np.testing.assert_allclose(res["label_logits"], ref, atol=1e-4, rtol=1e-4)  # ... in the fast path too
    np.testing.assert_array_equal(res["predictions"], ref.argmax(1))


def test_label_accuracy_nf4_model_never_repacks(tiny_lm, tiny_tokenizer, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_lm.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized
    rows = load_rows("boolq", "test")[:6]
    res = ev.label_accuracy(model, tiny_tokenizer, "boolq", rows, batch_size=4)
    assert all(not m.support_avx512bf16_for_cpu for m in quantized)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantized)
    ref = naive_label_logits(model, tiny_tokenizer, "boolq", rows)
    np.testing.assert_allclose(res["label_logits"], ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(res["predictions"], ref.argmax(1))


def test_bad_inputs(tiny_lm, tiny_tokenizer):
    rows = load_rows("sst2", "test")[:4]
    with pytest.raises(ValueError, match="max_examples"):
        ev.label_accuracy(tiny_lm, tiny_tokenizer, "sst2", rows, max_examples=0)
    with pytest.raises(ValueError, match="no rows"):
        ev.label_accuracy(tiny_lm, tiny_tokenizer, "sst2", [])
    with pytest.raises(ValueError, match="unknown task"):
        ev.evaluate(tiny_lm, tiny_tokenizer, "wikitext2")


# ---------------------------------------------------------------- GSM8K generation

def test_gsm8k_batched_equals_unbatched(tiny_lm, tiny_tokenizer):
    # an untied random head: a tied tiny random model just repeats the prompt's last token ("\n")
    tiny_lm.lm_head.weight = torch.nn.Parameter(torch.randn(tiny_lm.lm_head.weight.shape,
                                                            generator=torch.Generator().manual_seed(0)))
    rows, train = load_rows("gsm8k", "test")[:3], load_rows("gsm8k", "train")
    side = tiny_tokenizer.padding_side
    kw = dict(k=1, max_new_tokens=6, max_examples=3, seed=1)
    batched = ev.gsm8k_accuracy(tiny_lm, tiny_tokenizer, rows, train, batch_size=3, **kw)
    single = ev.gsm8k_accuracy(tiny_lm, tiny_tokenizer, rows, train, batch_size=1, **kw)
    assert tiny_tokenizer.padding_side == side
    assert batched["n"] == 3 and 0.0 <= batched["accuracy"] <= 1.0
    assert batched["outputs"] == single["outputs"]
    assert all(batched["outputs"])
    print(f"\ntiny-model GSM8K outputs: {batched['outputs']}")


def _sensitive_tiny_lm(model):
    """An untied random head (a tied tiny random model just repeats the prompt's last token "\\n") and q/k
    projections scaled x10: at init the attention scores are ~0.03, attention is nearly uniform and a wrong
    position id (RoPE) or an attended pad would hardly change the greedy tokens."""
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape,
                                                          generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10.0)
            layer.self_attn.k_proj.weight.mul_(10.0)
    return model


class _GenerateSpy:
    """Records, for every model.generate call, its prompt width and whether it got a prefix KV cache, and the
    sequence length of every forward through the token embedding."""

    def __init__(self, model):
        self.calls, self.embedded = [], []
        self._generate = model.generate
        model.generate = self
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        hf.model.embed_tokens.register_forward_hook(lambda m, args, out: self.embedded.append(args[0].shape[1]))

    def __call__(self, **kw):
        past = kw.get("past_key_values")
        self.calls.append((kw["input_ids"].shape[1], None if past is None else past.get_seq_length()))
        return self._generate(**kw)


GSM8K_KW = dict(k=2, max_new_tokens=8, seed=3)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_gsm8k_prefix_cache_equals_naive_loop(tiny_lm, tiny_tokenizer, batch_size):
    _sensitive_tiny_lm(tiny_lm)
    rows, train = load_rows("gsm8k", "test")[:5], load_rows("gsm8k", "train")
    lengths = [len(tiny_tokenizer(prompt_and_answer("gsm8k", r)[0]).input_ids) for r in rows]
    assert len(set(lengths)) == 5  # questions of different lengths: batches have pads between prefix and question
    naive = ev.gsm8k_accuracy(tiny_lm, tiny_tokenizer, rows, train, batch_size=1, prefix_cache=False, **GSM8K_KW)
    spy = _GenerateSpy(tiny_lm)
    cached = ev.gsm8k_accuracy(tiny_lm, tiny_tokenizer, rows, train, batch_size=batch_size, **GSM8K_KW)
    assert cached["outputs"] == naive["outputs"]
    assert all(cached["outputs"]) and len(set(naive["outputs"])) > 1
    np.testing.assert_array_equal(cached["correct"], naive["correct"])
    # the prefix went through the model once; every batch started from its cache and prefilled only the questions
    n_prefix = spy.calls[0][1]
    assert n_prefix > 2 * max(lengths)
    assert [past for _, past in spy.calls] == [n_prefix] * -(-5 // batch_size)
    assert spy.embedded.count(n_prefix) == 1  # prefix forward; then question batches of <= "\n\n" + question tokens
    assert max(n for n in spy.embedded if n != n_prefix) <= max(lengths) + 2


def test_gsm8k_prefix_cache_peft_lora(tiny_lm, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    _sensitive_tiny_lm(tiny_lm)
    rows, train = load_rows("gsm8k", "test")[5:9], load_rows("gsm8k", "train")
    base = ev.gsm8k_accuracy(tiny_lm, tiny_tokenizer, rows, train, batch_size=1, prefix_cache=False, **GSM8K_KW)
    model = get_peft_model(tiny_lm, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj"],
                                               init_lora_weights=False))
    model.train()
    naive = ev.gsm8k_accuracy(model, tiny_tokenizer, rows, train, batch_size=1, prefix_cache=False, **GSM8K_KW)
    spy = _GenerateSpy(model)
    cached = ev.gsm8k_accuracy(model, tiny_tokenizer, rows, train, batch_size=3, **GSM8K_KW)
    assert model.training and all(m.training for m in model.modules())  # training flags restored
    assert [past is not None for _, past in spy.calls] == [True, True]
    assert naive["outputs"] != base["outputs"]  # the LoRA (on k/v too: the cached prefix) changes the outputs ...
    assert cached["outputs"] == naive["outputs"]  # ... and the prefix cache was computed with it


def test_generate_prefix_token_boundary_fallback(tiny_lm, tiny_tokenizer):
    """Only prompts whose own tokens start with the shared prefix's tokens use its cache; the others (here the
    prefix "...Bel" against prompts going on "Below", one token) take the whole-prompt path."""
    from fedsoda_mpi.data import gsm8k_kshot_prefix

    _sensitive_tiny_lm(tiny_lm)
    rows, train = load_rows("gsm8k", "test")[:4], load_rows("gsm8k", "train")
    prefix = gsm8k_kshot_prefix(train, 2, 3)
    prompts = [prefix + prompt_and_answer("gsm8k", r)[0] for r in rows]
    prompts[2] = prefix + "Bel" + prompts[2][len(prefix) + len("Below"):]  # "Bel is an instruction ..."
    shared = prefix + "Bel"
    encode = lambda text: tiny_tokenizer(text).input_ids  # noqa: E731
    n_prefix = len(encode(shared))
    assert [encode(p)[:n_prefix] == encode(shared) for p in prompts] == [False, False, True, False]
    naive = [ev._generate(tiny_lm, tiny_tokenizer, [p], 8, 1)[0] for p in prompts]
    with M.mode(tiny_lm):
        spy = _GenerateSpy(tiny_lm)
        assert ev._generate(tiny_lm, tiny_tokenizer, prompts, 8, 4, shared_prefix=shared) == naive
    assert spy.calls == [(len(encode(prompts[2])), n_prefix),
                         (max(len(encode(p)) for i, p in enumerate(prompts) if i != 2), None)]


def test_gsm8k_scoring(monkeypatch, tiny_lm, tiny_tokenizer):
    rows, train = load_rows("gsm8k", "test")[:5], load_rows("gsm8k", "train")
    gold = [prompt_and_answer("gsm8k", r)[1] for r in rows]
    monkeypatch.setattr(ev, "_generate", lambda model, tok, prompts, n, b, **kw: [
        g.split("####")[0] + "The answer is " + g.split("####")[1] for g in gold])
    assert ev.gsm8k_accuracy(tiny_lm, tiny_tokenizer, rows, train)["accuracy"] == 1.0
    monkeypatch.setattr(ev, "_generate", lambda model, tok, prompts, n, b, **kw: gold[1:] + gold[:1])
    res = ev.gsm8k_accuracy(tiny_lm, tiny_tokenizer, rows, train)
    assert res["accuracy"] == 0.0 and res["outputs"] == gold[1:] + gold[:1]


# ---------------------------------------------------------------- perplexity

def test_perplexity_matches_hf_loss(tiny_lm, tiny_tokenizer):
    texts = ["The quick brown fox jumps over the lazy dog again and again.", "A", "Numbers: 1, 2, 3, 4."]
    ids = [torch.tensor([tiny_tokenizer(t).input_ids]) for t in texts]
    assert ids[1].shape[1] == 1  # a one-token text has nothing to predict and is skipped
    with torch.no_grad():
        nll = [tiny_lm(input_ids=x, labels=x).loss.item() * (x.shape[1] - 1) for x in (ids[0], ids[2])]
    expected = np.exp(sum(nll) / (ids[0].shape[1] + ids[2].shape[1] - 2))
    assert ev.perplexity(tiny_lm, tiny_tokenizer, texts) == pytest.approx(expected, rel=1e-4)
    assert ev.perplexity(tiny_lm, tiny_tokenizer, texts[:1], max_len=5) != pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="two or more tokens"):
        ev.perplexity(tiny_lm, tiny_tokenizer, ["A"])


# ---------------------------------------------------------------- the real SmolLM2-135M

@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
            AutoTokenizer.from_pretrained(smollm2_dir))


@pytest.mark.real
def test_label_word_ids_smollm2(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    for task in LABEL_WORDS:
        ids = ev.label_word_ids(tok, task)
        assert len(set(ids)) == 2
        assert [tok.decode([i]) for i in ids] == [" " + w for w in LABEL_WORDS[task]]


@pytest.mark.real
def test_real_smollm2_label_accuracy(smollm2):
    model, tok = smollm2
    for task, n in (("sst2", 64), ("boolq", 32)):
        start = time.perf_counter()
        res = ev.evaluate(model, tok, task, max_examples=n, batch_size=8)
        print(f"\nSmolLM2-135M base {task}: accuracy {res['accuracy']:.3f} on n={res['n']}, "
              f"predicted class 1 for {res['predictions'].mean():.2f}, {time.perf_counter() - start:.1f} s")
        assert res["n"] == n and 0.0 <= res["accuracy"] <= 1.0
        if task == "sst2":
            assert res["accuracy"] > 0.45


@pytest.mark.real
@pytest.mark.slow
def test_real_smollm2_gsm8k_and_perplexity(smollm2):
    from fedsoda_mpi.data import load_public

    model, tok = smollm2
    start = time.perf_counter()
    res = ev.evaluate(model, tok, "gsm8k", max_examples=4, batch_size=4, k_shot=4, max_new_tokens=128)
    per_example = (time.perf_counter() - start) / 4
    print(f"\nSmolLM2-135M base GSM8K 4-shot: accuracy {res['accuracy']:.2f} on n={res['n']}, "
          f"{per_example:.1f} s/example; outputs: {res['outputs']}")
    assert res["n"] == 4 and 0.0 <= res["accuracy"] <= 1.0 and len(res["outputs"]) == 4
    assert all(isinstance(o, str) and "Below is an instruction" not in o for o in res["outputs"])
    ppl = ev.perplexity(model, tok, load_public("wikitext2", holdout=True)[:4], max_len=128)
    print(f"SmolLM2-135M perplexity on 4 held-out WikiText-2 paragraphs: {ppl:.1f}")
    assert 5 < ppl < 200


# ---------------------------------------------------------------- resumable GSM8K evaluation (Journal)

class _Stop(Exception):
    pass


def _stop_after(n_batches: int):
    """A progress callback that stops the evaluation after `n_batches` batches (what SIGUSR1 does on rank 0)."""
    seen = []

    def progress(done, total, generated):
        seen.append((done, total, generated))
        if len(seen) == n_batches:
            raise _Stop()

    return progress, seen


def test_gsm8k_journal_resumes_a_stopped_evaluation_exactly(tiny_lm, tiny_tokenizer, tmp_path):
    _sensitive_tiny_lm(tiny_lm)
    rows, train = load_rows("gsm8k", "test")[:7], load_rows("gsm8k", "train")
    kw = dict(batch_size=2, **GSM8K_KW)
    whole = ev.gsm8k_accuracy(tiny_lm, tiny_tokenizer, rows, train, **kw)
    path = tmp_path / "eval" / "full.jsonl"
    progress, seen = _stop_after(2)
    with pytest.raises(_Stop):
        ev.gsm8k_accuracy(tiny_lm, tiny_tokenizer, rows, train, journal=path, progress=progress, **kw)
    assert seen == [(2, 7, 2), (4, 7, 4)]
    assert len(path.read_text().splitlines()) == 3  # the fingerprint, then one line per finished batch
    spy = _GenerateSpy(tiny_lm)
    progress, seen = _stop_after(-1)
    again = ev.gsm8k_accuracy(tiny_lm, tiny_tokenizer, rows, train, journal=path, progress=progress, **kw)
    assert len(spy.calls) == 2  # only the two batches (2 + 1 questions) not kept
    assert seen == [(2, 7, 0), (4, 7, 0), (6, 7, 2), (7, 7, 3)] and again["resumed"] == 4
    kept_s = [json.loads(line)["s"] for line in path.read_text().splitlines()[1:]]
    assert len(kept_s) == 4 and min(kept_s) > 0  # every batch's generation seconds, whichever attempt ran it
    assert again["seconds"] >= sum(kept_s[:2])  # the earlier attempt's batches count in the evaluation's time
    assert again["outputs"] == whole["outputs"] and again["accuracy"] == whole["accuracy"]
    assert len(set(whole["outputs"])) > 1
    spy.calls.clear()  # a finished journal answers everything without the model
    assert ev.gsm8k_accuracy(tiny_lm, tiny_tokenizer, rows, train, journal=path, **kw)["outputs"] == whole["outputs"]
    assert spy.calls == []


def test_gsm8k_journal_drops_a_cut_line_and_restarts_for_another_model(tiny_lm, tiny_tokenizer, tmp_path):
    _sensitive_tiny_lm(tiny_lm)
    rows, train = load_rows("gsm8k", "test")[:4], load_rows("gsm8k", "train")
    kw = dict(batch_size=1, **GSM8K_KW)
    path = tmp_path / "sub.jsonl"
    whole = ev.gsm8k_accuracy(tiny_lm, tiny_tokenizer, rows, train, journal=path, **kw)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # SIGKILL in the middle of the third batch's line
    spy = _GenerateSpy(tiny_lm)
    again = ev.gsm8k_accuracy(tiny_lm, tiny_tokenizer, rows, train, journal=path, **kw)
    assert len(spy.calls) == 2 and again["resumed"] == 2 and again["outputs"] == whole["outputs"]
    batches = lambda text: [{k: v for k, v in json.loads(line).items() if k != "s"}  # noqa: E731
                            for line in text.splitlines()[1:]]
    assert batches(path.read_text()) == batches("\n".join(lines))  # the cut line was replaced by the regenerated batch
    # other decoding settings, or other adapter weights: the journal is not theirs, it starts over
    spy.calls.clear()
    ev.gsm8k_accuracy(tiny_lm, tiny_tokenizer, rows, train, journal=path, batch_size=1, k=2, max_new_tokens=7, seed=3)
    assert len(spy.calls) == 4
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_lm, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    a = ev.fingerprint(model, ["x"], batch_size=1)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1e-3)
    assert ev.fingerprint(model, ["x"], batch_size=1)["weights_sha256"] != a["weights_sha256"]
    assert ev.fingerprint(model, ["y"], batch_size=1)["prompts_sha256"] != a["prompts_sha256"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ev.fingerprint(model, ["x"], batch_size=1)["autocast"] == "torch.bfloat16" != a["autocast"]
