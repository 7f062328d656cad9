"""The cluster docs say what the scripts and benchmarks say: the README's Slurm resources table matches the
scripts' #SBATCH lines; docs/gpu.md's memory tables match bench/gpu_memory.py, its GPU-hour table bench/gpu_hours.py."""
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
GPU_DOC = (ROOT / "docs" / "gpu.md").read_text()


def section(title: str, text: str = README) -> str:
    """The text of a markdown file (the README by default) from the heading `title` to the next heading."""
    start = text.index(title)
    rest = text[start + len(title):]
    return rest[:re.search(r"^#{2,3} ", rest, re.M).start()]


def table_rows(text: str) -> list[str]:
    """The markdown table rows of `text` (no header, no separator line)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [line for line in lines[2:]]


def sbatch_options(script) -> dict[str, str]:
    """--key=value of a script's #SBATCH lines."""
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script.read_text(), re.M))


def expected_row(script) -> str:
    """The row the README's resources table must hold for `script`."""
    o = sbatch_options(script)
    gpus = f"{o['gpus-per-task']} per rank" if "gpus-per-task" in o else "none"
    mem = "all of the node (`--mem=0`)" if o["mem"] == "0" else o["mem"]
    return f"| `slurm/{script.name}` | {o['ntasks']} | {gpus} | {o['cpus-per-task']} | {mem} | {o['time']} |"


def test_the_resources_table_matches_every_scripts_sbatch_lines():
    scripts = sorted(p for p in (ROOT / "slurm").glob("*.sh") if "ntasks" in sbatch_options(p))
    rows = table_rows(section("### What each Slurm script requests"))
    assert sorted(rows) == sorted(expected_row(p) for p in scripts)


def test_the_memory_tables_are_the_benchmarks_output():
    p = subprocess.run([sys.executable, "bench/gpu_memory.py", "--summary"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = [line for line in p.stdout.splitlines() if line.startswith("| ")][1:]
    assert table_rows(section("## GPU memory per rank (estimate)", GPU_DOC))[:len(summary)] == summary
    p = subprocess.run([sys.executable, "bench/gpu_memory.py", "--jobs", "*gsm8k*"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    host = set(p.stdout.splitlines())
    rows = table_rows(section("## Host memory and TMPDIR at 7-8B (estimate)", GPU_DOC))
    assert rows and all(row in host for row in rows), rows


@pytest.mark.slow
def test_the_gpu_hour_table_is_the_benchmarks_output(smollm2_dir):
    p = subprocess.run([sys.executable, "bench/gpu_hours.py", "studies/paper.yaml"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = table_rows(section("## GPU-hours of `studies/paper.yaml` (estimate)", GPU_DOC))
    assert rows == [line for line in p.stdout.splitlines() if line.startswith("| ")][1:]
