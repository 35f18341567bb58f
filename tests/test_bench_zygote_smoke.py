"""The zygote restart benchmark runs end to end (``--quick``, the two otp-agents managers) and
writes complete JSON.

A smoke test only: it checks the structure of the results, never how fast anything was (so it
does not compare the zygote with the cold start either).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT

BENCH = ROOT / "bench" / "zygote_restart.py"
MANAGERS = ["otp-agents/zygote", "otp-agents/cold"]
QUICK_RUNS = 5

pytest.importorskip("livekit.rtc", reason="livekit (the 'voice' extra) is not installed")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_zygote_benchmark_writes_results_for_both_otp_managers(tmp_path: Path) -> None:
    out = tmp_path / "zygote.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", ",".join(MANAGERS), "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| manager |" in proc.stdout  # the Markdown tables
    results = json.loads(out.read_text())

    restart = results["restart"]
    assert sorted(restart) == sorted(MANAGERS)
    for name in MANAGERS:
        r = restart[name]
        assert "failed" not in r, r
        assert r["n"] == QUICK_RUNS, name
        assert len(r["samples_ms"]) == r["n"]
        assert all(s > 0 for s in r["samples_ms"]), name
        assert r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"], name
        assert results["ratio_over_zygote"][name] > 0

    # one start per ready worker (the first, the warm-up ones, the samples); the zygote manager
    # really forked its workers, the cold one never did
    for name in MANAGERS:
        r = restart[name]
        assert r["otp_starts"]["starts"] == 1 + r["warmup"] + r["n"], (name, r["otp_starts"])
    assert restart["otp-agents/zygote"]["otp_starts"]["forked"] >= 1
    assert restart["otp-agents/cold"]["otp_starts"]["forked"] == 0

    memory = results["memory"]
    assert sorted(memory) == sorted(MANAGERS)
    for name in MANAGERS:
        worker = memory[name]["worker"]
        assert worker["pid"] > 0
        for key in ("uss_mb", "pss_mb", "rss_mb"):
            assert worker[key] > 0, (name, key)
    assert memory["otp-agents/zygote"]["zygote"]["pss_mb"] > 0

    assert results["machine"]["nproc"] >= 1
    assert results["machine"]["packages"]["livekit"] != "not installed"
    assert results["command"]
