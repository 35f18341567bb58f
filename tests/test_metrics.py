"""Prometheus metrics: the real Prometheus server scrapes otp-agents and answers a query."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import FAULTY, ROOT, WAIT

CLI = [sys.executable, "-m", "otp_agents.cli"]
_NEED = os.environ.get("OTP_AGENTS_REQUIRE_PROMETHEUS") == "1"
if _NEED and (shutil.which("prometheus") is None or shutil.which("promtool") is None):
    raise RuntimeError("prometheus and promtool are required here but not installed")
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Prometheus (Debian package prometheus) is not installed",
)

TREE = f"""
intensity = 1000
period = 10
[[children]]
id = "steady"
command = ["{FAULTY[0]}"]
[[children]]
id = "crasher"
command = ["sh", "-c", "sleep 0.3; exit 3"]
[[children]]
id = "pool"
strategy = "simple_one_for_one"
  [[children.children]]
  id = "leaf"
  command = ["{FAULTY[0]}"]
  restart = "temporary"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # loopback only
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


def wait_for(fn: object, limit: float = WAIT) -> object:
    deadline = time.monotonic() + limit
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = fn()  # type: ignore[operator]
        except OSError:
            last = None
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"condition not met; last: {last!r}")


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    tree = tmp_path / "tree.toml"
    tree.write_text(TREE)
    port = free_port()
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [*CLI, "run", str(tree), "--metrics", f"127.0.0.1:{port}", "--state-dir", str(state)],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: get(f"http://127.0.0.1:{port}/readyz")[0] == 200)
        yield port, state
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=WAIT)


def test_health_endpoints_and_bounded_labels(supervisor: tuple[int, Path]) -> None:
    port, state = supervisor
    assert get(f"http://127.0.0.1:{port}/healthz") == (200, b"ok\n")
    assert get(f"http://127.0.0.1:{port}/readyz") == (200, b"ready\n")
    assert get(f"http://127.0.0.1:{port}/nope")[0] == 404
    for _ in range(3):
        out = subprocess.run(
            [*CLI, "start-child", "root/pool", "--state-dir", str(state)],
            capture_output=True,
            timeout=WAIT,
            check=False,
        )
        assert out.returncode == 0, out.stderr
    _, body = get(f"http://127.0.0.1:{port}/metrics")
    text = body.decode()
    assert 'otp_agents_child_up{path="root/pool/leaf"} 3.0' in text
    assert "leaf-1" not in text and "leaf-2" not in text
    assert 'otp_agents_children{state="running",supervisor="root/pool"} 3.0' in text
    assert "process_resident_memory_bytes" in text


@needs_prometheus
def test_promtool_accepts_the_exposition(supervisor: tuple[int, Path]) -> None:
    port, _ = supervisor
    wait_for(lambda: b"otp_agents_restarts_total" in get(f"http://127.0.0.1:{port}/metrics")[1])
    _, body = get(f"http://127.0.0.1:{port}/metrics")
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=WAIT, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr


@needs_prometheus
def test_real_prometheus_scrapes_the_restart_counter(supervisor: tuple[int, Path], tmp_path: Path) -> None:
    port, _ = supervisor
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: otp-agents\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
    )
    prom = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = urllib.parse.quote('otp_agents_restarts_total{path="root/crasher",reason="crash"}')

        def restarts() -> float:
            status, body = get(f"http://127.0.0.1:{prom_port}/api/v1/query?query={query}")
            if status != 200:
                return 0.0
            result = json.loads(body)["data"]["result"]
            return float(result[0]["value"][1]) if result else 0.0

        value = wait_for(restarts, limit=90)
        assert isinstance(value, float) and value >= 1
    finally:
        prom.send_signal(signal.SIGTERM)
        prom.wait(timeout=WAIT)


