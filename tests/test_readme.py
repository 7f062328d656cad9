"""The README is a front door that stays true: every `make`, `python -m`, `python <script>`, `sbatch` and `bash` command
it shows names a make target, module or script that exists, every repository path it names exists, and it stays
short."""
import importlib.util
import itertools
import re

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def code_text(text: str) -> list[str]:
    """The lines of the fenced code blocks and the inline code spans of markdown `text`."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    return [line for block in blocks for line in block.splitlines()] + re.findall(r"`([^`\n]+)`", prose)


def make_targets() -> set[str]:
    """The targets the Makefile defines."""
    return set(re.findall(r"^([\w.-]+):(?!=)", (ROOT / "Makefile").read_text(), re.M))


def expand_braces(path: str) -> list[str]:
    """jobs/{a,b}_{c,d}.yaml -> the four paths."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def commands(lines: list[str]) -> dict[str, set[str]]:
    """{"make": targets, "module": modules run with -m, "script": scripts run with python / sbatch / bash}."""
    found = {"make": set(), "module": set(), "script": set()}
    for line in lines:
        line = line.split("#", 1)[0] if not line.lstrip().startswith("$") else line
        for m in re.finditer(r"\bmake\s+((?:[\w-]+)(?:\s+[A-Z_]+=\S+)*)", line):
            found["make"] |= {w for w in m.group(1).split() if "=" not in w}
        found["module"] |= set(re.findall(r"\bpython3?\b(?:\s+-m\s+mpi4py)?\s+-m\s+([\w.]+)", line))
        found["script"] |= set(re.findall(r"\bpython3?\s+(?!-)(\S+\.py)\b", line))
        found["script"] |= set(re.findall(r"\b(?:sbatch|bash)\s+(?:--?[\w-]+(?:=\S+)?\s+)*(\S+\.sh)\b", line))
    return found


def test_every_command_the_readme_shows_names_a_target_module_or_script_that_exists():
    found = commands(code_text(README))
    assert {"demo", "test-fast", "install"} <= found["make"], found["make"]
    assert {"fedsoda_mpi.main", "fedsoda_mpi.prepare", "fedsoda_mpi.smoke"} <= found["module"], found["module"]
    assert {"slurm/smoke.sh", "slurm/llama3_iid.sh", "slurm/submit_all.sh"} <= found["script"], found["script"]
    assert sorted(found["make"] - make_targets()) == []
    assert [m for m in sorted(found["module"]) if importlib.util.find_spec(m) is None] == []
    assert [s for s in sorted(found["script"]) if not (ROOT / s).is_file()] == []


def test_every_repository_path_the_readme_names_exists():
    pattern = r"\b((?:slurm|jobs|studies|bench|analysis|tests|docs|fedsoda_mpi|results)/[\w{},./-]*[\w}/])"
    paths = {p for line in code_text(README) for p in re.findall(pattern, line)}
    paths |= {p for p in re.findall(pattern, README)}
    assert {"docs/config.md", "docs/gpu.md", "docs/usage.md"} <= paths
    missing = [p for path in sorted(paths) for p in expand_braces(path) if not (ROOT / p).exists()]
    assert missing == []
    assert all((ROOT / name).is_file() for name in ("LICENSE", "CITATION.cff", "Makefile", "environment.yml"))


def test_the_command_finder_sees_what_it_must():
    """The parser of the test above: it finds each kind of command, and a wrong name is reported."""
    found = commands(["make demo NP=3   # x", "mpirun -n 3 python -m mpi4py -m fedsoda_mpi.main fed.rounds=2",
                      "python analysis/table.py runs/*/run.h5", "sbatch --ntasks=3 slurm/nope.sh",
                      "bash slurm/submit_all.sh --no-prepare studies/paper.yaml"])
    assert found == {"make": {"demo"}, "module": {"fedsoda_mpi.main"},
                     "script": {"analysis/table.py", "slurm/nope.sh", "slurm/submit_all.sh"}}
    assert expand_braces("jobs/{a,b}_{c}.yaml") == ["jobs/a_c.yaml", "jobs/b_c.yaml"]


def test_the_readme_is_a_front_door_of_at_most_200_lines():
    assert len(README.splitlines()) <= 200
