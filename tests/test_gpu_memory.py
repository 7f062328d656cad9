"""bench/gpu_memory.py: the memory formulas agree with the tensor bytes a CPU run allocates (tiny model), and the
planning table covers every job."""
import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TOLERANCE = 0.20  # estimated / allocated within 1 +- 0.20 per phase (SmolLM2 at 128 tokens: 0.985-1.097)


def bench():
    spec = importlib.util.spec_from_file_location("gpu_memory", ROOT / "bench" / "gpu_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_estimates_match_allocated_cpu_tensor_bytes_on_the_tiny_model(tiny_model_dir):
    """Each phase (a client's fill + local steps, the stored client model, an ODA step, SGP, a label evaluation
    forward, a generation) is estimated within TOLERANCE of the CPU tensor bytes torch.profiler counts."""
    rows = bench().validate(str(tiny_model_dir), seq=64)
    assert len(rows) == 6
    for name, estimated, allocated in rows:
        assert allocated > 0 and abs(estimated / allocated - 1) <= TOLERANCE, (name, estimated, allocated)


def test_allocated_peak_counts_live_tensor_bytes_not_the_total():
    import torch

    def work():
        a = torch.empty(10_000_000, dtype=torch.uint8)  # 10 MB live ...
        b = torch.empty(20_000_000, dtype=torch.uint8)  # ... + 20 MB = the peak
        del a, b
        c = torch.empty(15_000_000, dtype=torch.uint8)  # freed before: not added
        return c.numel()

    peak, out = bench().allocated_peak(work)
    assert out == 15_000_000 and peak == pytest.approx(30_000_000, rel=0.02)


def test_arch_from_a_config_and_the_known_shapes_agree():
    m = bench()
    llama = m.KNOWN["hf:meta-llama/Meta-Llama-3-8B"]
    assert llama.kv == 1024 and llama.linear_params == 218_103_808  # 32 x 218.1M + embeddings = 8.03B parameters
    total = llama.layers * (llama.linear_params + 2 * llama.hidden) + 2 * llama.vocab * llama.hidden + llama.hidden
    assert total == 8_030_261_248
    cfg = {"num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}
    assert m.arch_from_config(cfg, "config.json of Qwen/Qwen2-7B") == m.KNOWN["hf:Qwen/Qwen2-7B"]


def test_planning_table_has_every_job_and_method():
    p = subprocess.run([sys.executable, "bench/gpu_memory.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    jobs = sorted(f.stem for f in (ROOT / "jobs").glob("*.yaml"))
    rows = [line.split("|")[1:3] for line in p.stdout.splitlines() if line.startswith("| ") and "_iid" in line]
    assert sorted({r[0].strip() for r in rows}) == jobs
    assert len(rows) == 4 * len(jobs)