@pytest.mark.anyio
async def test_restart_reasons_in_process(anyio_backend: str) -> None:
    from otp_agents.events import Kind
    from otp_agents.ops.metrics import Metrics

    from .helpers import cmd, signal_child, tree_of

    config = {"intensity": 10, "children": [cmd("a"), {"id": "sub", "intensity": 0, "children": [cmd("x")]}]}
    async with tree_of(config) as (tree, rec):
        metrics = Metrics()
        metrics.attach(tree)
        mark = rec.mark()
        await signal_child(tree, "root/a", signal.SIGKILL)
        await rec.wait_kind(Kind.CHILD_STARTED, "root/a", mark)
        await tree.root.operator_restart("a")
        mark = rec.mark()
        await signal_child(tree, "root/sub/x", signal.SIGKILL)  # sub gives up: escalation to root
        await rec.wait_kind(Kind.SUPERVISOR_STARTED, "root/sub", mark)
        text = metrics.exposition().decode()
    assert 'otp_agents_restarts_total{path="root/a",reason="crash"} 1.0' in text
    assert 'otp_agents_restarts_total{path="root/a",reason="operator"} 1.0' in text
    assert 'otp_agents_restarts_total{path="root/sub",reason="escalation"} 1.0' in text
    assert 'otp_agents_intensity_exhausted_total{supervisor="root/sub"} 1.0' in text


async def test_pool_load_and_dispatcher_gauges(anyio_backend: str) -> None:
    from otp_agents.events import Kind
    from otp_agents.ops.metrics import Metrics

    from .helpers import ROOT, cmd, tree_of

    config = {
        "children": [
            {"id": "disp", "module": "workers.chaos:fake_dispatcher", "cwd": str(ROOT)},
            {"id": "calls", "strategy": "simple_one_for_one", "max_children": 4, "children": [cmd("call")]},
        ]
    }
    async with tree_of(config) as (tree, rec):
        metrics = Metrics()
        metrics.attach(tree)
        await tree.supervisor("root/calls").start_child([])
        await rec.wait_for(lambda e: e.kind is Kind.WORKER_REPORT and e.reason == "dispatcher_load")
        text = metrics.exposition().decode()
        assert 'otp_agents_pool_load{supervisor="root/calls"} 0.25' in text
        assert 'otp_agents_pool_capacity{supervisor="root/calls"} 4.0' in text
        assert 'otp_agents_dispatcher_connected{path="root/disp"} 1.0' in text
        assert 'otp_agents_dispatcher_load{path="root/disp"} 0.25' in text
        mark = rec.mark()
        await tree.root.terminate_child("disp")
        await rec.wait_kind(Kind.CHILD_TERMINATED, "root/disp", mark)
        assert 'otp_agents_dispatcher_connected{path="root/disp"} 0.0' in metrics.exposition().decode()


def test_restart_reasons_come_from_the_events_typed_cause_never_from_their_text() -> None:
    """The engine puts the rules' Cause on ``restarting`` and ``recycled`` events; metrics read
    that field. Text in ``detail`` or ``reason`` (an operator note, a worker's words) changes
    nothing, and an event without a cause counts no restart."""
    from otp_agents.events import Event, Kind
    from otp_agents.ops.metrics import Metrics

    metrics = Metrics()

    def feed(kind: Kind, path: str, **fields: object) -> None:
        metrics.on_event(Event(kind=kind, path=path, ts=0.0, **fields))  # type: ignore[arg-type]

    feed(Kind.RESTARTING, "root/a", cause="hang", detail="operator", reason="memory")
    feed(Kind.RESTARTING, "root/a", detail="operator")  # no cause: not a restart the rules made
    feed(Kind.RECYCLED, "root/b", cause="lifetime_recycle", reason="memory", detail="restart")
    feed(Kind.RECYCLED, "root/b", reason="memory", detail="restart")  # no cause: not counted
    feed(Kind.CHILD_EXITED, "root/c", reason="crash", detail="escalation")
    text = metrics.exposition().decode()
    restarts = sorted(line for line in text.splitlines() if line.startswith("otp_agents_restarts_total"))
    assert restarts == [
        'otp_agents_restarts_total{path="root/a",reason="hang"} 1.0',
        'otp_agents_restarts_total{path="root/b",reason="lifetime_recycle"} 1.0',
    ]
