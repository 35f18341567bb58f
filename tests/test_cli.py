"""The `otp-agents` command, run as a real process on each backend."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .helpers import FAULTY, ROOT, WAIT, alive, descendants, spares_of

CLI = [sys.executable, "-m", "otp_agents.cli"]
BACKENDS = ["asyncio", "trio"]


def write_tree(tmp: Path, text: str) -> Path:
    path = tmp / "tree.toml"
    path.write_text(text)
    return path


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_events(path: Path, pred: Any, proc: subprocess.Popen[bytes] | None = None) -> list[dict[str, Any]]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        events = read_events(path)
        if pred(events):
            return events
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"otp-agents exited early with {proc.returncode}")
        time.sleep(0.02)
    raise AssertionError(f"condition not met; events: {read_events(path)}")


TREE = f"""
id = "root"
strategy = "one_for_one"

[[children]]
id = "a"
command = ["{FAULTY[0]}"]

[[children]]
id = "w"
module = "workers.chaos:steady"

[[children]]
id = "sub"
strategy = "one_for_all"
  [[children.children]]
  id = "x"
  command = ["{FAULTY[0]}"]
"""


def started(events: list[dict[str, Any]]) -> dict[str, int]:
    return {e["path"]: e["pid"] for e in events if e["kind"] == "child_started"}


def start_cli(
    tree: Path, backend: str, events_file: Path, stderr: int, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*CLI, "run", str(tree), "--backend", backend, "--events", str(events_file)],
        cwd=ROOT,
        stderr=stderr,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_then_sigterm_stops_in_reverse_order(tmp_path: Path, backend: str) -> None:
    tree = write_tree(tmp_path, TREE)
    events_file = tmp_path / "events.jsonl"
    proc = start_cli(tree, backend, events_file, subprocess.PIPE)
    events = wait_events(events_file, lambda ev: len(started(ev)) == 3, proc)
    pids = started(events)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err.decode()
    assert b"root: stopped" in err
    # the protocol worker left cleanly: no traceback, no "no running event loop" on the way out
    assert b"Traceback" not in err and b"no running event loop" not in err
    terminated = [e["path"] for e in read_events(events_file) if e["kind"] == "child_terminated"]
    assert terminated == ["root/sub/x", "root/w", "root/a"]
    assert not any(alive(pid) for pid in pids.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_root_giving_up_exits_nonzero_naming_the_child(tmp_path: Path, backend: str) -> None:
    tree = write_tree(
        tmp_path,
        """
intensity = 2
period = 60
[[children]]
id = "steady"
command = ["sleep", "60"]
[[children]]
id = "crasher"
command = ["sh", "-c", "exit 3"]
""",
    )
    proc = subprocess.run(
        [*CLI, "run", str(tree), "--backend", backend],
        cwd=ROOT,
        capture_output=True,
        timeout=WAIT,
        check=False,
    )
    assert proc.returncode == 1
    last = proc.stderr.decode().strip().splitlines()[-1]
    assert last == (
        "otp-agents: root: root supervisor gave up: reached_max_restart_intensity "
        "after root/crasher ended (exit code 3)"
    )


def test_bad_config_is_refused_before_anything_starts(tmp_path: Path) -> None:
    tree = write_tree(
        tmp_path,
        """
