"""A cgroup per child: what a worker started is killed with it, however it left its process
group; without a cgroup (no delegation), the documented fallback. Through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .helpers import ROOT, WAIT, alive, poll

CLI = [sys.executable, "-m", "otp_agents.cli"]


def tree(tmp: Path) -> Path:
    path = tmp / "tree.toml"
    path.write_text(
        f"""
[[children]]
id = "w"
module = "workers.chaos:setsid_leaker"
args = ["5", "{tmp / "grandchild.pid"}"]
restart = "temporary"
health = {{ memory_limit_mb = 150, memory_interval = 0.1, memory_grace = 1, dump_timeout = 0.5 }}
"""
    )
    return path


@contextmanager
def running(tmp: Path, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    state, events = tmp / "state", tmp / "events.jsonl"
    cmd = [*CLI, "run", str(tree(tmp)), "--state-dir", str(state), "--events", str(events)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    grandchild: int | None = None
    try:
        poll(lambda: (tmp / "grandchild.pid").exists() and (tmp / "grandchild.pid").read_text().strip())
        grandchild = int((tmp / "grandchild.pid").read_text())
        yield proc, state, events
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=WAIT)
        if grandchild is not None and alive(grandchild):  # a failed test leaves nothing behind
            os.kill(grandchild, signal.SIGKILL)


def containment(state: Path) -> str:
    out = subprocess.run(
        [*CLI, "status", "--json", "--state-dir", str(state)], capture_output=True, text=True
    )
    return str(json.loads(out.stdout)["data"]["containment"])


def killed_for_memory(events: Path) -> dict[str, object]:
    found = [
        e
        for e in map(json.loads, events.read_text().splitlines())
        if e["kind"] == "child_exited" and e["path"] == "root/w"
    ]
    return found[0] if found else {}


def test_a_setsid_grandchild_leaking_past_its_workers_limit_is_killed_with_it(tmp_path: Path) -> None:
    with running(tmp_path) as (_proc, state, events):
        where = containment(state)
        if not where.startswith("a cgroup per child"):
            pytest.skip(f"no cgroup can be made on this machine: {where}")
        group = Path(where.split(";")[0].removeprefix("a cgroup per child, in "))
        grandchild = int((tmp_path / "grandchild.pid").read_text())
        worker_groups = [g for g in group.iterdir() if g.name.startswith("root.w.")]
        assert len(worker_groups) == 1 and str(grandchild) in (worker_groups[0] / "cgroup.procs").read_text()
        poll(lambda: killed_for_memory(events))
        assert killed_for_memory(events)["reason"] == "memory"
        poll(lambda: not alive(grandchild))  # killed with the worker, not left to the end of the tree
        poll(lambda: not worker_groups[0].exists())  # nothing of the worker's cgroup survives


def test_without_a_cgroup_the_setsid_grandchild_outlives_its_worker_until_the_tree_stops(
    tmp_path: Path,
) -> None:
    with running(tmp_path, OTP_AGENTS_CGROUP="off") as (proc, state, events):
        assert containment(state).startswith("process groups (OTP_AGENTS_CGROUP=off)")
        grandchild = int((tmp_path / "grandchild.pid").read_text())
        poll(lambda: killed_for_memory(events))
        assert killed_for_memory(events)["reason"] == "memory"
        assert alive(grandchild)  # the documented fallback: it escaped its worker's group
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=WAIT)
    assert not alive(grandchild)  # the tree's stop takes it


def test_memory_max_mb_is_enforced_by_the_kernel_and_reported_as_a_memory_kill(tmp_path: Path) -> None:
    """A worker leaking past ``memory_max_mb`` (no breaker limit set): the kernel's OOM killer in
    its memory cgroup ends it, and that is a ``memory`` crash with its peak."""
    (tmp_path / "tree.toml").write_text(
        """
[[children]]
id = "w"
module = "workers.chaos:leaker"
args = ["10", "1000", "ignore"]
restart = "temporary"
health = { memory_max_mb = 120, memory_interval = 0.1 }
"""
    )
    state, events = tmp_path / "state", tmp_path / "events.jsonl"
    cmd = [*CLI, "run", str(tmp_path / "tree.toml"), "--state-dir", str(state), "--events", str(events)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        poll(lambda: (state / "control.sock").exists() and "memory" in containment(state))
        if "memory from a memory cgroup per child" not in containment(state):
            pytest.skip(f"no memory cgroup on this machine: {containment(state)}")
        poll(lambda: killed_for_memory(events))
        exited = killed_for_memory(events)
        seen = [json.loads(line) for line in events.read_text().splitlines()]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=WAIT)
    assert exited["reason"] == "memory" and exited["signal"] == "SIGKILL"
    (limit,) = [e for e in seen if e["kind"] == "memory_limit"]
    assert "by the kernel" in limit["detail"] and limit["threshold"] == 120
    assert 100 <= limit["value"] <= 125  # the peak the cgroup saw, at the limit
    assert not [e for e in seen if e["kind"] == "dump_taken"]  # the kernel does not wait for one
