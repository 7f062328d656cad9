"""Bounded input lengths (fedsoda_mpi/lengths.py): a very long row in the training, test or public data of any task
is cut to its limit with the answer kept, counted, and changes nothing else; a batch never holds more than batch
size x limit tokens. Unit tests on the tiny model folder's BPE tokenizer (tests/tiny_models.py) and a tiny random
LM; no MPI."""
import pytest
import torch
from transformers import AutoTokenizer

from fedsoda_mpi import data as D
from fedsoda_mpi import evaluate as E
from fedsoda_mpi import lengths as N
from fedsoda_mpi.config import ConfigError
from tests.conftest import tiny_causal_lm

LONG = 200_000  # characters of the long rows (issue 33: such a test row made the final evaluation allocate 32 GB)
MAX_LEN = 128


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return D.ensure_pad_token(AutoTokenizer.from_pretrained(tiny_model_dir))


def long_text(seed: str = "word") -> str:
    """LONG characters of distinct-looking words, ending with a recognisable tail."""
    words = " ".join(f"{seed}{i % 97}" for i in range(LONG // 6))
    return (words + " the final words of the text")[-LONG:]


def rows_of(task: str, text: str) -> dict:
    if task == "sst2":
        return {"sentence": text, "label": 1}
    if task == "boolq":
        return {"question": text, "answer": True}
    return {"question": text, "answer": "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"}


def n_example(tok, task: str, row: dict) -> tuple[list[int], list[int]]:
    prompt, answer = D.prompt_and_answer(task, row)
    return tok(prompt)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@pytest.mark.parametrize("task", ["sst2", "boolq", "gsm8k"])
def test_a_long_row_is_cut_from_the_left_and_keeps_template_and_answer(tok, task):
    row = rows_of(task, long_text())
    fitted, cut = N.fit_example(tok, task, row, MAX_LEN)
    assert cut
    prompt_ids, answer_ids = n_example(tok, task, fitted)
    assert len(prompt_ids) + len(answer_ids) <= MAX_LEN
    assert len(prompt_ids) + len(answer_ids) >= MAX_LEN - 4  # the window is used, not emptied
    key = "sentence" if task == "sst2" else "question"
    assert fitted[key] and row[key].endswith(fitted[key])  # the end of the text, next to the answer, stays
    prompt, answer = D.prompt_and_answer(task, fitted)
    assert prompt.startswith("Below is an instruction") and answer == D.prompt_and_answer(task, row)[1]
    ex = D.tokenize_sft(tok, prompt, answer, MAX_LEN)
    assert ex["input_ids"] == prompt_ids + answer_ids  # tokenize_sft has nothing left to cut


@pytest.mark.parametrize("task", ["sst2", "boolq", "gsm8k"])
def test_rows_that_fit_are_returned_unchanged_and_only_long_ones_counted(tok, task):
    rows = D.load_rows(task, "train")[:20]
    fitted, cut = N.fit_rows(tok, task, rows, 512)
    assert cut == 0 and all(a is b for a, b in zip(fitted, rows))
    mixed = rows[:10] + [rows_of(task, long_text())] + rows[10:]
    fitted, cut = N.fit_rows(tok, task, mixed, 512)
    assert cut == 1 and fitted[:10] == rows[:10] and fitted[11:] == rows[10:]
    assert sum(map(len, n_example(tok, task, fitted[10]))) <= 512


def test_a_label_prompt_is_cut_the_same_whatever_its_label(tok):
    text = long_text()
    a = N.fit_example(tok, "sst2", {"sentence": text, "label": 0}, MAX_LEN)[0]["sentence"]
    b = N.fit_example(tok, "sst2", {"sentence": text, "label": 1}, MAX_LEN)[0]["sentence"]
    assert a == b  # the prompt's length says nothing of the label


def test_a_gsm8k_question_to_generate_from_fits_on_its_own(tok):
    row = rows_of("gsm8k", long_text())
    fitted, cut = N.fit_prompt(tok, "gsm8k", row, MAX_LEN)
    assert cut and MAX_LEN - 4 <= len(tok(D.prompt_and_answer("gsm8k", fitted)[0])["input_ids"]) <= MAX_LEN
    assert row["question"].endswith(fitted["question"]) and fitted["answer"] == row["answer"]


def test_a_gsm8k_solution_longer_than_the_window_is_cut_on_the_right(tok):
    row = {"question": "How many?", "answer": long_text("step") + "\n#### 7"}
    fitted, cut = N.fit_example(tok, "gsm8k", row, MAX_LEN)
    prompt_ids, answer_ids = n_example(tok, "gsm8k", fitted)
    assert cut and fitted["question"] == "" and len(prompt_ids) + len(answer_ids) <= MAX_LEN
    assert row["answer"].startswith(fitted["answer"]) and len(fitted["answer"]) > 100


def test_max_len_too_short_for_template_text_and_answer_is_one_line(tok):
    with pytest.raises(ConfigError) as e:
        N.check_max_len(tok, "sst2", 16)
    need = int(str(e.value).rsplit(">= ", 1)[1])
    assert str(e.value) == (f"data.max_len=16: the sst2 prompt template, {N.MIN_TEXT_TOKENS} tokens of text and the "
                            f"answer need {need} tokens of this model's tokenizer; set data.max_len >= {need}")
    N.check_max_len(tok, "sst2", need)
    for task in ("boolq", "gsm8k"):
        N.check_max_len(tok, task, MAX_LEN)


def widths_seen(model) -> list[int]:
    """Record the sequence width of every forward through the model's embedding (a hook)."""
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    return seen


@pytest.mark.parametrize("task", ["sst2", "boolq"])
def test_label_evaluation_with_a_long_test_row_is_bounded_and_changes_nothing_else(tok, task):
    model = tiny_causal_lm("llama", layers=2, hidden=64, vocab=len(tok))
    rows = D.load_rows(task, "test")[:6]
    whole = E.label_accuracy(model, tok, task, rows, batch_size=4, max_len=MAX_LEN)
    seen = widths_seen(model)
    res = E.label_accuracy(model, tok, task, rows[:3] + [rows_of(task, long_text())] + rows[3:], batch_size=4,
                           max_len=MAX_LEN)
    assert res["truncated"] == 1 and whole["truncated"] == 0 and res["n"] == 7
    assert max(seen) <= MAX_LEN
    assert torch.allclose(torch.tensor(res["label_logits"][[0, 1, 2, 4, 5, 6]]), torch.tensor(whole["label_logits"]),
                          atol=1e-5)


def test_gsm8k_generation_with_long_question_and_long_shot_is_bounded(tok):
    model = tiny_causal_lm("llama", layers=2, hidden=64, vocab=len(tok))
    train = [rows_of("gsm8k", f"Tom has {i} apples and buys one more. How many does he have?") for i in range(6)]
    test = [rows_of("gsm8k", "Ann has 2 pens and buys 3 more. How many pens does she have?")] * 2
    k, new, max_len = 2, 6, 80  # (k + 1) x 80 + 6 stays within the tiny LM's 256 positions
    picks = D.gsm8k_shots(train, k, seed=0)
    long_train = [rows_of("gsm8k", long_text()) if r is picks[0] else r for r in train]  # the long row is a shot
    seen = widths_seen(model)
    res = E.gsm8k_accuracy(model, tok, test + [rows_of("gsm8k", long_text())], long_train, k=k, max_new_tokens=new,
                           batch_size=2, max_len=max_len)
    assert res["truncated"] == 1 and res["shots_truncated"] == 1 and res["n"] == 3
    assert max(seen) <= (k + 1) * max_len + new  # prefill of a whole prompt, then one token per step


def test_public_texts_are_cut_to_their_limit_and_counted(tok):
    texts = ["a short paragraph of text", long_text(), "another short one"]
    assert N.n_longer(tok, texts, 64) == 1
    batches = D.public_batches(tok, texts, 64, 2)
    assert max(b["input_ids"].shape[1] for b in batches) <= 64


def test_truncation_counts_name_every_input(tok):
    train = D.load_rows("sst2", "train")[:8] + [rows_of("sst2", long_text())]
    limits = {"max_len": MAX_LEN, "eval_max_len": 256, "public_max_len": 64}
    counts = N.truncation_counts(tok, "sst2", limits, train, train[:3], [rows_of("sst2", long_text())] * 2, [],
                                 ["short text", long_text()])
    assert counts == {"train": 1, "val": 0, "test": 2, "shots": 0, "public": 1, "n_train": 9, "n_val": 3,
                      "n_test": 2, "n_shots": 0, "n_public": 2}
    assert N.truncation_line(counts, limits) == (
        "inputs cut to fit: 1 of 9 training rows (data.max_len=128 tokens); 0 of 3 validation rows, 2 of 2 test rows "
        "(eval.max_len=256); 1 of 2 public texts (data.public_max_len=64)")


def long_rows_data(root, task: str) -> dict:
    """A data folder with a LONG-character row in `task`'s training and test files and in the public WikiText file,
    beside the first real rows (test: the long row first, so the evaluation of the first rows includes it)."""
    import json

    (root / task).mkdir(parents=True)
    (root / "wikitext2").mkdir()
    train, test = D.load_rows(task, "train")[:30], D.load_rows(task, "test")[:4]
    long_row = rows_of(task, long_text())
    (root / task / "train.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                     for r in train[:15] + [long_row] + train[15:]))
    (root / task / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [long_row] + test))
    wiki = D.load_public("wikitext2")[:30]
    (root / "wikitext2" / "test.txt").write_text("\n".join(wiki[:3] + [long_text("wiki")] + wiki[3:]) + "\n")
    return {"n_train": 31, "n_test": 5, "n_public": 31}


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("task", ["sst2", "gsm8k"])
def test_a_run_with_long_rows_in_every_file_finishes_and_records_the_cuts(tiny_model_dir, tmp_path, task):
    """The real path under mpirun on the tiny model: a 200,000-character row in the training, test and public
    files is cut (data.max_len=128 for training, eval.max_len=128 for evaluation, data.public_max_len=64), the run
    ends with exit 0, and run.h5 /truncated and the log say how many rows were cut."""
    import h5py

    from tests.conftest import mpirun

    sizes = long_rows_data(tmp_path / "data", task)
    run = tmp_path / "run"
    gen = ["eval.k_shot=1", "eval.max_new_tokens=4"] if task == "gsm8k" else []
    p = mpirun(3, ["-m", "fedsoda_mpi.main", f"model.name={tiny_model_dir}", f"output.dir={run}", f"data.task={task}",
                   "fed.rounds=1", "fed.clients=2", "fed.local_steps=1", "data.val_size=0", "data.max_len=128",
                   "eval.max_len=128", "data.public_max_len=64", "data.public_samples=8", "oda.re_samples=4",
                   "eval.every=0", "eval.max_examples=0", "eval.base=false", *gen],
               timeout=900, env={"FEDSODA_DATA": str(tmp_path / "data")})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with h5py.File(run / "run.h5", "r") as f:
        cut = dict(f["truncated"].attrs)
        assert 0 <= f["final"].attrs["accuracy"] <= 1 and f["final"].attrs["n_eval"] == sizes["n_test"]
    assert {k: int(cut[k]) for k in sizes} == sizes
    assert cut["test"] == 1 and cut["public"] >= 1  # the long test row; the long paragraph (and others over 64)
    assert cut["train"] >= 1 and (cut["train"] == 1 or task == "gsm8k")  # real GSM8K rows may exceed 128 too
    assert cut["max_len"] == cut["eval_max_len"] == 128 and cut["public_max_len"] == 64
    lines = [line for line in p.stdout.splitlines() if "inputs cut to fit:" in line]
    assert len(lines) == 1 and f"{cut['train']} of 31 training rows (data.max_len=128 tokens)" in lines[0]


def test_a_tokenizer_without_offsets_cuts_by_decoding(tok):
    """Tokenizers without offset mappings (slow, Python ones) cut the same way, by decoding the kept tokens."""

    class Slow:
        is_fast = False

        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, text, **kw):
            assert "return_offsets_mapping" not in kw
            return tok(text, **kw)

    row = rows_of("boolq", long_text())
    fast, _ = N.fit_example(tok, "boolq", row, MAX_LEN)
    slow, cut = N.fit_example(Slow(), "boolq", row, MAX_LEN)
    assert cut and sum(map(len, n_example(tok, "boolq", slow))) <= MAX_LEN
    assert slow["question"].strip() == fast["question"].strip()