[[children]]
id = "a"
command = ["sleep", "60"]
[[children]]
id = "b"
command = ["sleep", "60"]
shutdown = "later"
""",
    )
    events_file = tmp_path / "events.jsonl"
    proc = subprocess.run(
        [*CLI, "run", str(tree), "--events", str(events_file)], capture_output=True, timeout=WAIT, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.decode().strip() == (
        f"otp-agents: {tree}: children[1].shutdown: "
        """expected seconds > 0, "brutal_kill" or "infinity", got 'later'"""
    )
    assert not events_file.exists()


def test_start_failure_exit_code(tmp_path: Path) -> None:
    tree = write_tree(tmp_path, '[[children]]\nid = "a"\ncommand = ["/no/such/program"]\n')
    proc = subprocess.run([*CLI, "run", str(tree)], capture_output=True, timeout=WAIT, check=False)
    assert proc.returncode == 3
    assert "root/a: cannot execute '/no/such/program'" in proc.stderr.decode()


def test_check_prints_the_tree_without_starting_it(tmp_path: Path) -> None:
    tree = write_tree(tmp_path, TREE + '\n[[children]]\nid = "ghost"\ncommand = ["no-such-program-xyz"]\n')
    proc = subprocess.run(
        [*CLI, "check", str(tree)], cwd=ROOT, capture_output=True, timeout=WAIT, check=False
    )
    assert proc.returncode == 0
    out = proc.stdout.decode().splitlines()
    assert out[0] == f"{tree}: ok"
    assert out[1].startswith("root  supervisor one_for_one intensity=1 period=5s")
    assert [line.split()[0] for line in out[2:-1]] == [
        "root/a",
        "root/w",
        "root/sub",
        "root/sub/x",
        "root/ghost",
    ]
    # a: faulty.sh, shutdown 5 (+1); w: 5 (+1); sub: x 5 (+1); ghost: 5 (+1), one after another
    assert out[-1].startswith("ordered stop: at most 24s")
    assert "warning: root/ghost: program 'no-such-program-xyz' not found" in proc.stderr.decode()


def test_default_tree_checks() -> None:
    proc = subprocess.run([*CLI, "check"], cwd=ROOT, capture_output=True, timeout=WAIT, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "supervisors/default.toml: ok" in proc.stdout.decode()


@pytest.mark.parametrize("tree", sorted(p.name for p in (ROOT / "supervisors").glob("*.toml")))
def test_every_shipped_tree_checks(tree: str) -> None:
    path = f"supervisors/{tree}"
    proc = subprocess.run([*CLI, "check", path], cwd=ROOT, capture_output=True, timeout=WAIT, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert f"{path}: ok" in proc.stdout.decode()


@pytest.mark.parametrize("backend", BACKENDS)
def test_supervisor_killed_with_sigkill_leaves_no_process_behind(tmp_path: Path, backend: str) -> None:
    tree = write_tree(tmp_path, TREE)
    events_file = tmp_path / "events.jsonl"
    proc = start_cli(tree, backend, events_file, subprocess.DEVNULL)
    pids = started(wait_events(events_file, lambda ev: len(started(ev)) == 3, proc))
    family = descendants(proc.pid)
    assert set(pids.values()) <= family
    assert sigkill_survivors(proc, family) == {}


def sigkill_survivors(proc: subprocess.Popen[bytes], family: set[int]) -> dict[int, str]:
    """SIGKILL the supervisor; what of ``family`` is still alive after a bounded wait."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=WAIT)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and any(alive(p) for p in family):
        time.sleep(0.02)
    return {p: _cmdline(p) for p in family if alive(p)}


ZYGOTE_TREE = f"""
id = "root"
[[children]]
id = "zygote"
image = "steady"
preload = ["workers.chaos"]
idle = 2
cwd = "{ROOT}"
[[children]]
id = "a"
module = "workers.chaos:steady"
zygote = "steady"
cwd = "{ROOT}"
[[children]]
id = "b"
module = "workers.chaos:steady"
zygote = "steady"
cwd = "{ROOT}"
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_supervisor_killed_with_sigkill_leaves_no_zygote_worker_or_spare_behind(
    tmp_path: Path, backend: str
) -> None:
    """Forked workers and spares are the supervisor's adopted children, not the zygote's: each
    arms its own death signal once adopted."""
    tree = write_tree(tmp_path, ZYGOTE_TREE)
    events_file = tmp_path / "events.jsonl"
    proc = start_cli(tree, backend, events_file, subprocess.DEVNULL)
    try:
        events = wait_events(events_file, lambda ev: len(started(ev)) == 3, proc)
        assert [
            e.get("detail") for e in events if e["kind"] == "child_started" and e["path"] != "root/zygote"
        ] == ["forked by zygote steady"] * 2
        zygote_pid = started(events)["root/zygote"]
        deadline = time.monotonic() + WAIT
        while len(spares_of(zygote_pid, descendants(proc.pid))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)  # refilled after the two hand-overs
        family = descendants(proc.pid)
        spares = spares_of(zygote_pid, family)
        assert len(spares) == 2 and set(started(events).values()) | spares <= family
        assert sigkill_survivors(proc, family) == {}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return "?"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_while_starting_stops_cleanly(tmp_path: Path, backend: str) -> None:
    tree = write_tree(
        tmp_path,
        f"""
