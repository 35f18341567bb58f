"""Security of the operator plane: secrets stay out of every output, hostile paths go nowhere,
and each child's environment is explicit. (Other uids are refused: test_control.)"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from otp_agents.ops import control_client as control

from .helpers import ROOT, WAIT, poll, run_cli

CLI = [sys.executable, "-m", "otp_agents.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_secrets_appear_in_no_log_event_status_metric_dump_or_check(tmp_path: Path, backend: str) -> None:
    secret, key, token = secrets.token_hex(16), secrets.token_hex(8), secrets.token_hex(12)
    tree = tmp_path / "tree.toml"
    tree.write_text(
        f"""
[[children]]
id = "w"
module = "workers.chaos:tell_secrets"
cwd = "{ROOT}"
env = {{ SERVICE_TOKEN = "{token}" }}
[[children]]
id = "c"
command = ["sleep", "300"]
env = {{ DB_PASSWORD = "{token}x" }}
"""
    )
    state, events = tmp_path / "state", tmp_path / "events.jsonl"
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "LIVEKIT_API_SECRET": secret, "LIVEKIT_API_KEY": key}
    log = tmp_path / "supervisor.log"
    metrics = f"127.0.0.1:{port}"
    proc = run_cli(
        tree,
        state,
        events,
        backend,
        log,
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "--metrics",
        metrics,
        env=env,
    )
    try:
        poll(lambda: events.exists() and "worker_report" in events.read_text(), "the worker's report")
        outputs = {
            "status": subprocess.run(
                [*CLI, "status", "--json", "--state-dir", str(state)],
                capture_output=True,
                text=True,
                timeout=WAIT,
            ).stdout,
            "dump": subprocess.run(
                [*CLI, "dump", "root/w", "--json", "--state-dir", str(state)],
                capture_output=True,
                text=True,
                timeout=WAIT,
            ).stdout,
            "metrics": urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT)
            .read()
            .decode(),
            "check": subprocess.run(
                [*CLI, "check", str(tree)], capture_output=True, text=True, timeout=WAIT, env=env, cwd=ROOT
            ).stdout,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=WAIT)
    assert proc.returncode == 0
    outputs["events"] = events.read_text()
    outputs["log"] = log.read_text()
    outputs["dumps"] = "".join(p.read_text() for p in (state / "dumps").glob("*.txt"))
    assert json.loads(outputs["dump"])["ok"] is True and outputs["dumps"]
    for name, text in outputs.items():
        for value in (secret, key, token):
            assert value not in text, f"a secret in the {name} output"
    # The worker did try to leak it: what it said arrives redacted, not dropped.
    assert "connecting with api secret <redacted>" in outputs["events"]
    assert 'provider="<redacted>"' in outputs["metrics"]
    # The environment each child gets is explicit, by name only.
    assert "env=+(SERVICE_TOKEN)" in outputs["check"] and "env=+(DB_PASSWORD)" in outputs["check"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_hostile_paths_in_control_requests_go_nowhere(tmp_path: Path, backend: str) -> None:
    tree = tmp_path / "tree.toml"
    tree.write_text(f'[[children]]\nid = "w"\nmodule = "workers.chaos:steady"\ncwd = "{ROOT}"\n')
    evil = tmp_path / "evil.toml"
    evil.write_text('id = "root"\n[[children]]\nid = "pwned"\ncommand = ["sleep", "300"]\n')
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [*CLI, "run", str(tree), "--backend", backend, "--state-dir", str(state)],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    sock = control.socket_path(state)

    def ask(op: str, path: str = "", args: list[str] | None = None) -> control.Reply:
        return control.request(sock, control.Request(op=op, path=path, args=args or []), timeout=WAIT)[-1]

    try:
        poll(lambda: sock.exists(), "the control socket")
        poll(lambda: ask("status").ok, "status")
        before = {p for p in tmp_path.rglob("*")}
        for path in (
            "../../etc/passwd",
            "root/../../../tmp/x",
            "/etc/passwd",
            "root/w/../..",
            "root/\x00w",
            "",
        ):
            for op in ("dump", "restart", "terminate", "start"):
                reply = ask(op, path)
                assert not reply.ok and reply.code in ("not_found", "refused"), (op, path, reply)
            reply = ask("start-child", path, ["x"])
            assert not reply.ok, (path, reply)
        # reload reads the file the tree was started from, whatever the request names.
        reply = ask("reload", str(evil), [str(evil)])
        assert reply.ok and reply.message == "no changes", reply
        assert "pwned" not in json.dumps(ask("status").data)
        # A dump request with a path that exists writes only under the state dir.
        assert ask("dump", "root/w").ok
        created = {p for p in tmp_path.rglob("*")} - before
        assert created and all(state in p.parents for p in created), created
        assert not Path("/tmp/x").exists() or Path("/tmp/x").stat().st_mtime < time.time() - 60
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=WAIT)
    assert proc.returncode == 0


def test_state_dir_lock_is_never_taken_through_a_symlink(tmp_path: Path) -> None:
    from otp_agents.runtime import statedir

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    state = tmp_path / "state"
    state.mkdir()
    (state / statedir.LOCK_NAME).symlink_to(victim)
    with pytest.raises(OSError):
        statedir.claim(state)
    assert victim.read_text() == "precious\n"
