"""The LiveKit Agents pool benchmark runs end to end in its short form and writes complete
results. A smoke test: it checks that every figure was produced, never what it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT

pytest.importorskip("livekit.agents")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_agents_pool_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "pool.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "agents_pool.py"), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=380,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["failures"] == []
    systems = {(phase["system"], phase["kind"]) for phase in result["phases"]}
    assert systems == {
        (system, kind)
        for system in ("otp-agents app pool", "LiveKit worker")
        for kind in ("sequential", "burst")
    }
    for phase in result["phases"]:
        assert phase["latency"]["n"] >= 2 and phase["latency"]["median_ms"] > 0
        assert phase["active_memory"]["total_pss_mib"] > 0 and phase["leftover_pids_killed"] == []
