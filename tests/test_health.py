"""Health monitors with real pathological workers: what happened, and in which order."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest

from otp_agents.events import Event, Kind
from otp_agents.health import dump

from .helpers import ROOT, Recorder, settle, tree_of, worker

pytestmark = pytest.mark.anyio

FAST_PINGS = {"ping_interval": 0.1, "ping_timeout": 1.0, "dump_timeout": 0.5}
HEALTH_KINDS = (
    Kind.HANG,
    Kind.MEMORY_WARN,
    Kind.MEMORY_SOFT,
    Kind.MEMORY_LIMIT,
    Kind.LIFETIME,
    Kind.DUMP_TAKEN,
    Kind.HEALTH_KILL,
    Kind.CHILD_EXITED,
    Kind.RECYCLED,
    Kind.RESTARTING,
    Kind.CHILD_STARTED,
    Kind.CHILD_TERMINATED,
)


def sequence(rec: Recorder, path: str) -> list[str]:
    return [e.kind.value for e in rec.events if e.path == path and e.kind in HEALTH_KINDS]


async def restarted(rec: Recorder, path: str) -> Event:
    first = rec.of(Kind.CHILD_STARTED, path)[0].pid
    return await rec.wait_for(lambda e: e.kind is Kind.CHILD_STARTED and e.path == path and e.pid != first)


def dump_text(rec: Recorder, path: str) -> tuple[Event, str]:
    taken = rec.of(Kind.DUMP_TAKEN, path)[0]
    assert taken.file is not None
    return taken, Path(taken.file).read_text()


def hang_config(target: str, **extra: Any) -> dict[str, Any]:
    return {"intensity": 5, "children": [worker("w", target, health=FAST_PINGS, **extra)]}


async def test_blocked_event_loop_is_a_hang_with_the_blocking_function_in_the_dump() -> None:
    async with tree_of(hang_config("workers.chaos:blocks_loop")) as (_tree, rec):
        await rec.wait_kind(Kind.HANG, "root/w")
        await restarted(rec, "root/w")
    assert sequence(rec, "root/w")[:7] == [
        "child_started",
        "hang",
        "dump_taken",
        "health_kill",
        "child_exited",
        "restarting",
        "child_started",
    ]
    hang = rec.of(Kind.HANG, "root/w")[0]
    assert hang.value is not None and hang.value >= 1.0 and hang.threshold == 1.0
    exited = rec.of(Kind.CHILD_EXITED, "root/w")[0]
    assert (exited.reason, exited.signal) == ("hang", "SIGKILL")
    taken, text = dump_text(rec, "root/w")
    # the loop could not answer the channel request: faulthandler's signal route did
    assert taken.detail == "signal" and "route: signal" in text
    assert "busy_in_blocking_call" in text and "blocks_loop" in text


async def test_c_call_holding_the_gil_still_gets_a_dump_by_signal() -> None:
    async with tree_of(hang_config("workers.chaos:gil_hog")) as (_tree, rec):
        await rec.wait_kind(Kind.HANG, "root/w")
        await restarted(rec, "root/w")
    taken, text = dump_text(rec, "root/w")
    assert taken.detail == "signal"
    assert "crunch_numbers" in text
    assert rec.of(Kind.CHILD_EXITED, "root/w")[0].reason == "hang"


async def test_stopped_worker_is_a_hang_and_sigkill_still_works() -> None:
    async with tree_of(hang_config("workers.chaos:steady")) as (tree, rec):
        pid = tree.pid("root/w")
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        await rec.wait_kind(Kind.HANG, "root/w")
        await restarted(rec, "root/w")
    assert "state T" in (rec.of(Kind.HANG, "root/w")[0].detail or "")
    taken, text = dump_text(rec, "root/w")
    assert "process state: T (stopped)" in text
    # a stopped process runs no handler: neither the channel nor the signal route can answer;
    # py-spy reads its memory from outside when it is installed
    if dump._PYSPY is not None:
        assert taken.detail == "py-spy" and "Thread" in text
    else:
        assert taken.detail == "none"
    assert rec.of(Kind.CHILD_EXITED, "root/w")[0].signal == "SIGKILL"


async def test_healthy_worker_answers_from_its_loop_with_asyncio_tasks_in_the_channel_dump() -> None:
    from otp_agents.health import heartbeat as health

    async with tree_of(hang_config("workers.chaos:steady")) as (tree, rec):
        slot = tree.slot("root/w")
        proc = slot.instance
        assert proc is not None and not isinstance(proc, type(tree.root))
        dump = await tree.host.dumper.take(proc, "operator")  # type: ignore[arg-type]
        assert dump is not None and dump.route == "channel" and dump.complete
        text = dump.file.read_text()
        assert "route: channel" in text and "Task " in text and "steady" in text
        assert health.SLOW_PING_EVERY > 0
    assert rec.of(Kind.HANG) == []


@pytest.mark.parametrize("delay", [0.15, 0.3])
async def test_rtt_shows_a_known_pong_delay(delay: float) -> None:
    config = {
        "children": [
            {
                "id": "raw",
                "script": "workers/raw_worker.py",
                "args": ["--pong-delay", str(delay)],
                "cwd": str(ROOT),
                "health": {"ping_interval": 0.5, "ping_timeout": 5, "high_ping_threshold": 0.1},
            }
        ]
    }
    async with tree_of(config) as (tree, rec):
        slow = await rec.wait_kind(Kind.SLOW_PING, "root/raw")
        proc = tree.slot("root/raw").instance
        assert proc is not None and getattr(proc, "rtt", 0) >= delay
    # the measured round trip contains the worker's deliberate delay (and little more)
    assert slow.value is not None and slow.value >= delay * 1000
    assert slow.value < delay * 1000 + 1000  # generous: a sanity bound, not a speed claim
    assert slow.threshold == 100


MEM = {"memory_interval": 0.1, "memory_grace": 2, "dump_timeout": 0.5}


async def test_leaking_worker_warn_then_drain_then_recycled() -> None:
    health = {**MEM, "memory_warn_mb": 60, "memory_soft_mb": 120, "memory_limit_mb": 400}
    config = {"intensity": 0, "children": [worker("w", "workers.chaos:leaker", args=["20"], health=health)]}
    async with tree_of(config) as (tree, rec):
        await rec.wait_kind(Kind.RECYCLED, "root/w")
        await restarted(rec, "root/w")
        # a recycle is not a crash: with intensity 0 a crash would have made the root give up
        assert not tree.root.finished.is_set()
    seq = sequence(rec, "root/w")
    assert seq[:6] == [
        "child_started",
        "memory_warn",
        "memory_soft",
        "child_exited",
        "recycled",
        "child_started",
    ]
    warn = rec.of(Kind.MEMORY_WARN, "root/w")[0]
    assert warn.value is not None and warn.value >= 60 and warn.threshold == 60
    exited = rec.of(Kind.CHILD_EXITED, "root/w")[0]
    assert exited.code == 0 and exited.reason == "normal"
    assert rec.of(Kind.INTENSITY_EXCEEDED) == []


async def test_worker_ignoring_the_drain_request_is_killed_at_the_limit() -> None:
    health = {**MEM, "memory_soft_mb": 80, "memory_limit_mb": 160}
    config = {
        "intensity": 5,
        "children": [worker("w", "workers.chaos:leaker", args=["20", "400", "ignore"], health=health)],
    }
    async with tree_of(config) as (_tree, rec):
        await rec.wait_kind(Kind.HEALTH_KILL, "root/w")
        await restarted(rec, "root/w")
    seq = sequence(rec, "root/w")
    assert seq[:7] == [
        "child_started",
        "memory_soft",
        "memory_limit",
        "dump_taken",
        "health_kill",
        "child_exited",
        "restarting",
    ]
    limit = rec.of(Kind.MEMORY_LIMIT, "root/w")[0]
    assert limit.value is not None and limit.value >= 160
    assert rec.of(Kind.CHILD_EXITED, "root/w")[0].reason == "memory"


@pytest.mark.parametrize("metric", ["pss", "uss", "rss"])
async def test_grandchild_leak_is_caught_through_the_process_tree(metric: str) -> None:
    health = {**MEM, "memory_metric": metric, "memory_limit_mb": 150}
    config = {"intensity": 5, "children": [worker("w", "workers.chaos:grandchild_leaker", health=health)]}
    async with tree_of(config) as (_tree, rec):
        await rec.wait_kind(Kind.CHILD_EXITED, "root/w")
    limit = rec.of(Kind.MEMORY_LIMIT, "root/w")[0]
    assert limit.value is not None and limit.value >= 150
    assert rec.of(Kind.CHILD_EXITED, "root/w")[0].reason == "memory"


async def test_max_lifetime_drains_stops_and_replaces_without_a_crash() -> None:
    health = {"max_lifetime": 0.5, "lifetime_jitter": 0.0}
    config = {
        "intensity": 0,
        "children": [worker("w", "workers.chaos:drains_slowly", args=["0.1"], health=health)],
    }
    async with tree_of(config) as (tree, rec):
        await rec.wait_kind(Kind.RECYCLED, "root/w")
        await restarted(rec, "root/w")
        assert not tree.root.finished.is_set()
    assert sequence(rec, "root/w")[:5] == [
        "child_started",
        "lifetime",
        "child_exited",
        "recycled",
        "child_started",
    ]
    assert rec.of(Kind.CHILD_EXITED, "root/w")[0].code == 0
    assert rec.of(Kind.LIFETIME, "root/w")[0].value == 0.5


async def test_lifetime_stops_a_worker_that_does_not_drain_within_its_shutdown() -> None:
    health = {"max_lifetime": 0.3, "lifetime_jitter": 0.0, "dump_timeout": 0.3}
    config = {
        "intensity": 0,
        "children": [worker("w", "workers.chaos:ignore_shutdown", shutdown=0.5, health=health)],
    }
    async with tree_of(config) as (tree, rec):
        await rec.wait_kind(Kind.RECYCLED, "root/w")
        await restarted(rec, "root/w")
        assert not tree.root.finished.is_set()
    reasons = [e.reason for e in rec.of(Kind.DUMP_TAKEN, "root/w")]
    assert reasons[0] == "lifetime_shutdown_timeout"
    assert rec.of(Kind.CHILD_EXITED, "root/w")[0].signal == "SIGKILL"


async def test_temporary_child_recycled_by_lifetime_is_removed() -> None:
    health = {"max_lifetime": 0.3, "lifetime_jitter": 0.0}
    config = {"children": [worker("w", "workers.chaos:steady", restart="temporary", health=health)]}
    async with tree_of(config) as (tree, rec):
        await rec.wait_kind(Kind.RECYCLED, "root/w")
        await settle(tree)
        assert tree.root.which_children() == []


async def test_shutdown_timeout_expiry_takes_a_dump_before_sigkill() -> None:
    config = {
        "children": [worker("w", "workers.chaos:ignore_shutdown", shutdown=0.3, health={"dump_timeout": 0.3})]
    }
    async with tree_of(config) as (_tree, rec):
        pass
    kinds = [
        e.kind
        for e in rec.events
        if e.path == "root/w" and e.kind in (Kind.DUMP_TAKEN, Kind.CHILD_TERMINATED)
    ]
    assert kinds == [Kind.DUMP_TAKEN, Kind.CHILD_TERMINATED]
    taken, text = dump_text(rec, "root/w")
    assert taken.reason == "shutdown_timeout" and "ignore_shutdown" in text


async def test_health_settings_are_inherited_from_the_supervisor() -> None:
    config = {
        "health": {"ping_interval": 0.1, "ping_timeout": 1.0, "dump_timeout": 0.3},
        "intensity": 5,
        "children": [{"id": "sub", "children": [worker("w", "workers.chaos:blocks_loop")]}],
    }
    async with tree_of(config) as (_tree, rec):
        hang = await rec.wait_kind(Kind.HANG, "root/sub/w")
        assert hang.threshold == 1.0


PLAIN_PY = """
import faulthandler, os, signal, sys, time
if len(sys.argv) > 1 and sys.argv[1] == "opt-in":
    out = open(os.environ["OTP_AGENTS_DUMP_FILE"], "ab")
    faulthandler.register(signal.SIGUSR1, file=out, all_threads=True)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
