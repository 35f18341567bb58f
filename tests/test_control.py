"""The operator plane: the real CLI against a running tree, over the control socket."""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import FAULTY, ROOT, WAIT, alive, poll

CLI = [sys.executable, "-m", "otp_agents.cli"]

TREE = f"""
intensity = 50
period = 10

[[children]]
id = "w"
module = "workers.chaos:steady"

[[children]]
id = "group"
strategy = "one_for_all"
intensity = 100
period = 10
  [[children.children]]
  id = "a"
  command = ["{FAULTY[0]}"]
  [[children.children]]
  id = "b"
  command = ["{FAULTY[0]}"]
  [[children.children]]
  id = "c"
  command = ["{FAULTY[0]}"]

[[children]]
id = "pool"
strategy = "simple_one_for_one"
  [[children.children]]
  id = "leaf"
  command = ["{FAULTY[0]}"]
  restart = "temporary"
"""


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args, "--state-dir", str(state)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


def status(state: Path) -> dict[str, Any]:
    out = cli(state, "status", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)["data"]
    assert isinstance(data, dict)
    return data


def flat(node: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for c in node["children"]:
        rows[c["path"]] = c
        if "children" in c:
            rows.update(flat(c))
    return rows


@pytest.fixture(params=["asyncio", "trio"])
def running_tree(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    tree = tmp_path / "tree.toml"
    tree.write_text(TREE)
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [*CLI, "run", str(tree), "--backend", request.param, "--state-dir", str(state)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    try:
        poll(lambda: (state / "control.sock").exists() and cli(state, "status").returncode == 0)
        yield state
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=WAIT)


def test_status_shows_the_tree(running_tree: Path) -> None:
    rows = flat(status(running_tree))
    assert list(rows) == ["root/w", "root/group", "root/group/a", "root/group/b", "root/group/c", "root/pool"]
    assert rows["root/w"]["status"] == "running" and rows["root/w"]["kind"] == "worker"
    assert rows["root/w"]["memory_mb"] > 0 and rows["root/group/a"]["pid"] > 0
    text = cli(running_tree, "status")
    assert text.returncode == 0 and "root/group/b" in text.stdout and "running" in text.stdout


def _children_of(pid: int) -> str:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().strip()


def _replaced(state: Path, path: str, old: int) -> bool:
    return flat(status(state))[path]["pid"] not in (None, old)


def test_terminate_survives_a_crash_storm_of_its_siblings_until_started(running_tree: Path) -> None:
    out = cli(running_tree, "terminate", "root/group/b")
    assert out.returncode == 0, out.stderr
    assert flat(status(running_tree))["root/group/b"]["status"] == "held"
    for _ in range(5):  # one_for_all: each crash restarts the whole group, except the held child
        rows = flat(status(running_tree))
        pid = rows["root/group/a"]["pid"]
        poll(functools.partial(_children_of, pid))
        os.kill(pid, signal.SIGKILL)
        poll(functools.partial(_replaced, running_tree, "root/group/a", pid))
    rows = flat(status(running_tree))
    assert rows["root/group/b"]["status"] == "held" and rows["root/group/b"]["pid"] is None
    assert cli(running_tree, "start", "root/group/b").returncode == 0
    assert flat(status(running_tree))["root/group/b"]["status"] == "running"


def test_restart_start_child_dump_and_errors(running_tree: Path) -> None:
    before = flat(status(running_tree))
    assert cli(running_tree, "restart", "root/w").returncode == 0
    after = flat(status(running_tree))
    assert after["root/w"]["pid"] != before["root/w"]["pid"]
    assert after["root/group/a"]["pid"] == before["root/group/a"]["pid"]  # siblings untouched
    assert after["root/w"]["restarts"] == before["root/w"]["restarts"]  # not a crash restart

    started = cli(running_tree, "start-child", "root/pool", "--json")
    assert started.returncode == 0 and json.loads(started.stdout)["data"]["path"] == "root/pool/leaf-1"
    assert flat(status(running_tree))["root/pool/leaf-1"]["status"] == "running"

    dump = cli(running_tree, "dump", "root/w")
    assert dump.returncode == 0 and "route: channel" in dump.stdout and "steady" in dump.stdout
    assert alive(flat(status(running_tree))["root/w"]["pid"])  # a dump does not kill

    missing = cli(running_tree, "restart", "root/nope")
    assert missing.returncode == 4 and missing.stderr.strip() == "otp-agents: no such child: root/nope"
    refused = cli(running_tree, "start", "root/w")
    assert refused.returncode == 5 and "is running" in refused.stderr
    refused = cli(running_tree, "start-child", "root/group")
    assert refused.returncode == 5 and "not a simple_one_for_one" in refused.stderr


def test_stop_then_not_running(running_tree: Path) -> None:
    pids = [r["pid"] for r in flat(status(running_tree)).values() if r.get("pid")]
    out = cli(running_tree, "stop")
    assert out.returncode == 0 and "stopping" in out.stdout
    poll(lambda: not (running_tree / "control.sock").exists())
    gone = cli(running_tree, "status")
    assert gone.returncode == 6 and "no supervisor is running" in gone.stderr
    assert not any(alive(p) for p in pids)


def test_events_follow(running_tree: Path) -> None:
    follower = subprocess.Popen(
        [*CLI, "events", "--kind", "child_started", "--path", "root/group", "--state-dir", str(running_tree)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        assert cli(running_tree, "restart", "root/group/c").returncode == 0
        assert follower.stdout is not None
        line = follower.stdout.readline()
        event = json.loads(line)
        assert (event["kind"], event["path"]) == ("child_started", "root/group/c")
    finally:
        follower.terminate()
        follower.communicate(timeout=WAIT)


PERL_CLIENT = r"""
use strict; use Socket; use IO::Handle; $SIG{PIPE} = "IGNORE";
socket(my $s, PF_UNIX, SOCK_STREAM, 0) or die "socket: $!";
connect($s, sockaddr_un($ARGV[0])) or die "connect: $!\n";
$s->autoflush(1);
print $s pack("H*", $ARGV[1]);
my $buf = ""; sysread($s, $buf, 65536);
print unpack("H*", $buf);
"""


@pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("useradd") is None or shutil.which("perl") is None,
    reason="needs root, useradd and perl",
)
def test_other_uid_is_refused(running_tree: Path) -> None:
    from otp_agents.ops import control_client as control
    from otp_agents.wire import framing as wire

    name = "otpagentstest"
    subprocess.run(["useradd", "--no-create-home", name], capture_output=True, check=False)
    try:
        uid = pwd.getpwnam(name).pw_uid
        sock = running_tree / "control.sock"
        assert (sock.stat().st_mode & 0o777) == 0o600
        request = wire.encode(control.Request(op="status")).hex()

        def as_other() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["perl", "-e", PERL_CLIENT, str(sock), request],
                user=uid,
                capture_output=True,
                text=True,
                timeout=WAIT,
                check=False,
            )

        # As created, the socket is not reachable by another uid at all.
        first = as_other()
        assert first.returncode != 0 and "connect: Permission denied" in first.stderr
        # Even with every permission opened up, the peer-credential check refuses that uid.
        for part in [sock, *sock.parents]:
            if str(part) in ("/", "/tmp"):
                break
            os.chmod(part, 0o777 if part == sock else 0o711)
        second = as_other()
        assert second.returncode == 0, second.stderr
        decoder = wire.FrameDecoder(control.MAX_CONTROL_FRAME, decoder=control.DECODER)
        (reply,) = decoder.feed(bytes.fromhex(second.stdout))
        assert isinstance(reply, control.Reply)
        assert (reply.ok, reply.code, reply.data) == (False, "denied", None)
        assert f"uid {uid}" in reply.message
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)


def test_reload_applies_only_the_difference(running_tree: Path) -> None:
    tree_file = running_tree.parent / "tree.toml"
    before = flat(status(running_tree))
    # invalid: refused, nothing changes
    tree_file.write_text(TREE.replace('id = "c"', 'id = "c"\n  shutdown = -1'))
    refused = cli(running_tree, "reload")
    assert refused.returncode == 5
    assert (
        "reload refused, nothing changed" in refused.stderr
        and "children[1].children[2].shutdown" in refused.stderr
    )
    assert flat(status(running_tree)).keys() == before.keys()
    # remove group/c, change w, add group/d and root/extra; a and b unchanged
    new = (
        TREE.replace(f'  [[children.children]]\n  id = "c"\n  command = ["{FAULTY[0]}"]\n', "")
        .replace('module = "workers.chaos:steady"', 'module = "workers.chaos:steady"\nenv = { MODE = "x" }')
        .replace(
            '[[children]]\nid = "pool"',
            f'  [[children.children]]\n  id = "d"\n  command = ["{FAULTY[0]}"]\n\n'
            f'[[children]]\nid = "extra"\ncommand = ["{FAULTY[0]}"]\n\n[[children]]\nid = "pool"',
        )
    )
    tree_file.write_text(new)
    out = cli(running_tree, "reload")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        '~ root/w: env {} → {"MODE":"x"} (restarts)',
        "- root/group/c (stops)",
        "+ root/group/d (starts)",
        "+ root/extra (starts)",
    ]
    after = flat(status(running_tree))
    assert list(after) == [
        "root/w",
        "root/group",
        "root/group/a",
        "root/group/b",
        "root/group/d",
        "root/extra",
        "root/pool",
    ]
    for same in ("root/group/a", "root/group/b"):
        assert after[same]["pid"] == before[same]["pid"]
    assert after["root/w"]["pid"] != before["root/w"]["pid"]
    assert not alive(before["root/group/c"]["pid"])
    assert after["root/extra"]["status"] == after["root/group/d"]["status"] == "running"
    assert cli(running_tree, "reload").stdout.strip() == "no changes"


