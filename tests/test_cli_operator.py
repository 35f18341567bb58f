"""What an operator does all day, through the real CLI: read a child's logs (after a restart,
after a rotation, two lives of one dynamic name kept apart), see why a child is down in
``status``, look at one child or subtree, ``--version``, and filters that cannot match refused."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .helpers import ROOT, WAIT, poll, run_cli

CLI = [sys.executable, "-m", "otp_agents.cli"]


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args, "--state-dir", str(state)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


def status(state: Path, path: str = "") -> dict[str, Any]:
    done = cli(state, "status", *([path] if path else []), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["data"]  # type: ignore[no-any-return]


def rows(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for row in data["children"]:
        out[row["path"]] = row
        out.update(rows(row) if "children" in row else {})
    return out


def up(state: Path, path: str) -> int | None:
    try:
        row = rows(status(state)).get(path)
    except (AssertionError, json.JSONDecodeError):
        return None
    return row["pid"] if row and row["status"] == "running" else None


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=WAIT) == 0


ECHOER = 'command = ["sh", "-c", "echo marker-$$; echo warn-$$ >&2; exec sleep 1000"]'


def test_a_childs_marker_line_is_in_its_logs_after_a_restart_and_after_rotation(tmp_path: Path) -> None:
    tree = tmp_path / "tree.toml"
    tree.write_text(
        f'id = "root"\nintensity = 5\n\n[[children]]\nid = "echo"\n{ECHOER}\nshutdown = 2\n\n'
        '[[children]]\nid = "chatty"\ncommand = ["sh", "-c", "i=0; while [ $i -lt 400 ]; do '
        "echo line-$i-padding-padding-padding-padding-padding; i=$((i+1)); done; "
        'echo last-line; exec sleep 1000"]\n'
        "shutdown = 2\nlogs = { max_bytes = 4096, backups = 2 }\n"
    )
    state = tmp_path / "state"
    proc = run_cli(tree, state, tmp_path / "events.jsonl", "asyncio", tmp_path / "stderr.log")
    try:
        first = poll(lambda: up(state, "root/echo"), "root/echo running")
        logs = poll(
            lambda: (
                (r := cli(state, "logs", "root/echo")).returncode == 0 and f"marker-{first}" in r.stdout and r
            )
        )
        assert re.search(rf"^\S+Z out marker-{first}$", logs.stdout, re.M)
        assert f"err warn-{first}" in logs.stdout
        os.kill(first, signal.SIGKILL)
        second = poll(
            lambda: (pid := up(state, "root/echo")) not in (None, first) and pid, "a restarted root/echo"
        )
        again = poll(lambda: f"marker-{second}" in (r := cli(state, "logs", "root/echo")).stdout and r)
        assert f"marker-{first}" not in again.stdout  # the newest instance only
        before = cli(state, "logs", "root/echo", "--previous")
        assert f"marker-{first}" in before.stdout and f"marker-{second}" not in before.stdout
        # the chatty one rotated (4 KiB files, 2 backups): its last line is still there
        tail = poll(lambda: "last-line" in (r := cli(state, "logs", "root/chatty", "-n", "3")).stdout and r)
        assert tail.stdout.splitlines()[-1].endswith("out last-line")
        listed = cli(state, "logs", "root/chatty", "--list").stdout
        assert "2 rotated" in listed
        # and the supervisor's own log has the line, labelled with the child
        text = (tmp_path / "stderr.log").read_text()
        assert f"root/echo[{first}] out: marker-{first}" in text
    finally:
        stop(proc)


def test_two_lives_of_one_dynamic_name_are_kept_apart(tmp_path: Path) -> None:
    """room-1 of one run and room-1 of the next (same state dir) are two files, not one."""
    tree = tmp_path / "tree.toml"
    tree.write_text(
        'id = "root"\n\n[[children]]\nid = "rooms"\nstrategy = "simple_one_for_one"\n'
        '  [[children.children]]\n  id = "room"\n'
        '  command = ["sh", "-c", "echo call-$1; exec sleep 1000", "sh"]\n'
        '  restart = "temporary"\n  shutdown = 2\n'
    )
    state = tmp_path / "state"
    pids = []
    for call in ("alpha", "beta"):
        proc = run_cli(tree, state, tmp_path / f"{call}.jsonl", "asyncio", tmp_path / f"{call}.log")
        try:
            poll(lambda: cli(state, "status").returncode == 0, "the tree up")
            assert cli(state, "start-child", "root/rooms", call).stdout.strip() == "started root/rooms/room-1"
            pids.append(poll(lambda: up(state, "root/rooms/room-1"), "room-1"))
            poll(lambda: f"call-{call}" in cli(state, "logs", "root/rooms/room-1").stdout)  # noqa: B023
        finally:
            stop(proc)
    newest = cli(state, "logs", "root/rooms/room-1").stdout
    previous = cli(state, "logs", "root/rooms/room-1", "--previous").stdout
    assert "call-beta" in newest and "call-alpha" not in newest
    assert "call-alpha" in previous and "call-beta" not in previous
    names = cli(state, "logs", "root/rooms/room-1", "--list").stdout
    assert str(pids[0]) in names and str(pids[1]) in names


def test_a_missing_module_is_named_by_the_start_error_and_by_status(tmp_path: Path) -> None:
    module = tmp_path / "vanishing_worker.py"
    module.write_text(
        "from otp_agents.worker import Worker\n\n\nasync def main(worker: Worker) -> None:\n"
        "    await worker.ready()\n    await worker.wait_stopping()\n"
    )
    tree = tmp_path / "tree.toml"
    tree.write_text(
        'id = "root"\nintensity = 100\nperiod = 1\n\n'
        '[[children]]\nid = "w"\nmodule = "vanishing_worker:main"\n'
        f'cwd = "{tmp_path}"\nshutdown = 2\nbackoff = {{ initial = 0.1, factor = 300, max = 30 }}\n'
    )
    state = tmp_path / "state"
    proc = run_cli(tree, state, tmp_path / "events.jsonl", "asyncio", tmp_path / "stderr.log")
    try:
        pid = poll(lambda: up(state, "root/w"), "root/w running")
        module.unlink()
        os.kill(pid, signal.SIGKILL)  # its restart cannot import it any more

        def why() -> dict[str, Any] | None:
            row = rows(status(state)).get("root/w", {})
            last = row.get("last_exit")
            return (
                row
                if row.get("status") == "restarting" and last and last["reason"] == "start_failed"
                else None
            )

        row = poll(why, "root/w restarting after a failed start")
        assert "No module named 'vanishing_worker'" in row["last_exit"]["detail"]
        assert row["retry_in"] > 0
        shown = cli(state, "status", "root/w").stdout
        assert "restarting" in shown and "No module named 'vanishing_worker'" in shown
        assert shown.splitlines()[1].split() == [
            "PATH",
            "STATE",
            "PID",
            "UPTIME",
            "RESTARTS",
            "LAST",
            "EXIT",
            "RETRY",
            "IN",
            "CPU",
            "MEM",
            "RTT",
        ]
    finally:
        stop(proc)
    # and a tree whose worker cannot be imported at all is refused with the cause
    tree.write_text(
        'id = "root"\n\n[[children]]\nid = "w"\nmodule = "no_such_module_here:main"\nshutdown = 2\n'
    )
    done = subprocess.run(
        [*CLI, "run", str(tree), "--state-dir", str(tmp_path / "s2")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 3
    assert "No module named 'no_such_module_here'" in done.stderr.splitlines()[-1]


def test_status_of_one_child_or_subtree_and_version_and_refused_filters(tmp_path: Path) -> None:
    tree = tmp_path / "tree.toml"
    tree.write_text(
        f'id = "root"\n\n[[children]]\nid = "a"\n{ECHOER}\nshutdown = 2\n\n[[children]]\nid = "sub"\n'
        f'  [[children.children]]\n  id = "b"\n  {ECHOER}\n  shutdown = 2\n'
    )
    state = tmp_path / "state"
    proc = run_cli(tree, state, tmp_path / "events.jsonl", "trio", tmp_path / "stderr.log")
    try:
        poll(lambda: up(state, "root/sub/b"), "root/sub/b running")
        assert set(rows(status(state, "root/sub"))) == {"root/sub", "root/sub/b"}
        assert set(rows(status(state, "root/a"))) == {"root/a"}
        missing = cli(state, "status", "root/nope")
        assert missing.returncode == 4 and "root/nope" in missing.stderr
        typo = cli(state, "events", "--kind", "child_startd")
        assert typo.returncode == 5
        assert "unknown event kind 'child_startd'" in typo.stderr and "child_started" in typo.stderr
        outside = cli(state, "events", "--path", "elsewhere/x")
        assert outside.returncode == 5 and "not in this tree" in outside.stderr
        plain = cli(state, "status")
        assert "\x1b[" not in plain.stdout  # no colour when stdout is not a terminal
    finally:
        stop(proc)
    version = subprocess.run([*CLI, "--version"], capture_output=True, text=True, check=True, cwd=ROOT)
    assert re.fullmatch(r"otp-agents, version \d+\.\d+\.\d+\S*\n", version.stdout)
    first = (tmp_path / "stderr.log").read_text().splitlines()[0]
    assert "otp-agents " in first and str(tree) in first and str(state) in first


@pytest.mark.parametrize("path", ["root/nothing", "root"])
def test_logs_of_a_path_without_logs_says_so(tmp_path: Path, path: str) -> None:
    done = cli(tmp_path, "logs", path)
    assert done.returncode == 4 and "no logs for" in done.stderr
