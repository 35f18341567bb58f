"""The coverage-guided fuzzing harness runs (a few thousand inputs per target); the long runs
and their counts are in RELIABILITY.md."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .helpers import ROOT


@pytest.mark.parametrize("target", ["frames", "config", "control"])
def test_atheris_target_runs_clean(target: str) -> None:
    pytest.importorskip("atheris")
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fuzz_atheris.py"), target, "-runs=3000", "-seed=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done 3000 runs" in out.stderr