def test_a_reload_of_supervision_settings_keeps_every_running_child_and_a_dry_run_says_so_first(
    running_tree: Path,
) -> None:
    """max_children lowered under running children, a supervisor's intensity and a child's
    health limit changed: everything is applied in place (same pids), and ``--dry-run`` printed
    the same diff before, changing nothing."""
    tree_file = running_tree.parent / "tree.toml"
    for _ in range(2):
        assert cli(running_tree, "start-child", "root/pool").returncode == 0
    before = {path: row["pid"] for path, row in flat(status(running_tree)).items()}
    assert len([p for p in before if p.startswith("root/pool/")]) == 2
    tree_file.write_text(
        TREE.replace('strategy = "simple_one_for_one"', 'strategy = "simple_one_for_one"\nmax_children = 1')
        .replace("intensity = 100", "intensity = 7")
        .replace(
            'module = "workers.chaos:steady"',
            'module = "workers.chaos:steady"\nhealth = { memory_limit_mb = 900 }',
        )
    )
    expected = [
        "~ root/w: health.memory_limit_mb None → 900.0 (in place; same process)",
        "~ root/group: intensity 100 → 7 (in place; running children kept)",
        "~ root/pool: max_children None → 1 (in place; running children kept)",
    ]
    dry = cli(running_tree, "reload", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == ["dry run, nothing changed:", *expected]
    assert cli(running_tree, "reload", "--dry-run").stdout == dry.stdout  # nothing was applied
    out = cli(running_tree, "reload")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == expected
    after = {path: row["pid"] for path, row in flat(status(running_tree)).items()}
    assert after == before  # every running child kept, same pid
    refused = cli(running_tree, "start-child", "root/pool")  # the lower cap limits new children
    assert refused.returncode != 0 and "max_children=1" in refused.stderr
    assert cli(running_tree, "reload").stdout.strip() == "no changes"


def test_authorisation_rules() -> None:
    from otp_agents.wire.peer import allowed

    assert allowed(1000, 1000, set(), own_uid=1000, group=None)
    assert allowed(0, 0, set(), own_uid=1000, group=None)  # root
    assert not allowed(1001, 1001, {50}, own_uid=1000, group=None)
    assert allowed(1001, 50, set(), own_uid=1000, group=50)  # primary group
    assert allowed(1001, 1001, {7, 50}, own_uid=1000, group=50)  # supplementary group
    assert not allowed(1001, 1001, {7}, own_uid=1000, group=50)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_watch_tree_reloads_a_configmap_style_swap(tmp_path: Path, backend: str) -> None:
    """Kubernetes updates a mounted ConfigMap by swapping a ..data symlink: the file's path
    stays, its content changes. --watch-tree applies the difference; a broken file is refused."""
    data1, data2, data3, data4 = (tmp_path / f"v{i}" for i in range(1, 5))
    for d in (data1, data2, data3, data4):
        d.mkdir()
    (data1 / "tree.toml").write_text(f'[[children]]\nid = "a"\ncommand = ["{FAULTY[0]}"]\n')
    one = f'[[children]]\nid = "a"\ncommand = ["{FAULTY[0]}"]\n'
    (data2 / "tree.toml").write_text(one + one.replace('"a"', '"b"'))
    (data3 / "tree.toml").write_text('[[children]]\nid = "a"\ncommand = "not a list"\n')
    # valid, but its new child cannot start: the reload fails, the running tree must not
    (data4 / "tree.toml").write_text(
        one + one.replace('"a"', '"b"') + '[[children]]\nid = "c"\ncommand = ["/nonexistent/program"]\n'
    )
    link = tmp_path / "..data"
    link.symlink_to(data1)
    tree = tmp_path / "tree.toml"
    tree.symlink_to(link / "tree.toml")
    state = tmp_path / "state"
    with open(tmp_path / "log", "wb") as err:
        proc = subprocess.Popen(
            [*CLI, "run", str(tree), "--backend", backend, "--state-dir", str(state), "--watch-tree", "0.5"],
            cwd=ROOT,
            stderr=err,
        )
    try:
        poll(lambda: (state / "control.sock").exists() and cli(state, "status").returncode == 0)
        a = flat(status(state))["root/a"]["pid"]

        def swap(to: Path) -> None:
            tmp = tmp_path / "..data_tmp"
            tmp.symlink_to(to)
            os.replace(tmp, link)  # atomic, as the kubelet does

        swap(data2)
        poll(lambda: "root/b" in flat(status(state)))
        assert flat(status(state))["root/a"]["pid"] == a  # unchanged child untouched
        swap(data3)
        poll(lambda: "reload refused, nothing changed" in (tmp_path / "log").read_text())
        assert set(flat(status(state))) == {"root/a", "root/b"}
        swap(data4)
        poll(lambda: "cannot execute '/nonexistent/program'" in (tmp_path / "log").read_text())
        assert flat(status(state))["root/a"]["pid"] == a  # still running, still answering
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=WAIT)
    assert proc.returncode == 0