[[children]]
id = "a"
command = ["{FAULTY[0]}"]
[[children]]
id = "slow"
module = "workers.chaos:slow_start"
args = ["1.5"]
[[children]]
id = "never"
command = ["{FAULTY[0]}"]
""",
    )
    events_file = tmp_path / "events.jsonl"
    proc = start_cli(tree, backend, events_file, subprocess.PIPE)
    events = wait_events(events_file, lambda ev: "root/a" in started(ev), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err.decode()
    assert b"root: stopped while starting" in err
    events = read_events(events_file)
    assert "root/never" not in started(events)
    assert not any(alive(pid) for pid in started(events).values())


ESCAPE = (
    "import os, subprocess, sys; "
    "subprocess.Popen(['sleep', sys.argv[1]], start_new_session=True); "  # setsid() before exec
    "os._exit(0)"
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_escaped_grandchildren_are_reaped_and_stopped(tmp_path: Path, backend: str) -> None:
    # Each child starts a grandchild in a new session (out of the child's process group) and
    # exits. Without a cgroup per child (a host without delegation; tests/test_cgroups.py has
    # the cgroup side, where they go with their parent) the supervisor, a child subreaper,
    # adopts them: it reaps the one that ends and kills the one still running when the tree stops.
    tree = write_tree(
        tmp_path,
        f"""
[[children]]
id = "short"
command = ["{sys.executable}", "-c", "{ESCAPE}", "0.3"]
restart = "transient"
[[children]]
id = "long"
command = ["{sys.executable}", "-c", "{ESCAPE}", "120"]
restart = "transient"
""",
    )
    events_file = tmp_path / "events.jsonl"
    proc = start_cli(tree, backend, events_file, subprocess.PIPE, {"OTP_AGENTS_CGROUP": "off"})
    try:
        events = wait_events(events_file, lambda ev: any(e["kind"] == "orphan_reaped" for e in ev), proc)
        reaped = [e for e in events if e["kind"] == "orphan_reaped"]
        assert (reaped[0]["path"], reaped[0]["code"]) == ("root", 0)
        adopted = [p for p in descendants(proc.pid) if _cmdline(p) == "sleep 120 "]
        assert len(adopted) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err.decode()
    assert not alive(adopted[0])


def test_json_log_format(tmp_path: Path) -> None:
    tree = write_tree(
        tmp_path,
        '[[children]]\nid = "a"\ncommand = ["sh", "-c", "echo not json; echo {broken >&2; exit 3"]\n'
        'restart = "transient"\n',
    )
    proc = subprocess.run(
        [*CLI, "run", str(tree), "--log-format", "json", "--state-dir", str(tmp_path / "st")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert proc.returncode == 1
    rows = [json.loads(line) for line in proc.stderr.splitlines()]  # every line is JSON
    said = {(r["stream"], r["message"].rsplit(": ", 1)[-1]) for r in rows if r.get("child") == "root/a"}
    assert said == {("out", "not json"), ("err", "{broken")}  # the child's lines, labelled
    assert rows[-1]["message"].startswith("root: root supervisor gave up")  # the last line too
    exited = [r for r in rows if r.get("event", {}).get("kind") == "child_exited"]
    assert exited and exited[0]["event"]["path"] == "root/a" and exited[0]["event"]["code"] == 3
    assert exited[0]["level"] == "warning" and "root/a" in exited[0]["message"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sd_notify_ready_watchdog_stopping(tmp_path: Path, backend: str) -> None:
    import socket

    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(WAIT)
    tree = write_tree(tmp_path, TREE)
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
    proc = subprocess.Popen(
        [*CLI, "run", str(tree), "--backend", backend, "--state-dir", str(tmp_path / "st")],
        cwd=ROOT,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    seen: list[str] = []
    try:
        while not any(m.startswith("READY=1") for m in seen):
            seen.append(listener.recv(4096).decode())
        ready = next(m for m in seen if m.startswith("READY=1"))
        assert f"MAINPID={proc.pid}" in ready and "STATUS=root: running" in ready
        watchdogs = 0
        while watchdogs < 2:
            message = listener.recv(4096).decode()
            watchdogs += message == "WATCHDOG=1"
        proc.send_signal(signal.SIGTERM)
        while True:
            message = listener.recv(4096).decode()
            if message.startswith("STOPPING=1"):
                break
        assert proc.wait(timeout=WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_pid_1_in_a_fresh_pid_namespace_reaps_orphans_and_stops_cleanly(tmp_path: Path) -> None:
    tree = write_tree(
        tmp_path,
        f"""
