"""The calls-per-two-cores benchmark runs end to end in its short form (one call of one turn on
each side: the pool, and LiveKit's own worker with the offline providers in its job processes)
and writes complete results. A smoke test: it checks that every figure was produced and that
each call was answered, never how fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT
from .voice_helpers import needs_tts

pytest.importorskip("livekit.agents")

pytestmark = [needs_tts]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_capacity_benchmark_answers_a_call_on_both_sides(tmp_path: Path) -> None:
    out = tmp_path / "capacity.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "agents_capacity.py"), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=380,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    levels = json.loads(out.read_text())["levels"]
    assert [lv["system"] for lv in levels] == ["otp-agents app pool", "LiveKit worker"]
    for lv in levels:
        assert lv["taken"] == lv["complete"] == 1, lv
        assert lv["heard"][0] and lv["latency_p50_s"] is not None, lv  # the agent heard and answered
        assert lv["pss_peak_mib"] > lv["pss_idle_mib"] > 0 and lv["cpu_seconds"] > 0, lv
    assert "| system | calls | held |" in proc.stdout
