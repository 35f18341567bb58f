"""A short run of the chaos soak (bench/chaos_soak.py): 200 processes, random faults, every
invariant checked, then the supervisor SIGKILLed mid-tree and started again on the same state
dir. The long run is a documented command (RELIABILITY.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_short_chaos_soak_breaks_no_invariant(tmp_path: Path, backend: str) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "chaos_soak.py"),
            "--duration",
            "20",
            "--rate",
            "3",
            "--seed",
            "7",
            "--backend",
            backend,
            "--end",
            "kill",
            "--output",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=600,
        check=False,
    )
    assert out.exists(), run.stderr.decode()[-3000:]
    result = json.loads(out.read_text())
    assert result["violations"] == [], result["violations"]
    assert run.returncode == 0
    assert result["processes_in_tree"] >= 200
    assert result["faults_total"] >= 30
    assert result["faults_handled"] == result["faults_injected"]
    # The storm reached every layer: restarts, escalations, detections, dumps, orphans.
    events = result["events"]
    for kind in ("restarting", "escalated", "protocol_error", "hang", "health_kill", "orphan_reaped"):
        assert events.get(kind, 0) > 0, kind
    assert result["dumps_for_hang_or_memory_kills"] > 0
    assert result["unprovoked_health_kills"] == []
    # Ended by SIGKILL of the supervisor: nothing of the tree outlived it, and a new supervisor
    # on the same state dir brought the whole tree back (then stopped it in order).
    death = result["supervisor_sigkill"]
    assert death["processes"] >= 200 and death["left"] == 0