[[children]]
id = "orphaner"
command = ["{sys.executable}", "-c", "{ESCAPE}", "0.3"]
restart = "transient"
[[children]]
id = "steady"
command = ["{FAULTY[0]}"]
""",
    )
    events_file = tmp_path / "events.jsonl"
    proc = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            *CLI,
            "run",
            str(tree),
            "--events",
            str(events_file),
            "--state-dir",
            str(tmp_path / "st"),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    try:
        wait_events(events_file, lambda ev: any(e["kind"] == "orphan_reaped" for e in ev), proc)
        init = linux_child(proc.pid)
        with open(f"/proc/{init}/status") as f:
            nspid = next(line for line in f if line.startswith("NSpid:")).split()
        assert nspid[-1] == "1"  # otp-agents is PID 1 in its namespace
        os.kill(init, signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    kinds = [e["kind"] for e in read_events(events_file)]
    # Orphans may still be reaped after the root stopped (PID 1 reaps to the end); nothing else.
    assert [k for k in kinds if k != "orphan_reaped"][-1] == "supervisor_stopped" and "orphan_reaped" in kinds


def linux_child(pid: int) -> int:
    from otp_agents import linux

    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        kids = linux.child_pids(pid)
        if kids:
            return kids[0]
        time.sleep(0.02)
    raise AssertionError(f"{pid} has no child")


def test_required_environment_is_checked_before_anything_starts(tmp_path: Path) -> None:
    tree = write_tree(
        tmp_path,
        'require_env = ["LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"]\n'
        '[[children]]\nid = "a"\ncommand = ["sleep", "300"]\n',
    )
    state = tmp_path / "state"
    base = {k: v for k, v in os.environ.items() if not k.startswith("LIVEKIT_")}

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, "run", str(tree), "--state-dir", str(state)],
            cwd=ROOT,
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )

    missing = run(LIVEKIT_URL="ws://127.0.0.1:7880", LIVEKIT_API_KEY="devkey")
    assert missing.returncode == 2
    assert "tree.toml: root.require_env: LIVEKIT_API_SECRET is not set (or empty)" in missing.stderr
    wrong = run(LIVEKIT_URL="127.0.0.1:7880", LIVEKIT_API_KEY="devkey", LIVEKIT_API_SECRET="secret")
    assert wrong.returncode == 2 and "LIVEKIT_URL has no scheme" in wrong.stderr
    spaced = run(LIVEKIT_URL="ws://h:7880", LIVEKIT_API_KEY="dev key", LIVEKIT_API_SECRET="secret")
    assert spaced.returncode == 2 and "LIVEKIT_API_KEY contains whitespace" in spaced.stderr
    assert not state.exists()  # refused before anything started
