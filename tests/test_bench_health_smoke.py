"""The health-overhead benchmark runs end to end (``--quick``) and writes complete JSON.

A smoke test only: it checks that every section was measured, never how fast anything was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .helpers import ROOT

BENCH = ROOT / "bench" / "health_overhead.py"


def positive(section: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert section[key] > 0, (key, section)


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_quick_health_benchmark_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "health.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "| ping_interval / ping_timeout |" in proc.stdout  # the Markdown tables
    results = json.loads(out.read_text())

    settings = results["hang_detection"]["settings"]
    assert settings
    for r in settings.values():
        assert r["n"] >= 1 and len(r["samples"]) == r["n"]
        positive(r["latency_s"], "median_s", "max_s")
        positive(r["latency_over_timeout"], "median_x")
        positive(r["fault_to_started_s"], "median_s")
        assert r["latency_s"]["min_s"] <= r["latency_s"]["median_s"] <= r["latency_s"]["max_s"]

    sampling = results["memory_sampling"]
    cells = {(c["target"], c["metric"], c["floor"]) for c in sampling["one_process"]}
    for target in ("python worker (raw_worker.py)", "sleep"):
        for metric in ("rss", "pss", "uss"):
            assert (target, metric, "below floor") in cells
        for metric in ("pss", "uss"):
            assert (target, metric, "above floor") in cells
    for c in sampling["one_process"] + sampling["parts"]:
        positive(c, "median_us", "p90_us")
    assert sampling["sweep_children"] >= 1
    assert len(sampling["sweep"]) == 4
    for r in sampling["sweep"].values():
        positive(r, "median_ms", "us_per_child_median")

    fleets = results["fleet"]
    assert fleets
    for r in fleets:
        assert "error" not in r, r
        assert r["started"] == r["workers"]
        positive(r["start"], "all_started_s")
        positive(r["cpu"], "window_s", "supervisor_rss_mib")
        assert r["cpu"]["cpu_percent"] >= 0 and r["cpu"]["cpu_percent_schedstat"] > 0
        assert r["stop"]["exit_code"] == 0
    assert results["wake_floor"]
    for r in results["wake_floor"].values():
        positive(r, "wakes_per_s", "us_cpu_per_wake")
    assert results["machine"]["nproc"] >= 1
