"""Room for the sub-LLM's copies, checked on every rank before any MPI work.

Rank 0 writes the kept layers of the full LLM to a folder in TMPDIR to build M* (models.build_sub_model); each
client rank writes the shipped M* there to load it (client.py). Both are temporary, both are the largest files a
run writes, and both come after the expensive steps before them (rank 0: loading the full LLM, SGP; clients: the
shipment). So each rank checks its TMPDIR's free space and the file-size limit (`ulimit -f`) against the copy first:

    copy   = every tensor outside the decoder layers + the kept layers' share of the layers' elements (from the
             safetensors headers) x the bytes of model.dtype: rank 0's copy, one file, exactly
    rank 0 needs the copy; a client at least a quarter of it (M* as shipped: NF4 layers, about 0.4-0.5x of the
             copy at 135M and 8B; without NF4 the whole copy)

A check that cannot be certain refuses only what cannot fit.
"""
from __future__ import annotations

import math
import re
import resource
import shutil
import tempfile
from pathlib import Path

from .config import Config, ConfigError

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def tensor_elements(folder: Path) -> tuple[int, int]:
    """(elements outside the decoder layers, elements inside them) of a model folder's safetensors (headers only)."""
    from .model_folder import weight_shapes

    outside = inside = 0
    for name, (shape, _) in weight_shapes(folder).items():
        if LAYER.search(name):
            inside += math.prod(shape)
        else:
            outside += math.prod(shape)
    return outside, inside


def removed_layers(cfg: Config) -> int:
    """Decoder layers the plan removes: n * p (sgp.auto: sgp.remove_layers, an upper bound); 0 for FedPETuning."""
    if cfg.sgp.p == 0:
        return 0
    return cfg.sgp.remove_layers if cfg.sgp.auto else cfg.sgp.n * cfg.sgp.p


def copy_bytes(cfg: Config, folder: Path, num_layers: int) -> int:
    """Bytes of rank 0's copy of the kept layers, in the full model's dtype (model.dtype; module docstring)."""
    outside, inside = tensor_elements(folder)
    itemsize = 4 if cfg.model.dtype == "float32" else 2
    return (outside + inside * (num_layers - removed_layers(cfg)) // num_layers) * itemsize


def check_space(cfg: Config, rank: int) -> None:
    """ConfigError (one line) when this rank's TMPDIR or file-size limit cannot hold its copy of the sub-LLM."""
    from .model_folder import check_model_folder
    from .paths import model_path

    folder = model_path(cfg.model.name)
    copy = copy_bytes(cfg, folder, check_model_folder(folder))
    need = copy if rank == 0 or not cfg.quant.enabled else copy // 4
    what = "the kept layers of the full LLM (to build the sub-LLM)" if rank == 0 else "the shipped sub-LLM"
    tmp = Path(tempfile.gettempdir())
    free = shutil.disk_usage(tmp).free
    if free < need:
        raise ConfigError(f"TMPDIR {tmp} has {_gb(free)} free, but rank {rank} writes {what} there, about "
                          f"{_gb(need)}; point TMPDIR at a larger node-local folder (e.g. $SLURM_TMPDIR) or free space")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < need:
        raise ConfigError(f"the file-size limit (ulimit -f) is {_gb(limit)}, but rank {rank} writes {what} as one "
                          f"file of about {_gb(need)} in TMPDIR; raise it (ulimit -f unlimited)")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
