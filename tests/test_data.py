"""Tests for fedsoda_mpi.data: real file counts, prompts, SFT masking, partitions, error messages."""
import json

import numpy as np
import pytest
import torch

from fedsoda_mpi import data as D


@pytest.mark.parametrize("task,split,n", [("gsm8k", "train", 7473), ("gsm8k", "test", 1319),
                                          ("sst2", "train", 67349), ("sst2", "test", 872),
                                          ("boolq", "train", 9427), ("boolq", "test", 3270)])
def test_real_row_counts(task, split, n):
    assert len(D.load_rows(task, split)) == n


def test_wikitext_public_split_is_disjoint_and_covers_paragraphs(data_root):
    lines = (data_root / "wikitext2/test.txt").read_text().splitlines()
    assert len(lines) == 2891
    pool, held = D.load_public("wikitext2"), D.load_public("wikitext2", holdout=True)
    assert not set(pool) & set(held)
    assert abs(len(held) / (len(pool) + len(held)) - 0.1) < 0.01
    assert all(not t.startswith("=") and len(t.split()) >= D.PUBLIC_MIN_WORDS for t in pool + held)
    assert len(pool) + len(held) > 1500


def test_gsm8k_public_pool_is_train_only():
    pool = D.load_public("gsm8k") + D.load_public("gsm8k", holdout=True)
    assert len(pool) == 7473
    test_questions = {r["question"].strip() for r in D.load_rows("gsm8k", "test")}
    assert not any(q in pool[i] for i in range(0, 7473, 50) for q in list(test_questions)[:50])


def test_prompt_formats():
    p, a = D.prompt_and_answer("sst2", {"sentence": "a gorgeous film ", "label": 1})
    assert p.startswith("Below is an instruction that describes a task.")
    assert "sentence: a gorgeous film\n\nAnswer format: positive/negative\n\n### Response:\n" in p
    assert p.endswith("the correct answer is") and a == " positive"
    p, a = D.prompt_and_answer("boolq", {"question": "is the sky blue", "answer": False})
    assert "question: is the sky blue?\n\nAnswer format: true/false" in p
    assert p.endswith("### Response:\nthe correct answer is") and a == " false"
    row = D.load_rows("gsm8k", "train")[0]
    p, a = D.prompt_and_answer("gsm8k", row)
    assert p == D.TEMPLATE.format(instruction=row["question"]) and p.endswith("### Response:\n")
    assert a.endswith("#### 72") and "<<" not in a and "48/2 = 24 clips" in a


