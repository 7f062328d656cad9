"""Your own dataset (data.task=custom, docs/datasets.md): the task.json and row checks, `prepare data --custom` from
a local `datasets` dataset, lengths, partitions, evaluation, and one 3-rank round end to end per kind (marked mpi)."""
import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from fedsoda_mpi import data as D
from fedsoda_mpi import lengths, tasks
from fedsoda_mpi.config import ConfigError, load_config
from fedsoda_mpi.prepare import main as prepare_main
from tests.conftest import ROOT, mpirun

GOOD = ["a good and fun film", "the acting was good", "a fun , warm story", "good music and a good cast"]
BAD = ["a bad and dull film", "the acting was bad", "a dull , cold story", "bad music and a bad cast"]


def classification_rows(n: int) -> list[dict]:
    """n rows alternating positive / negative (label words)."""
    return [{"text": f"{(GOOD if i % 2 else BAD)[i % 4]} number {i}", "label": "positive" if i % 2 else "negative"}
            for i in range(n)]


def generation_rows(n: int) -> list[dict]:
    """n sums with a worked answer ending "#### N"."""
    return [{"prompt": f"What is {i} plus {i % 7}?", "answer": f"{i} + {i % 7} = {i + i % 7}\n#### {i + i % 7}"}
            for i in range(n)]


