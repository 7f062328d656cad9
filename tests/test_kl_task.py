"""bench/kl_task.py: the emulator's KL(M || M*) on each task's training text, before and after pre-alignment."""
import re
import subprocess
import sys

from tests.conftest import ROOT


def test_kl_task_measures_every_text_before_and_after_pre_alignment(tiny_model_dir):
    p = subprocess.run([sys.executable, "bench/kl_task.py", "--texts", "4", "--tasks", "gsm8k,sst2", "--threads", "1",
                        f"model.name={tiny_model_dir}", "data.public_samples=8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={"FEDSODA_PROGRESS": "0",
                                                                                   "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = re.findall(r"^\| (.+?) \| ([\d.e+-]+) \| ([\d.e+-]+) \| ([\d.]+) \|$", p.stdout, re.M)
    names = [r[0] for r in rows]
    assert names == ["wikitext2 held-out (4 batches, the run's kl_on)", "gsm8k training examples (4)",
                     "sst2 training examples (4)"], p.stdout
    for _, before, after, ratio in rows:
        assert float(before) > 0 and float(after) > 0 and abs(float(after) / float(before) - float(ratio)) < 2e-3
    assert len({r[1] for r in rows}) == 3  # three different texts, three different distances
    assert float(rows[0][2]) < float(rows[0][1])  # pre-alignment lowers the KL on the texts it is measured on