def plain_command_busy():
    time.sleep(3600)
plain_command_busy()
"""


@pytest.mark.parametrize("mode", ["opt-in", "py-spy"])
async def test_plain_command_dump_routes(mode: str) -> None:
    if mode == "py-spy" and dump._PYSPY is None:
        pytest.skip("py-spy is not installed")
    health = {"dump_timeout": 1.0, **({"dump_signal": "SIGUSR1"} if mode == "opt-in" else {})}
    import sys

    child = {"id": "p", "command": [sys.executable, "-c", PLAIN_PY, mode], "shutdown": 0.5, "health": health}
    async with tree_of({"children": [child]}) as (_tree, rec):
        await anyio.sleep(0.5)  # let it install its handlers
    taken, text = dump_text(rec, "root/p")
    assert taken.reason == "shutdown_timeout"
    assert taken.detail == ("signal" if mode == "opt-in" else "py-spy")
    assert "plain_command_busy" in text


async def test_plain_command_over_the_soft_limit_is_stopped_and_recycled() -> None:
    import sys

    grow = "import time\nhoard = []\nwhile True:\n    hoard.append(b'x' * 20_000_000)\n    time.sleep(0.1)\n"
    health = {**MEM, "memory_soft_mb": 100}
    child = {"id": "c", "command": [sys.executable, "-c", grow], "health": health}
    async with tree_of({"intensity": 0, "children": [child]}) as (tree, rec):
        await rec.wait_kind(Kind.RECYCLED, "root/c")
        await restarted(rec, "root/c")
        assert not tree.root.finished.is_set()
    exited = rec.of(Kind.CHILD_EXITED, "root/c")[0]
    assert exited.signal == "SIGTERM" and exited.reason == "normal"  # asked for: not a crash


async def test_a_memory_limit_reloaded_in_place_is_enforced_on_the_running_child() -> None:
    """A reload that only sets a health limit keeps the child (same pid) and its breaker then
    enforces the new limit on it."""
    from otp_agents.spec.load import from_dict

    steady = {"intensity": 5, "children": [worker("w", "workers.chaos:steady", health=MEM)]}
    async with tree_of(steady) as (tree, rec):
        started = await rec.wait_kind(Kind.CHILD_STARTED, "root/w")
        limited = {
            "intensity": 5,
            "children": [worker("w", "workers.chaos:steady", health={**MEM, "memory_limit_mb": 1})],
        }
        lines = await tree.root.apply_spec(from_dict(limited))
        assert lines == ["~ root/w: health.memory_limit_mb None → 1.0 (in place; same process)"]
        exited = await rec.wait_kind(Kind.CHILD_EXITED, "root/w")
        assert (
            exited.pid == started.pid and exited.reason == "memory"
        )  # the same process, killed by the breaker
