"""The restart-latency benchmark runs end to end (``--quick``) and writes complete JSON.

A smoke test only: it checks that every manager produced results, never how fast anything was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT

BENCH = ROOT / "bench" / "restart_latency.py"
MANAGERS = ["otp-agents/asyncio", "otp-agents/trio", "supervisord"]

pytest.importorskip("supervisor", reason="supervisord (the 'bench' extra) is not installed")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_benchmark_writes_results_for_every_manager(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| manager |" in proc.stdout  # the Markdown table
    results = json.loads(out.read_text())

    latency = results["restart_latency"]
    assert sorted(latency) == sorted(MANAGERS)
    for name in MANAGERS:
        r = latency[name]
        assert r["n"] >= 1
        assert len(r["samples_ms"]) == r["n"]
        assert r["median_ms"] > 0, name
        assert r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"], name

    for name in MANAGERS[:-1]:
        assert results["ratio_supervisord_over_otp"][name] > 0

    idle = results["idle_cpu"]
    assert sorted(idle) == sorted(MANAGERS)
    for name in MANAGERS:
        assert idle[name]["children"] == 10, name
        assert idle[name]["window_s"] > 0
        assert idle[name]["cpu_percent"] >= 0

    assert results["floor"]["popen_plain"]["median_ms"] > 0
    assert results["machine"]["nproc"] >= 1


def test_control_latency_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "control.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "control_latency.py"),
            "--children",
            "10",
            "--requests",
            "20",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert {r["backend"] for r in results} == {"asyncio", "trio"}
    assert all(
        r["requests"] == 20 and r["median_ms"] > 0 and r["restarts_per_second_during"] > 0 for r in results
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_status_benchmark_runs_both_tools_in_both_scenarios(tmp_path: Path) -> None:
    out = tmp_path / "cli.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "cli_status.py"),
            "--runs",
            "3",
            "--storm",
            "5",
            "--output",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["scenario"] for r in results] == ["idle", "storm"]
    for r in results:
        for tool in ("otp-agents", "supervisorctl"):
            assert 0 < r[tool]["median_ms"] <= r[tool]["max_ms"], (r["scenario"], tool)
