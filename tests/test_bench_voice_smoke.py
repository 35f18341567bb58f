"""The voice benchmarks run end to end in their short form and write complete results.

Smoke tests only: they check that every figure was produced, never what it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT
from .voice_helpers import needs_tts


@needs_tts
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_voice_fleet_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "voice.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "voice_fleet.py"), "--quick", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| leaves |" in proc.stdout
    (result,) = json.loads(out.read_text())["voice_fleet"]
    assert result["leaves"] == 1 and result["turns"] == 1
    for key in ("latency_median_s", "processing_median_ms", "cpu_per_call_second_pct", "rss_median_mb"):
        assert isinstance(result[key], float), key
    assert result["latency_median_s"] > 0


@needs_tts
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_turn_detection_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "turns.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "turn_detection.py"), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    configs = [v for k, v in results.items() if k != "model_time_ms"]
    assert len(configs) == 4 and sum(c["eot"] for c in configs) == 2
    for c in configs:
        assert c["turns"] == 2 and 0 <= c["cut_ins"] <= c["paused_turns"], c
    assert results["model_time_ms"]["n"] > 0
