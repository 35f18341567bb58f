"""The supervisor itself killed with SIGKILL in the middle of a restart storm, and started again
on the same state dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from .helpers import ROOT, WAIT, run_cli
from .test_cli import CLI, read_events, wait_events

BACKENDS = ["asyncio", "trio"]
# A child that starts a grandchild in a new session (outside its process group), then crashes
# after a moment: a storm of restarts. Without a cgroup per child each leaves an escaped
# grandchild behind; with one, the grandchild goes with it, and "holder" (the same script, but
# it stays) keeps one alive for the supervisor's SIGKILL to find.
ESCAPER = (
    "import os, subprocess, sys, time\n"
    "subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
    "time.sleep(float(sys.argv[1]))\n"
    "sys.exit(3)\n"
)


def storm_tree(tmp: Path) -> Path:
    script = tmp / "escaper.py"
    script.write_text(ESCAPER)
    text = f"""
id = "root"
intensity = 100000
period = 1
[[children]]
id = "zygote"
image = "steady"
preload = ["workers.chaos"]
cwd = "{ROOT}"
[[children]]
id = "crashy"
module = "workers.chaos:crash_after"
args = ["0.05"]
cwd = "{ROOT}"
[[children]]
id = "forked"
module = "workers.chaos:steady"
zygote = "steady"
cwd = "{ROOT}"
[[children]]
id = "escaper"
command = ["{sys.executable}", "{script}", "0.1"]
[[children]]
id = "holder"
command = ["{sys.executable}", "{script}", "300"]

[[children]]
id = "quiet"
command = ["sleep", "300"]
"""
    tree = tmp / "tree.toml"
    tree.write_text(text)
    return tree


def marked(marker: str) -> dict[int, str]:
    """Every live process whose environment carries ``marker``: the whole tree, grandchildren
    included, however they were started (they all inherit the supervisor's environment)."""
    found: dict[int, str] = {}
    needle = f"OTP_TEST_RUN={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in env.split(b"\0") and state != b"Z":
            found[int(entry)] = cmd
    return found


def start(tree: Path, state: Path, events: Path, backend: str, marker: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OTP_TEST_RUN": marker}
    return run_cli(tree, state, events, backend, events.with_suffix(".log"), env=env)


def status(state: Path) -> dict[str, object]:
    out = subprocess.run(
        [*CLI, "status", "--json", "--state-dir", str(state)], capture_output=True, timeout=WAIT, check=True
    )
    data: dict[str, object] = json.loads(out.stdout)["data"]
    return data


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_mid_storm_leaves_nothing_and_the_state_dir_restarts_cleanly(
    tmp_path: Path, backend: str
) -> None:
    tree, state = storm_tree(tmp_path), tmp_path / "state"
    marker = uuid.uuid4().hex
    first = start(tree, state, tmp_path / "events1.jsonl", backend, marker)
    try:
        # A storm: both crashing children restarted several times, grandchildren escaped.
        wait_events(
            tmp_path / "events1.jsonl",
            lambda ev: sum(e["kind"] == "child_exited" for e in ev) >= 6,
            first,
        )
        containment = str(status(state)["containment"])
        # A second supervisor on the same state dir is refused, naming the holder.
        second = subprocess.run(
            [*CLI, "run", str(tree), "--state-dir", str(state)],
            capture_output=True,
            timeout=WAIT,
            check=False,
        )
        assert second.returncode == 3
        assert f"in use by the supervisor with pid {first.pid}" in second.stderr.decode()
        before = marked(marker)
        escaped = [p for p, cmd in before.items() if cmd.startswith("sleep 300") and os.getsid(p) == p]
        assert escaped, before  # grandchildren in sessions of their own exist
        (state / "dumps" / f".signal.root-x.{first.pid}.99").write_text("")  # as a dead run leaves them
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=WAIT)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    deadline = time.monotonic() + WAIT
    while marked(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = marked(marker)
    if not containment.startswith("process groups"):  # a cgroup: everything goes
        assert left == {}
    else:  # without a cgroup only what stayed in its process group is sure to go
        assert all(cmd.startswith("sleep 300") for cmd in left.values()), left
        for pid in left:
            os.kill(pid, signal.SIGKILL)

    # Started again on the same state dir: the stale socket and signal file are dealt with.
    assert (state / "control.sock").exists()
    again = start(tree, state, tmp_path / "events2.jsonl", backend, marker)
    try:
        wait_events(
            tmp_path / "events2.jsonl",
            lambda ev: len({e["path"] for e in ev if e["kind"] == "child_started"}) >= 5,
            again,
        )
        assert status(state)["pid"] == again.pid
        assert not list((state / "dumps").glob(f".signal.*.{first.pid}.*"))
        assert (state / "supervisor.lock").read_text().strip() == str(again.pid)
        assert os.stat(state).st_mode & 0o007 == 0
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(timeout=WAIT)
    assert again.returncode == 0, (tmp_path / "events2.log").read_text()
    assert read_events(tmp_path / "events2.jsonl")
    deadline = time.monotonic() + WAIT
    while marked(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marked(marker) == {}