def write_task(folder: Path, spec: dict, train: list, test: list) -> Path:
    """A custom task folder written by hand (rows as JSON lines; a str row is written as it is)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps(spec))
    for name, rows in (("train", train), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                                                      for r in rows))
    return folder


CLS = {"kind": "classification", "labels": ["negative", "positive"]}
GEN = {"kind": "generation"}


@pytest.fixture
def cls_task(tmp_path):
    return tasks.CUSTOM + str(write_task(tmp_path / "sent", CLS, classification_rows(40), classification_rows(12)))


@pytest.fixture
def gen_task(tmp_path):
    return tasks.CUSTOM + str(write_task(tmp_path / "sums", GEN, generation_rows(40), generation_rows(12)))


def test_classification_rows_prompts_labels_and_partitions(cls_task):
    rows = D.load_rows(cls_task, "train")
    prompt, answer = D.prompt_and_answer(cls_task, rows[1])
    assert prompt.startswith(D.TEMPLATE.split("{")[0]) and "text: the acting was good number 1" in prompt
    assert "negative or positive" in prompt and prompt.endswith(D.ANSWER_LEAD) and answer == " positive"
    assert [D.label_of(cls_task, r) for r in rows[:4]] == [0, 1, 0, 1]
    assert D.label_of(cls_task, {"text": "x", "label": 1}) == 1  # an index works as well as the word
    for split in ("iid", "dirichlet"):
        parts, hist = D.client_datasets(cls_task, 3, split, 0.5, 0, val_size=4)
        assert sum(len(p) for p in parts) == 36 and hist.shape == (3, 2) and hist.sum() == 36


def test_generation_rows_final_answer_and_correctness(gen_task):
    rows = D.load_rows(gen_task, "train")
    prompt, answer = D.prompt_and_answer(gen_task, rows[3])
    assert "What is 3 plus 3?" in prompt and answer.endswith("#### 6")
    assert tasks.n_classes(gen_task) == 1 and D.label_of(gen_task, rows[3]) == 0
    from fedsoda_mpi.evaluate import gsm8k_correct
    assert gsm8k_correct(["3 + 3 = 6\n#### 6", "#### 7", "no answer"], rows[3:6], gen_task).tolist() == [1, 0, 0]


def test_text_compare_and_own_regex(tmp_path):
    spec = {"kind": "generation", "final_regex": r"^\s*(.+)", "compare": "text", "instruction": "Capital of {prompt}?"}
    task = tasks.CUSTOM + str(write_task(tmp_path / "caps", spec, [{"prompt": "France", "answer": "Paris"}] * 3,
                                         [{"prompt": "Italy", "answer": "Rome."}]))
    row = D.load_rows(task, "test")[0]
    assert D.prompt_and_answer(task, row)[0].endswith("### Instruction:\nCapital of Italy?\n\n### Response:\n")
    assert tasks.custom_correct(task, " rome\nmore text", row) and not tasks.custom_correct(task, "Milan", row)


@pytest.mark.parametrize("spec, train, message", [
    (CLS, ["{bad json", {"text": "a"}], r"train.jsonl:1: bad JSON .*\(and 1 more bad lines\)"),
    (CLS, [{"text": "a"}], r"train.jsonl:1: missing field 'label'"),
    (CLS, [{"label": "positive"}], r"train.jsonl:1: missing field 'text'"),
    (CLS, [{"text": "a", "label": "positive"}, {"text": "b", "label": "neutral"}],
     r"train.jsonl:2: unknown label 'neutral': use one of negative, positive or its index 0..1"),
    (CLS, [{"text": "a", "label": 2}], r"unknown label 2"),
    (CLS, [], r"train.jsonl: is empty \(no rows\)"),
    (GEN, [{"prompt": "p"}], r"train.jsonl:1: missing field 'answer'"),
    (GEN, [{"prompt": "p", "answer": "no marker"}], r"answer has no final answer"),
    (GEN, [{"prompt": "p", "answer": "#### many"}], r"final answer 'many' holds no number"),
    ({"kind": "regression"}, [], r"task.json: 'kind' must be classification or generation"),
    ({"kind": "classification", "labels": ["yes"]}, [], r"'labels' must list at least two"),
    ({**CLS, "instruction": "no placeholder"}, [], r"'instruction' must be a string holding \{text\}"),
    ({**GEN, "final_regex": "(("}, [], r"'final_regex' is not a regular expression"),
    ({**CLS, "lables": []}, [], r"unknown key 'lables'"),
])
def test_bad_task_folders_are_one_line_data_errors(tmp_path, spec, train, message):
    task = tasks.CUSTOM + str(write_task(tmp_path / "t", spec, train, classification_rows(2)))
    with pytest.raises(D.DataError, match=message) as e:
        D.load_rows(task, "train")
    assert "\n" not in str(e.value)


def test_config_keys(tmp_path):
    cfg = load_config(None, ["data.task=custom", "data.custom=mine"])
    assert tasks.task_id(cfg.data) == "custom:mine" and tasks.task_label(cfg.data) == "custom:mine"
    with pytest.raises(ConfigError, match="data.custom: data.task=custom needs"):
        load_config(None, ["data.task=custom"])
    with pytest.raises(ConfigError, match="only data.task=custom reads it"):
        load_config(None, ["data.custom=mine"])
    assert tasks.custom_folder("mine") == D.data_dir() / "custom" / "mine"
    assert tasks.custom_folder(str(tmp_path)) == tmp_path


def test_lengths_bound_custom_rows(cls_task, gen_task):
    from fedsoda_mpi.tiny import build_tokenizer
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(Path(tmp))
    long_cls = {"text": "word " * 400, "label": "positive"}
    long_gen = {"prompt": "word " * 400, "answer": "step " * 300 + "#### 4"}
    for task, row in ((cls_task, long_cls), (gen_task, long_gen)):
        lengths.check_max_len(tok, task, 96)
        (fitted,), cut = lengths.fit_rows(tok, task, [row], 96)
        ex = D.tokenize_sft(tok, *D.prompt_and_answer(task, fitted), 96)
        assert cut == 1 and len(ex["input_ids"]) <= 96
    assert lengths.fit_rows(tok, cls_task, [long_cls], 96)[0][0]["text"].endswith("word ")
    with pytest.raises(ConfigError, match="data.max_len=16: the custom:"):
        lengths.check_max_len(tok, cls_task, 16)


def _saved_dataset(tmp_path: Path) -> Path:
    """A local DatasetDict (save_to_disk) with a ClassLabel column and train / validation splits."""
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"]), "idx": datasets.Value("int32")})
    rows = classification_rows(20)
    split = lambda rs: datasets.Dataset.from_dict(  # noqa: E731
        {"sentence": [r["text"] for r in rs], "label": [int(r["label"] == "positive") for r in rs],
         "idx": list(range(len(rs)))}, features=features)
    datasets.DatasetDict({"train": split(rows[:16]), "validation": split(rows[16:])}).save_to_disk(tmp_path / "ds")
    return tmp_path / "ds"


def test_prepare_writes_a_custom_task_from_a_saved_dataset(tmp_path, capsys):
    src = _saved_dataset(tmp_path)
    argv = ["data", "--custom", "mine", "--from", str(src), "--text", "sentence", "--label", "label",
            "--labels", "negative,positive", "--dest", str(tmp_path / "data")]
    assert prepare_main(argv) == 0
    folder = tmp_path / "data" / "custom" / "mine"
    assert capsys.readouterr().out.strip() == str(folder)
    spec = json.loads((folder / "task.json").read_text())
    assert spec == {"kind": "classification", "labels": ["negative", "positive"], "source": str(src)}
    task = tasks.CUSTOM + str(folder)
    assert len(D.load_rows(task, "train")) == 16 and len(D.load_rows(task, "test")) == 4  # validation = test
    assert D.load_rows(task, "train")[1] == {"text": "the acting was good number 1", "label": "positive"}
    assert prepare_main(argv[:-4] + ["--dest", str(tmp_path / "data")]) == 0  # class names as label words
    assert json.loads((folder / "task.json").read_text())["labels"] == ["neg", "pos"]


def test_prepare_from_csv_generation_and_errors(tmp_path, capsys):
    csv = tmp_path / "sums.csv"
    csv.write_text("q,a\n" + "".join(f"\"What is {i} plus 1?\",\"#### {i + 1}\"\n" for i in range(20)))
    base = ["data", "--custom", "sums", "--from", str(csv), "--dest", str(tmp_path / "data")]
    assert prepare_main([*base, "--kind", "generation", "--prompt", "q", "--answer", "a"]) == 0
    task = tasks.CUSTOM + str(tmp_path / "data" / "custom" / "sums")
    assert len(D.load_rows(task, "train")) == 18 and len(D.load_rows(task, "test")) == 2  # --test-fraction 0.1
    capsys.readouterr()
    assert prepare_main([*base, "--kind", "generation", "--prompt", "question", "--answer", "a"]) == 2
    assert "--prompt question: no such column (columns: q, a)" in capsys.readouterr().err
    assert prepare_main([*base, "--kind", "generation", "--prompt", "q", "--answer", "q"]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:1: answer has no final answer" in err and len(err.strip().splitlines()) == 1
    assert prepare_main(["data", "--custom", "x", "--from", "no-such/dataset-id", "--text", "t", "--label", "l",
                         "--dest", str(tmp_path / "data")]) == 2
    assert "could not load no-such/dataset-id from the Hugging Face hub" in capsys.readouterr().err
    assert prepare_main(["data", "--from", str(csv), "--text", "q", "--dest", str(tmp_path / "d2")]) == 2
    assert "--text belongs to a custom dataset: add --custom NAME" in capsys.readouterr().err


# ---- one 3-rank round end to end per kind -----------------------------------------------------------------------

RUN = ["-m", "fedsoda_mpi.main", "fed.rounds=1", "fed.clients=2", "fed.local_steps=1", "eval.max_examples=6",
       "data.public_samples=4", "oda.re_samples=4", "data.max_train_per_client=8", "data.val_size=4",
       "data.max_len=96", "eval.max_len=96", "data.task=custom"]


def _run(tiny_model_dir, folder: Path, run_dir: Path, *extra: str):
    p = mpirun(3, [*RUN, f"model.name={tiny_model_dir}", f"data.custom={folder}", f"output.dir={run_dir}", *extra],
               timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with h5py.File(run_dir / "run.h5", "r") as f:
        fin = dict(f["final"].attrs)
        hist = f["data/client_label_hist"][:]
    assert fin["task"] == f"custom:{folder.name}" and fin["n_eval"] == 6 and 0 <= fin["accuracy"] <= 1
    table = subprocess.run([sys.executable, str(ROOT / "analysis" / "table.py"), str(run_dir / "run.h5")],
                           capture_output=True, text=True, cwd=ROOT)
    assert table.returncode == 0 and f"custom:{folder.name}" in table.stdout, table.stderr
    return fin, hist


@pytest.mark.mpi
def test_custom_classification_round_end_to_end(tiny_model_dir, tmp_path):
    folder = write_task(tmp_path / "sent", CLS, classification_rows(40), classification_rows(12))
    fin, hist = _run(tiny_model_dir, folder, tmp_path / "run", "data.split=dirichlet", "data.dirichlet_beta=1.0")
    assert hist.shape == (2, 2) and (0 < hist.sum(axis=1)).all() and (hist.sum(axis=1) <= 8).all()


@pytest.mark.mpi
def test_custom_generation_round_end_to_end(tiny_model_dir, tmp_path):
    folder = write_task(tmp_path / "sums", GEN, generation_rows(40), generation_rows(12))
    _, hist = _run(tiny_model_dir, folder, tmp_path / "run", "eval.k_shot=1", "eval.max_new_tokens=8")
    assert hist.shape == (2, 1)


def test_checks_before_mpi_work(tiny_model_dir, tmp_path):
    """main.prepare_config / prepare_inputs (what every rank runs before the first collective) on custom tasks:
    Dirichlet needs labels, label words must start with distinct tokens, bad rows are one-line DataErrors."""
    from fedsoda_mpi.main import prepare_config, prepare_inputs

    gen = write_task(tmp_path / "sums", GEN, generation_rows(40), generation_rows(12))
    argv = RUN[2:] + [f"model.name={tiny_model_dir}", f"output.dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match="data.split=dirichlet: skews the label distribution, but the custom task "
                                          f"{gen} is a generation task"):
        prepare_config([*argv, f"data.custom={gen}", "data.split=dirichlet"], 3)
    same = write_task(tmp_path / "same", {"kind": "classification", "labels": ["yes", "yess"]},
                      classification_rows(2), classification_rows(2))
    with pytest.raises(ConfigError, match="share a first token"):
        prepare_config([*argv, f"data.custom={same}"], 3)
    bad = write_task(tmp_path / "bad", CLS, classification_rows(40), classification_rows(11) + ["{oops"])
    cfg = prepare_config([*argv, f"data.custom={bad}"], 3)
    with pytest.raises(D.DataError, match=r"bad/test.jsonl:12: bad JSON"):
        prepare_inputs(cfg)
