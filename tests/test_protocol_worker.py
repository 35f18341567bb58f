"""Protocol workers: handshake, clean shutdown, and faults that cost one child, never the supervisor."""

from __future__ import annotations

import pytest

from otp_agents.errors import StartError
from otp_agents.events import Kind

from .helpers import ROOT, alive, cmd, settle, tree_of, worker

pytestmark = pytest.mark.anyio


async def test_worker_started_on_ready_and_stops_cleanly() -> None:
    config = {"children": [worker("w", "workers.chaos:steady")]}
    async with tree_of(config) as (tree, rec):
        pid = tree.pid("root/w")
        assert pid is not None and alive(pid)
        assert rec.compact(kinds=(Kind.CHILD_STARTED,)) == ["child_started root/w"]
    term = rec.of(Kind.CHILD_TERMINATED, "root/w")[0]
    # it left through its own orderly exit path, within the deadline: code 0, no SIGKILL
    assert term.code == 0 and not term.killed
    assert not alive(pid)


async def test_worker_that_ignores_shutdown_is_killed_after_its_timeout() -> None:
    # The worker blocks its event loop, so its own deadline cannot fire either: SIGKILL.
    config = {"children": [worker("w", "workers.chaos:ignore_shutdown", shutdown=0.5)]}
    async with tree_of(config) as (tree, rec):
        pid = tree.pid("root/w")
    term = rec.of(Kind.CHILD_TERMINATED, "root/w")[0]
    assert term.killed and term.signal == "SIGKILL"
    assert pid is not None and not alive(pid)


async def test_exit_before_ready_is_a_start_failure() -> None:
    config = {"children": [cmd("a"), worker("w", "workers.chaos:exit_before_ready")]}
    cause = r"root/w: exited before it was ready \(exit code 1\): crash: RuntimeError: setup failed$"
    with pytest.raises(StartError, match=cause):
        async with tree_of(config):
            pass


async def test_not_ready_within_start_timeout_is_a_start_failure() -> None:
    config = {"children": [worker("w", "workers.chaos:slow_start", args=["30"], start_timeout=0.5)]}
    with pytest.raises(StartError, match=r"not ready within start_timeout \(0.5s\)"):
        async with tree_of(config):
            pass


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        ("workers.chaos:garbage", "malformed"),
        ("workers.chaos:oversized", "oversized"),
        ("workers.chaos:unknown_tag", "malformed"),
        ("workers.chaos:truncated", "truncated"),
        ("workers.chaos:bad_utf8", "malformed"),
        ("workers.chaos:deep_nesting", "malformed"),
    ],
)
async def test_bad_frames_cost_one_child_not_the_supervisor(target: str, kind: str) -> None:
    config = {
        "intensity": 5,
        "children": [cmd("bystander"), worker("w", target, restart="temporary")],
    }
    async with tree_of(config) as (tree, rec):
        bystander = tree.pid("root/bystander")
        exited = await rec.wait_kind(Kind.CHILD_EXITED, "root/w")
        await settle(tree)
        if kind == "truncated":
            # The worker exited mid-frame: its own crash (exit code 4) is what ends it.
            assert exited.code == 4
        else:
            err = rec.of(Kind.PROTOCOL_ERROR, "root/w")[0]
            assert err.reason == kind
            assert exited.signal == "SIGKILL" and exited.reason and "protocol error" in exited.reason
        if kind == "unknown_tag" or target.endswith("unknown_tag"):
            assert "teleport" in (rec.of(Kind.PROTOCOL_ERROR, "root/w")[0].detail or "")
        # the supervisor and the sibling carry on
        assert tree.pid("root/bystander") == bystander
        assert not tree.root.finished.is_set()


async def test_crash_after_ready_is_restarted() -> None:
    config = {"intensity": 10, "children": [worker("w", "workers.chaos:crash_after", args=["0.2"])]}
    async with tree_of(config) as (_tree, rec):
        first = rec.of(Kind.CHILD_STARTED, "root/w")[0].pid
        exited = await rec.wait_kind(Kind.CHILD_EXITED, "root/w")
        assert exited.code == 1 and exited.reason == "crash"
        assert exited.detail == "crash: RuntimeError: crash"  # its last words, from its Bye
        restarted = await rec.wait_for(lambda e: e.kind is Kind.CHILD_STARTED and e.pid != first)
        assert restarted.path == "root/w"


async def test_script_worker_with_args() -> None:
    config = {
        "children": [
            {
                "id": "s",
                "script": "workers/script_worker.py",
                "args": ["x", "y"],
                "cwd": str(ROOT),
                "shutdown": 3,
            }
        ]
    }
    async with tree_of(config) as (_tree, rec):
        logged = await rec.wait_kind(Kind.WORKER_LOG, "root/s")
        assert logged.detail == "args=x,y"


@pytest.mark.parametrize(("clear", "expected_code"), [(False, 0), (True, 9)])
async def test_environment_is_explicit(
    clear: bool, expected_code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTP_AGENTS_TEST_INHERITED", "yes")
    check = '[ "$FOO" = bar ] && [ "$OTP_AGENTS_TEST_INHERITED" = yes ] && exit 0 || exit 9'
    config = {
        "children": [
            {
                "id": "e",
                "command": ["sh", "-c", check],
                "env": {"FOO": "bar"},
                "clear_env": clear,
                "restart": "temporary",
            }
        ]
    }
    async with tree_of(config) as (_tree, rec):
        exited = await rec.wait_kind(Kind.CHILD_EXITED, "root/e")
        assert exited.code == expected_code


async def test_log_before_ready_is_allowed() -> None:
    async with tree_of({"children": [worker("w", "workers.chaos:chatty_start")]}) as (tree, rec):
        assert tree.pid("root/w") is not None
        assert [e.detail for e in rec.of(Kind.WORKER_LOG, "root/w")] == ["loading"]