def test_watch_tree_applies_a_change_made_while_the_tree_was_starting(tmp_path: Path) -> None:
    """The baseline is the file as loaded, not as found once the tree is up: an edit made
    during a slow start is applied at the first check, not lost until the next edit."""
    tree = tmp_path / "tree.toml"
    slow = f'[[children]]\nid = "slow"\nmodule = "workers.chaos:slow_start"\nargs = ["2"]\ncwd = "{ROOT}"\n'
    tree.write_text(slow)
    state = tmp_path / "state"
    with open(tmp_path / "log", "wb") as err:
        proc = subprocess.Popen(
            [*CLI, "run", str(tree), "--state-dir", str(state), "--watch-tree", "0.5"], cwd=ROOT, stderr=err
        )
    try:
        poll(lambda: "root/slow: child started" not in (tmp_path / "log").read_text() and state.exists())
        tree.write_text(slow + f'[[children]]\nid = "late"\ncommand = ["{FAULTY[0]}"]\n')  # while starting
        poll(lambda: (state / "control.sock").exists() and cli(state, "status").returncode == 0)
        poll(lambda: "root/late" in flat(status(state)), "the edit made during the start")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=WAIT)
    assert proc.returncode == 0
    log = (tmp_path / "log").read_text()
    assert log.index("root/slow: child started") < log.index("root/late: child started")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_every_event_an_operator_caused_names_who_asked(tmp_path: Path, backend: str) -> None:
    """restart, terminate, start, start-child, a refused and an applied reload, and stop, each
    through the real CLI: their events carry the operator (uid, pid, command line)."""
    tree = tmp_path / "tree.toml"
    tree.write_text(TREE)
    state, events = tmp_path / "state", tmp_path / "events.jsonl"
    proc = subprocess.Popen(
        [*CLI, "run", str(tree), "--backend", backend, "--state-dir", str(state), "--events", str(events)],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    try:
        poll(lambda: (state / "control.sock").exists() and cli(state, "status").returncode == 0)
        assert cli(state, "restart", "root/w").returncode == 0
        assert cli(state, "terminate", "root/group/a").returncode == 0
        assert cli(state, "start", "root/group/a").returncode == 0
        assert cli(state, "start-child", "root/pool").returncode == 0
        tree.write_text(TREE.replace("intensity = 50", "intensity = -1"))
        assert cli(state, "reload").returncode == 5
        tree.write_text(TREE.replace("intensity = 50", "intensity = 40"))
        assert cli(state, "reload").returncode == 0
        assert cli(state, "stop").returncode == 0
        proc.wait(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    seen: list[dict[str, Any]] = [json.loads(line) for line in events.read_text().splitlines()]

    def by(verb: str, kind: str, path: str) -> dict[str, Any]:
        found = [e for e in seen if e["kind"] == kind and e["path"] == path and "operator" in e]
        assert found, f"{kind} {path}: no operator"
        who = found[0]["operator"]
        assert who["uid"] == os.getuid() and who["pid"] > 0 and f"otp_agents.cli {verb}" in who["command"]
        return found[0]

    by("restart", "restarting", "root/w")
    by("restart", "child_terminated", "root/w")
    by("restart", "child_started", "root/w")
    by("terminate", "child_terminated", "root/group/a")
    by("start", "child_started", "root/group/a")
    by("start-child", "child_started", "root/pool/leaf-1")
    refused = by("reload", "reload", "root")
    assert refused["reason"] == "refused" and "intensity" in refused["detail"]
    applied = [e for e in seen if e["kind"] == "reload" and e["reason"] == "applied"]
    assert applied[0]["detail"] == "~ root: intensity 50 → 40 (in place; running children kept)"
    assert "operator" in applied[0]
    by("stop", "child_terminated", "root/group/b")
    by("stop", "supervisor_stopped", "root")
    # what no operator caused carries none
    assert not [e for e in seen if e["kind"] == "supervisor_started" and "operator" in e]
