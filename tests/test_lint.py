"""Lint: `ruff check .` (the [tool.ruff] config in pyproject.toml: E, F, W at 120 columns) finds nothing."""
import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is not installed (it comes with the dev extra: pip install -e '.[dev]')")
def test_ruff_check_passes():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"ruff check . found problems:\n{r.stdout}{r.stderr}"
