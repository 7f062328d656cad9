"""Where things live on disk: prepared models, the data folder, and the checksum every copy is verified by.

    $FEDSODA_MODELS (default ~/.cache/fedsoda/models)   models prepared by `python -m fedsoda_mpi.prepare model`
    $FEDSODA_DATA   (default ~/.cache/fedsoda/data)     data prepared by `python -m fedsoda_mpi.prepare data`
    fed.cache_dir   (default: the job's local scratch)  the client ranks' emulator cache on disk (`scratch_dir`)
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def models_dir() -> Path:
    """Root of prepared models: `$FEDSODA_MODELS`, else `~/.cache/fedsoda/models`."""
    env = os.environ.get("FEDSODA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedsoda" / "models"


def model_path(name: str) -> Path:
    """model.name: a prepared model name (under models_dir()) or a path to an HF folder."""
    p = Path(name).expanduser()
    if p.is_dir() or p.is_absolute() or name.startswith((".", "~")):
        return p  # a path (a missing one is reported as such, not looked up under $FEDSODA_MODELS)
    return models_dir() / name.replace("hf:", "").replace("/", "--")


def cache_data_dir() -> Path:
    """Default destination of `prepare data`: `$FEDSODA_DATA`, else `~/.cache/fedsoda/data`."""
    env = os.environ.get("FEDSODA_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedsoda" / "data"


def shared_data_dir() -> Path:
    """The project's offline data folder `<repo>/../shared/data` (may not exist)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def scratch_dir(cache_dir: str = "") -> tuple[Path, str]:
    """(folder, where it came from) of the emulator cache's disk tier: fed.cache_dir if set, else the job's
    node-local scratch: $SLURM_TMPDIR, else $TMPDIR, else the system's temporary folder."""
    if cache_dir:
        return Path(cache_dir).expanduser(), "fed.cache_dir"
    for var in ("SLURM_TMPDIR", "TMPDIR"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser(), f"${var}"
    return Path(tempfile.gettempdir()), "the system temporary folder"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
