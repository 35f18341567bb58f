"""Running out of descriptors, of processes, or of disk for the state dir: the supervisor says so
with clear events and keeps supervising; it does not crash."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from otp_agents.errors import NotRunning
from otp_agents.ops import control_client as control

from .helpers import ROOT, WAIT, poll, run_cli

CLI = [sys.executable, "-m", "otp_agents.cli"]
POOL = f"""
id = "root"
[[children]]
id = "keep"
module = "workers.chaos:steady"
cwd = "{ROOT}"
health = {{ ping_interval = 0.5, ping_timeout = 2 }}
[[children]]
id = "pool"
strategy = "simple_one_for_one"
  [[children.children]]
  id = "w"
  module = "workers.chaos:steady"
  cwd = "{ROOT}"
  restart = "temporary"
"""


def events_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ask(state: Path, op: str, path: str = "", args: list[str] | None = None) -> control.Reply:
    req = control.Request(op=op, path=path, args=args or [])
    return control.request(control.socket_path(state), req, timeout=WAIT)[-1]


def start_until_refused(state: Path, limit: int = 200) -> tuple[int, str]:
    """start-child until the supervisor refuses; how many started, and the refusal."""
    for n in range(limit):
        reply = ask(state, "start-child", "root/pool")
        if not reply.ok:
            return n, reply.message
    raise AssertionError(f"{limit} children started without reaching the limit")


def restarted_after_kill(state: Path, events: Path) -> None:
    """The tree still does its job at the limit: a killed child is started again."""
    old = next(c for c in ask(state, "status").data["children"] if c["id"] == "keep")["pid"]
    os.kill(old, signal.SIGKILL)
    poll(
        lambda: any(
            e["kind"] == "child_started" and e["path"] == "root/keep" and e["pid"] != old
            for e in events_of(events)
        ),
        "the killed child's restart",
    )


@pytest.fixture
def tree_file(tmp_path: Path) -> Path:
    tree = tmp_path / "tree.toml"
    tree.write_text(POOL)
    return tree


def stop(proc: subprocess.Popen[bytes], state: Path | None = None) -> int:
    if state is not None:
        try:
            ask(state, "stop")
        except (OSError, NotRunning):
            proc.send_signal(signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_out_of_descriptors(tree_file: Path, tmp_path: Path, backend: str) -> None:
    state, events = tmp_path / "state", tmp_path / "events.jsonl"

    def low_fd_limit() -> None:  # the CLI raises its soft limit to the hard one: cap both
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc = run_cli(tree_file, state, events, backend, tmp_path / "log", preexec_fn=low_fd_limit)
    try:
        poll(lambda: control.socket_path(state).exists() and ask(state, "status").ok, "status")
        started, refusal = start_until_refused(state)
        assert started > 0
        assert "out of file descriptors" in refusal and "raise its limit" in refusal
        failed = poll(
            lambda: [e for e in events_of(events) if e["kind"] == "start_failed"], "the start_failed event"
        )
        assert "out of file descriptors" in failed[-1]["detail"]
        assert ask(state, "status").ok  # the control socket still answers at the limit
        restarted_after_kill(state, events)
    finally:
        code = stop(proc, state)
    assert code == 0, (tmp_path / "log").read_text()[-2000:]


def _pids_cgroup() -> Path | None:
    base = Path("/sys/fs/cgroup/pids")
    if not base.is_dir() or not os.access(base, os.W_OK):
        return None
    return base


@pytest.mark.skipif(_pids_cgroup() is None, reason="needs a writable cgroup v1 pids hierarchy (root)")
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_out_of_processes(tree_file: Path, tmp_path: Path, backend: str) -> None:
    base = _pids_cgroup()
    assert base is not None
    group = base / f"otp-agents-test.{os.getpid()}.{backend}"
    group.mkdir()
    try:
        (group / "pids.max").write_text("40\n")
        state, events = tmp_path / "state", tmp_path / "events.jsonl"

        def into_group() -> None:
            (group / "cgroup.procs").write_text(f"{os.getpid()}\n")

        proc = run_cli(tree_file, state, events, backend, tmp_path / "log", preexec_fn=into_group)
        try:
            poll(lambda: control.socket_path(state).exists() and ask(state, "status").ok, "status")
            started, refusal = start_until_refused(state)
            assert started > 0
            assert "cannot create a process" in refusal and "limit on processes" in refusal, refusal
            assert ask(state, "status").ok
            restarted_after_kill(state, events)
        finally:
            code = stop(proc, state)
        assert code == 0, (tmp_path / "log").read_text()[-2000:]
    finally:
        deadline = time.monotonic() + WAIT
        while (group / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        group.rmdir()


def _can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs root, unshare and nsenter to mount a small tmpfs")
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_full_disk_for_the_state_dir(tree_file: Path, tmp_path: Path, backend: str) -> None:
    """The state dir (and the event file in it) on a 2 MB tmpfs in a mount namespace of the
    supervisor's own, then filled up."""
    state = tmp_path / "state"
    state.mkdir()
    events = state / "events.jsonl"
    script = f'mount -t tmpfs -o size=2m,mode=0700 tmpfs "{state}" && exec "$@"'
    proc = run_cli(
        tree_file,
        state,
        events,
        backend,
        tmp_path / "log",
        prefix=("unshare", "-m", "sh", "-c", script, "sh"),
    )

    def inside(*argv: str) -> subprocess.CompletedProcess[bytes]:  # in the supervisor's namespace
        return subprocess.run(["nsenter", "-t", str(proc.pid), "-m", *argv], capture_output=True, check=False)

    def status_inside() -> dict[str, Any] | None:
        out = inside(*CLI, "status", "--json", "--state-dir", str(state))
        return json.loads(out.stdout)["data"] if out.returncode == 0 else None

    def events_inside() -> list[dict[str, Any]]:
        text = inside("cat", str(events)).stdout.decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    try:
        poll(status_inside, "status")
        inside("sh", "-c", f'dd if=/dev/zero of="{state}/filler" bs=64k 2>/dev/null; true')
        assert b"100%" in inside("df", str(state)).stdout
        # A stack dump cannot be written: the request is refused and an event says why.
        out = inside(*CLI, "dump", "root/keep", "--state-dir", str(state))
        assert out.returncode != 0 and b"could not be written" in out.stderr
        # A hang is still handled by the rules (without its dump), and the tree answers.
        keep = next(c for c in (status_inside() or {})["children"] if c["id"] == "keep")["pid"]
        os.kill(keep, signal.SIGSTOP)
        poll(
            lambda: (
                next(c for c in (status_inside() or {"children": []})["children"] if c["id"] == "keep")["pid"]
                not in (keep, None)
            ),
            "the hung child's replacement",
        )

        # The event file's last page fills up after a few more events: then writing it fails.
        def stream_failed() -> bool:
            inside(*CLI, "restart", "root/keep", "--state-dir", str(state))
            return (
                "cannot write (No space left on device); events are dropped" in (tmp_path / "log").read_text()
            )

        poll(stream_failed, "the event stream failing")
        log = (tmp_path / "log").read_text()
        assert "state write failed" in log and "not written: No space left on device" in log
        # Room again: the event stream resumes, says what it dropped, and stays parseable.
        inside("rm", "-f", f"{state}/filler")
        assert inside(*CLI, "restart", "root/keep", "--state-dir", str(state)).returncode == 0
        poll(lambda: "events were dropped" in (tmp_path / "log").read_text(), "the event stream resuming")
        assert any(e["kind"] == "child_started" and e["path"] == "root/keep" for e in events_inside()[-20:])
        assert inside(*CLI, "stop", "--state-dir", str(state)).returncode == 0
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_cut_event_line_that_cannot_be_truncated_is_ended_before_the_next() -> None:
    """A pipe takes part of a batch, then no more, and cannot be truncated: the writer marks it
    so that the next batch starts on a new line (one unreadable line, not two)."""
    from otp_agents import events

    read_end, write_end = os.pipe()
    try:
        os.set_blocking(write_end, False)
        batch = b'{"kind":"x"}\n' * 20_000  # more than a pipe holds
        assert events._write_all(write_end, batch) is False
        assert write_end in events._torn
    finally:
        events._torn.discard(write_end)
        os.close(read_end)
        os.close(write_end)
