"""`otp-agents run` and the signals an operator or a service manager sends it, and the checks it
makes before the first child starts. Real processes, on each backend."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import ROOT, WAIT
from .test_cli import BACKENDS, CLI, read_events, start_cli, started, wait_events, write_tree

SLEEPER = 'command = ["sleep", "1000"]\nshutdown = 2\n'
ONE = f'id = "root"\n\n[[children]]\nid = "a"\n{SLEEPER}'


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=WAIT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sighup_reloads_the_tree_file_and_keeps_the_others_running(tmp_path: Path, backend: str) -> None:
    tree = write_tree(tmp_path, ONE)
    events = tmp_path / "events.jsonl"
    proc = start_cli(tree, backend, events, subprocess.DEVNULL)
    try:
        before = started(wait_events(events, lambda ev: "root/a" in started(ev), proc))
        tree.write_text(ONE + f'\n[[children]]\nid = "b"\n{SLEEPER}')
        proc.send_signal(signal.SIGHUP)
        after = started(wait_events(events, lambda ev: "root/b" in started(ev), proc))
        assert proc.poll() is None  # alive: HUP is a reload, not the end
        assert after["root/a"] == before["root/a"]  # unchanged child, same process
        assert [e["kind"] for e in read_events(events) if e["path"] == "root/a"] == ["child_started"]
    finally:
        assert stop(proc) == 0
    assert {e["path"] for e in read_events(events) if e["kind"] == "child_terminated"} == {"root/a", "root/b"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_reload_on_sighup_changes_nothing(tmp_path: Path, backend: str) -> None:
    tree = write_tree(tmp_path, ONE)
    events = tmp_path / "events.jsonl"
    log = tmp_path / "stderr.log"
    with open(log, "wb") as err:
        proc = start_cli(tree, backend, events, err.fileno())
    try:
        wait_events(events, lambda ev: "root/a" in started(ev), proc)
        tree.write_text(ONE + "\n[[children]]\nid = 'b'\nshutdown = -1\ncommand = ['true']\n")
        proc.send_signal(signal.SIGHUP)
        wait_for_log(log, "SIGHUP: reload refused", proc)
        proc.send_signal(signal.SIGUSR1)  # status into the log: still exactly one child
        text = wait_for_log(log, "SIGUSR1 received: status of 1 children", proc)
        assert "children[1].shutdown" in text  # the refusal names the key path
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGALRM])
def test_signals_without_a_meaning_are_logged_and_change_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    tree = write_tree(tmp_path, ONE)
    events = tmp_path / "events.jsonl"
    log = tmp_path / "stderr.log"
    with open(log, "wb") as err:
        proc = start_cli(tree, "asyncio", events, err.fileno())
    try:
        pid = started(wait_events(events, lambda ev: "root/a" in started(ev), proc))["root/a"]
        proc.send_signal(sig)
        wait_for_log(log, f"{sig.name} received: ignored", proc)
        assert started(read_events(events)) == {"root/a": pid}
    finally:
        assert stop(proc) == 0


def test_sigquit_stops_the_tree_in_order(tmp_path: Path) -> None:
    tree = write_tree(tmp_path, ONE)
    events = tmp_path / "events.jsonl"
    proc = start_cli(tree, "asyncio", events, subprocess.DEVNULL)
    wait_events(events, lambda ev: "root/a" in started(ev), proc)
    proc.send_signal(signal.SIGQUIT)
    assert proc.wait(timeout=WAIT) == 0
    kinds = [e["kind"] for e in read_events(events)]
    assert kinds[-2:] == ["child_terminated", "supervisor_stopped"]


def wait_for_log(log: Path, needle: str, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if needle in text:
            return text
        assert proc.poll() is None, f"exited with {proc.returncode}: {text[-2000:]}"
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in the log: {log.read_text()[-2000:]}")


def run_refused(tmp_path: Path, *extra: str) -> tuple[int, str, list[str]]:
    tree = write_tree(tmp_path, ONE)
    events = tmp_path / "events.jsonl"
    argv = [*CLI, "run", str(tree), "--events", str(events), "--state-dir", str(tmp_path / "st"), *extra]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=WAIT, check=False)
    kinds = [e["kind"] for e in read_events(events)]
    return done.returncode, done.stderr.decode(), kinds


def test_a_busy_metrics_port_is_refused_before_any_child_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err, kinds = run_refused(tmp_path, "--metrics", f"127.0.0.1:{port}")
    assert code == 3
    assert err.strip().splitlines() == [
        f"otp-agents: --metrics 127.0.0.1:{port}: cannot listen there (Address already in use)"
    ]
    assert kinds == []  # nothing started, nothing to stop


def test_an_unresolvable_metrics_host_is_one_line_and_exit_2(tmp_path: Path) -> None:
    code, err, kinds = run_refused(tmp_path, "--metrics", "no-such-host.invalid:9464")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "otp-agents: --metrics no-such-host.invalid:9464: cannot resolve"
    )
    assert kinds == []


def test_a_state_dir_too_long_for_the_control_socket_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    code, err, _kinds = run_refused(tmp_path, "--state-dir", str(deep))
    assert code == 2
    assert "longer than a Unix socket allows" in err and len(err.strip().splitlines()) == 1
    assert not deep.exists()  # refused before the state dir was made


def test_an_events_file_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "events.jsonl"
    tree = write_tree(tmp_path, ONE)
    argv = [*CLI, "run", str(tree), "--events", str(target), "--state-dir", str(tmp_path / "st")]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=WAIT, check=False)
    assert done.returncode == 3
    assert done.stderr.decode().splitlines() == [
        f"otp-agents: --events {target}: cannot append to it (No such file or directory)"
    ]