def test_labels_and_final_number():
    assert D.label_of("sst2", {"sentence": "x", "label": 0}) == 0
    assert D.label_of("boolq", {"question": "x", "answer": True}) == 1
    rows = D.load_rows("gsm8k", "train")
    counts = np.bincount([D.label_of("gsm8k", r) for r in rows], minlength=4)
    assert counts.tolist() == [1960, 2149, 1660, 1704]
    assert D.gsm8k_final_number("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert D.gsm8k_final_number("#### -5.\n\n### Instruction: #### 9") == "-5"
    assert all(D.gsm8k_final_number(r["answer"]).lstrip("-").replace(".", "").isdigit()
               for r in D.load_rows("gsm8k", "test"))
    with pytest.raises(ValueError):
        D.gsm8k_final_number("no final answer")


def test_kshot_prefix_is_deterministic():
    rows = D.load_rows("gsm8k", "train")
    a, b, c = (D.gsm8k_kshot_prefix(rows, 3, s) for s in (0, 0, 1))
    assert a == b != c
    assert a.count("### Instruction:") == 3 and a.count("####") == 3 and a.endswith("\n\n")


class CharTokenizer:
    """Minimal tokenizer with a BOS: one id per printable ASCII character (ord - 22), bos=1, eos=2."""
    bos_token_id, eos_token_id, pad_token_id, eos_token, pad_token = 1, 2, None, "</s>", None

    def __call__(self, text, add_special_tokens=True):
        def enc(s):
            return ([1] if add_special_tokens else []) + [ord(ch) - 22 for ch in s]
        return {"input_ids": [enc(t) for t in text] if isinstance(text, list) else enc(text)}


def test_tokenize_sft_keeps_bos_and_answer_when_truncating():
    tok = CharTokenizer()
    ex = D.tokenize_sft(tok, "abcdefgh", "xyz", max_len=100)
    assert ex["input_ids"][0] == 1 and ex["input_ids"][-1] == 2 and len(ex["input_ids"]) == 1 + 8 + 3 + 1
    assert ex["labels"] == [-100] * 9 + ex["input_ids"][9:]
    cut = D.tokenize_sft(tok, "abcdefgh", "xyz", max_len=7)
    assert cut["input_ids"] == [1, ord("g") - 22, ord("h") - 22] + ex["input_ids"][9:]
    assert cut["labels"][:3] == [-100] * 3 and cut["labels"][3:] == ex["input_ids"][9:]
    long_answer = D.tokenize_sft(tok, "ab", "x" * 50, max_len=10)
    assert len(long_answer["input_ids"]) == 10 and long_answer["labels"][:2] == [-100, -100]
    with pytest.raises(ValueError):
        D.tokenize_sft(tok, "ab", "x", max_len=2)


def test_pad_batch_right_pads():
    b = D.pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_ensure_pad_token():
    tok = CharTokenizer()
    assert D.ensure_pad_token(tok).pad_token == "</s>"
    tok = CharTokenizer()
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an eos"):
        D.ensure_pad_token(tok)


@pytest.mark.real
def test_sft_masking_with_smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    tok = D.ensure_pad_token(AutoTokenizer.from_pretrained(smollm2_dir))
    prompt, answer = D.prompt_and_answer("sst2", {"sentence": "a gorgeous film", "label": 1})
    ex = D.tokenize_sft(tok, prompt, answer, max_len=256)
    n_prompt = len(tok(prompt)["input_ids"])
    answer_ids = tok(" positive", add_special_tokens=False)["input_ids"]
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == answer_ids + [tok.eos_token_id] == ex["input_ids"][n_prompt:]
    assert tok.decode(ex["input_ids"][:n_prompt]) == prompt
    short = D.tokenize_sft(tok, prompt, answer, max_len=20)
    assert len(short["input_ids"]) == 20
    assert short["input_ids"][-len(answer_ids) - 1:] == answer_ids + [tok.eos_token_id]
    batches = D.public_batches(tok, D.load_public("wikitext2", holdout=True)[:5], max_len=64, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0]["input_ids"].shape[1] <= 64 and batches[0]["attention_mask"].dtype == torch.long


def _mean_tv(labels, parts, n_classes):
    hist = D.label_histogram(labels, parts, n_classes).astype(float)
    glob = np.bincount(labels, minlength=n_classes) / len(labels)
    return float(np.mean(0.5 * np.abs(hist / hist.sum(1, keepdims=True) - glob).sum(1)))


LABELS = np.random.default_rng(0).integers(0, 4, size=4000)


@pytest.mark.parametrize("split,beta", [("iid", 1.0), ("dirichlet", 0.1), ("dirichlet", 1000.0)])
def test_partition_assigns_every_sample_once(split, beta):
    parts = D.partition(LABELS, 10, split, beta, seed=3)
    allidx = np.concatenate(parts)
    assert len(parts) == 10 and min(len(p) for p in parts) > 0
    assert np.array_equal(np.sort(allidx), np.arange(len(LABELS)))
    assert D.label_histogram(LABELS, parts, 4).sum() == len(LABELS)


def test_dirichlet_skew_orders_with_beta():
    tv = {b: _mean_tv(LABELS, D.partition(LABELS, 10, "dirichlet", b, seed=0), 4) for b in (0.1, 1000.0)}
    tv_iid = _mean_tv(LABELS, D.partition(LABELS, 10, "iid", 0.0, seed=0), 4)
    assert tv[1000.0] < 0.05 and tv_iid < 0.05
    assert tv[0.1] > 0.4 > tv[1000.0]


def test_partition_determinism_and_errors():
    a = D.partition(LABELS, 7, "dirichlet", 0.5, seed=11)
    b = D.partition(LABELS, 7, "dirichlet", 0.5, seed=11)
    c = D.partition(LABELS, 7, "dirichlet", 0.5, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    for beta in (0.0, -1.0):
        with pytest.raises(ValueError, match="beta"):
            D.partition(LABELS, 7, "dirichlet", beta, seed=0)
    with pytest.raises(ValueError, match="beta=0.001.*200 clients"):
        D.partition(np.zeros(300, dtype=int), 200, "dirichlet", 0.001, seed=0)
    with pytest.raises(ValueError):
        D.partition(LABELS, 7, "shards", 0.5, seed=0)


def test_client_datasets_subsample():
    rows, hist = D.client_datasets("boolq", 4, "dirichlet", 0.5, seed=1, max_per_client=100)
    again, hist2 = D.client_datasets("boolq", 4, "dirichlet", 0.5, seed=1, max_per_client=100)
    assert rows == again and np.array_equal(hist, hist2)
    assert [len(r) for r in rows] == hist.sum(1).tolist() and max(len(r) for r in rows) <= 100
    assert hist.shape == (4, 2)
    assert all(int(r["answer"]) in (0, 1) for client in rows for r in client)


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_malformed_json_names_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSODA_DATA", str(tmp_path))
    path = _write(tmp_path, "sst2/train.jsonl", '{"sentence": "ok", "label": 1}\n\n{"sentence": "bad", \n')
    with pytest.raises(D.DataError, match=rf"{path}:3: bad JSON.*fedsoda_mpi.prepare data"):
        D.load_rows("sst2", "train")


@pytest.mark.parametrize("final", ["seventy-two", "", "72%", "1/2"])
def test_gsm8k_final_answer_that_is_not_a_number_names_file_and_line(tmp_path, monkeypatch, final):
    """Such an answer was accepted and could never be scored correct."""
    monkeypatch.setenv("FEDSODA_DATA", str(tmp_path))
    good = [json.dumps({"question": "q", "answer": f"1+1=2\n#### {n}"}) for n in ("2", "-3", "$1,000", "2.5.")]
    bad = json.dumps({"question": "q", "answer": f"2\n#### {final}"})
    path = _write(tmp_path, "gsm8k/test.jsonl", "\n".join(good + [bad]) + "\n")
    with pytest.raises(D.DataError) as e:
        D.load_rows("gsm8k", "test")
    assert str(e.value) == (f"{path}:5: the final answer after '####' must be a number (e.g. '#### 72'), got "
                            f"'#### {final}'; {D.FIX}")
    path.write_text("\n".join(good) + "\n")
    assert len(D.load_rows("gsm8k", "test")) == 4


def test_gsm8k_answer_without_final_and_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSODA_DATA", str(tmp_path))
    good = json.dumps({"question": "q", "answer": "1+1=2\n#### 2"})
    path = _write(tmp_path, "gsm8k/test.jsonl", good + "\n" + json.dumps({"question": "q", "answer": "2"}) + "\n")
    with pytest.raises(D.DataError, match=rf"{path}:2: answer lacks"):
        D.load_rows("gsm8k", "test")
    with pytest.raises(D.DataError, match=r"missing data file .*boolq/train.jsonl.*prepare data"):
        D.load_rows("boolq", "train")
    assert D.data_dir() == tmp_path


def test_validation_rows_are_fixed_and_never_trained_on(monkeypatch):
    """The validation set is the same for every run seed and split; no client partition contains its rows
    (rows are told apart by their line in train.jsonl: SST-2 repeats some phrases on several lines)."""
    real = D.load_rows
    monkeypatch.setattr(D, "load_rows", lambda task, split: [{**r, "line": i} for i, r in enumerate(real(task, split))])
    rows = D.load_rows("sst2", "train")
    held = D.validation_index(rows, "sst2", 300)
    assert len(set(held.tolist())) == 300 and np.array_equal(held, D.validation_index(rows, "sst2", 300))
    assert all(len(rows[i]["sentence"].split()) >= 10 for i in held)  # sentences, like the test split
    train, val = D.split_train_val(rows, "sst2", 300)
    val_texts = {r["sentence"] for r in val}
    assert val == [rows[i] for i in held] and not val_texts & {r["sentence"] for r in train}  # no duplicate text
    assert len(rows) - 300 - 10 < len(train) <= len(rows) - 300
    val_keys = {r["line"] for r in val}
    for seed, split in ((0, "iid"), (1, "dirichlet")):
        parts, _ = D.client_datasets("sst2", 4, split, 0.5, seed, max_per_client=None, val_size=300)
        assert sum(len(p) for p in parts) == len(train)
        assert not val_keys & {r["line"] for p in parts for r in p}
    assert D.split_train_val(rows, "sst2", 0) == (rows, [])  # val_size=0: the partition of before
    with pytest.raises(ValueError, match="validation size"):
        D.validation_index(rows[:10], "sst2", 10)


def test_pooled_client_holds_the_union_of_the_partition():
    """data.pooled_clients=K: the centralized ceiling trains on exactly the examples of K clients."""
    parts, hist = D.client_datasets("sst2", 5, "iid", 0.5, 3, max_per_client=8, val_size=50)
    (pooled,), phist = D.client_datasets("sst2", 1, "iid", 0.5, 3, max_per_client=8, val_size=50, pooled=5)
    assert pooled == [r for p in parts for r in p] and len(pooled) == 40
    assert phist.tolist() == [hist.sum(0).tolist()]
