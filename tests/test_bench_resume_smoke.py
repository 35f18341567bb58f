"""The resume-gap benchmarks run end to end in their short form and write complete results.

Smoke tests only: they check that every figure was produced, never what it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT
from .voice_helpers import needs_tts


def _bench(*argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@needs_tts
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_voice_leaf_resume_gap_benchmark() -> None:
    proc = _bench(str(ROOT / "bench" / "voice_resume_gap.py"), "--rounds", "1", "--zygote", timeout=150)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rounds"] == 1 and result["zygote"] is True and result["kind"] == "kill"
    assert result["gap_median_s"] > 0 and result["remembered_after_last_restart"] is True


@needs_tts
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_hosted_call_resume_gap_benchmark(tmp_path: Path) -> None:
    pytest.importorskip("livekit.agents")
    out = tmp_path / "gap.json"
    bench = str(ROOT / "bench" / "agents_resume_gap.py")
    _bench(
        bench,
        "--kills",
        "1",
        "--hangs",
        "0",
        "--recycles",
        "0",
        "--turns",
        "1",
        "--json",
        str(out),
        timeout=270,
    )
    result = json.loads(out.read_text())
    restarts = result["restarts"]
    assert restarts["kill"]["gap_leaf"]["n"] == 1 and restarts["kill"]["gap_leaf"]["median_ms"] > 0
    assert restarts["remembered_after_all_restarts"] is True
    assert "recycles" not in result
    on, off = result["turns"]
    assert (on["checkpoint"], off["checkpoint"]) == ("disk", "off")
    assert on["checkpoints"] > 0 and on["checkpoint_cost_max_ms"] > 0 and off["checkpoints"] == 0
