"""TMPDIR space and the file-size limit against the sub-LLM's copies (fedsoda_mpi/space.py), before MPI work."""
import resource
import shutil
from collections import namedtuple

import pytest

from fedsoda_mpi import space
from fedsoda_mpi.config import ConfigError, load_config

Usage = namedtuple("Usage", "total used free")


def test_the_copy_is_what_the_server_writes(tiny_model_dir, tmp_path):
    """copy_bytes equals the size of the weights file rank 0 writes for M* (the tiny 30-layer model, 18 kept)."""
    import torch

    from fedsoda_mpi import models

    cfg = load_config(None, [f"model.name={tiny_model_dir}"])
    full, _ = models.load_causal_lm(tiny_model_dir)
    kept = [0, 1, 5, 6, 7, 8, 12, 16, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]  # n=3, p=4: 12 of 30 removed
    models.build_sub_model(full, kept, quantize=False, workdir=tmp_path / "m")
    written = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert abs(space.copy_bytes(cfg, tiny_model_dir, 30) - written) < 20_000, written  # header and metadata aside
    assert space.removed_layers(load_config(None, ["method=fedpetuning"])) == 0
    assert torch.float32 == full.dtype


@pytest.mark.parametrize("rank", [0, 1])
def test_a_tmpdir_too_small_for_the_copy_is_one_line(rank, tiny_model_dir, monkeypatch):
    cfg = load_config(None, [f"model.name={tiny_model_dir}"])
    copy = space.copy_bytes(cfg, tiny_model_dir, 30)
    need = copy if rank == 0 else copy // 4
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - need + 1, need - 1))
    with pytest.raises(ConfigError, match=rf"^TMPDIR \S+ has [\d.]+ MB free, but rank {rank} writes the "):
        space.check_space(cfg, rank)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 0, need))
    space.check_space(cfg, rank)


def test_a_file_size_limit_below_the_copy_is_one_line(tiny_model_dir, monkeypatch):
    cfg = load_config(None, [f"model.name={tiny_model_dir}"])
    monkeypatch.setattr(resource, "getrlimit", lambda what: (1_000_000, resource.RLIM_INFINITY))
    with pytest.raises(ConfigError, match=r"^the file-size limit \(ulimit -f\) is 1.0 MB, but rank 0 writes the kept "
                                          r"layers of the full LLM \(to build the sub-LLM\) as one file of about "):
        space.check_space(cfg, 0)
