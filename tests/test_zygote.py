"""Workers forked by a zygote are real, independent protocol workers: their own random state,
working logging, no inherited sockets, heartbeats, reforked after a crash; and when the zygote
is down or stuck, workers start cold with a ``zygote_fallback`` event saying why."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest

from otp_agents import linux
from otp_agents.errors import ConfigError, StartError
from otp_agents.events import Event, EventBus, Kind
from otp_agents.proc.handle import ChildProcess
from otp_agents.runtime.tree import Tree, running
from otp_agents.spec.load import from_dict

from .helpers import ROOT, WAIT, Recorder, spares_of, tree_of, worker

pytestmark = pytest.mark.anyio

FAST_PINGS = {"ping_interval": 0.1, "ping_timeout": 2.0}


def zygote(image: str = "probe", preload: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    modules = ["numpy", "workers.zygote_probe"] if preload is None else preload
    return {"id": "zygote", "image": image, "preload": modules, "cwd": str(ROOT), "shutdown": 3, **extra}


def probe(cid: str, log: Path, **extra: Any) -> dict[str, Any]:
    return worker(cid, "workers.zygote_probe:main", args=[str(log)], zygote="probe", **extra)


def said(rec: Recorder, path: str) -> dict[str, str]:
    line = next(e.detail for e in rec.of(Kind.WORKER_LOG, path) if (e.detail or "").startswith("probe "))
    assert line is not None
    return dict(re.findall(r"(\w+)=(\[[^\]]*\]|\S+)", line))


def started(rec: Recorder, path: str) -> list[Event]:
    return rec.of(Kind.CHILD_STARTED, path)


async def kill_and_replace(tree: Tree, rec: Recorder, path: str) -> Event:
    """SIGKILL ``path``'s process; its replacement's child_started event."""
    old = tree.pid(path)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    with anyio.fail_after(WAIT):
        return await rec.wait_for(lambda e: e.kind is Kind.CHILD_STARTED and e.path == path and e.pid != old)


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:"):
            inodes.add(target)
    return inodes


async def test_forked_workers_are_independent_and_log(tmp_path: Path) -> None:
    config = {"children": [zygote(), probe("a", tmp_path / "a.log"), probe("b", tmp_path / "b.log")]}
    async with tree_of(config) as (tree, rec):
        for path in ("root/a", "root/b"):
            assert started(rec, path)[0].detail == "forked by zygote probe"
        a, b = said(rec, "root/a"), said(rec, "root/b")
        zygote_pid = tree.pid("root/zygote")
        assert zygote_pid is not None
        # its own process: pid, random state (random and numpy), log file
        assert a["pid"] != b["pid"]
        assert a["random"] != b["random"] and a["numpy"] != b["numpy"]
        for name, info in (("a", a), ("b", b)):
            assert (tmp_path / f"{name}.log").read_text() == f"{info['pid']} hello from the probe\n"
            # no socket of the zygote (its channel, its listener, other workers' channels)
            assert not socket_inodes(int(info["pid"])) & socket_inodes(zygote_pid)
            # adopted by the supervisor, in a process group of its own
            assert os.getpgid(int(info["pid"])) == int(info["pid"])
        assert tree.pid("root/a") == int(a["pid"])


async def test_forked_worker_answers_heartbeats_and_is_reforked_after_a_crash(
    anyio_backend: str, tmp_path: Path
) -> None:
    config = {"intensity": 5, "children": [zygote(), probe("w", tmp_path / "w.log", health=FAST_PINGS)]}
    async with tree_of(config) as (tree, rec):
        proc = tree.slot("root/w").instance
        assert isinstance(proc, ChildProcess)
        with anyio.fail_after(WAIT):
            while proc.rtt is None:  # noqa: ASYNC110 - the pong updates a field, no event
                await anyio.sleep(0.02)
        again = await kill_and_replace(tree, rec, "root/w")
        exited = rec.of(Kind.CHILD_EXITED, "root/w")[0]
        assert exited.signal == "SIGKILL"  # its exit status, read by the supervisor that adopted it
        assert again.detail == "forked by zygote probe"
        assert rec.of(Kind.HANG) == [] and rec.of(Kind.ZYGOTE_FALLBACK) == []


async def test_exit_code_of_a_forked_worker_is_seen_exactly() -> None:
    """A crash (exit code 1 after Ready) of a forked transient worker is restarted, as OTP says;
    the supervisor reads the code itself, having adopted the worker."""
    config = {
        "intensity": 5,
        "children": [
            zygote(preload=["workers.chaos"]),
            worker("w", "workers.chaos:crash_after", args=["0.2"], restart="transient", zygote="probe"),
        ],
    }
    async with tree_of(config) as (_tree, rec):
        exited = await rec.wait_kind(Kind.CHILD_EXITED, "root/w")
        assert exited.code == 1 and exited.signal is None
        await rec.wait_kind(Kind.RESTARTING, "root/w")
        with anyio.fail_after(WAIT):
            while len(started(rec, "root/w")) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        assert all(e.detail == "forked by zygote probe" for e in started(rec, "root/w"))


async def test_stopped_zygote_makes_workers_start_cold_with_a_reason(tmp_path: Path) -> None:
    config = {"intensity": 5, "children": [zygote(), probe("w", tmp_path / "w.log")]}
    async with tree_of(config) as (tree, rec):
        zygote_pid = tree.pid("root/zygote")
        assert zygote_pid is not None
        os.kill(zygote_pid, signal.SIGSTOP)  # stuck: it takes no fork request
        try:
            again = await kill_and_replace(tree, rec, "root/w")
        finally:
            os.kill(zygote_pid, signal.SIGCONT)
        assert again.detail is None  # a fresh interpreter
        fallback = rec.of(Kind.ZYGOTE_FALLBACK, "root/w")
        assert fallback and fallback[0].reason == "probe" and "no answer" in (fallback[0].detail or "")


async def test_killed_zygote_is_restarted_and_forks_again(tmp_path: Path) -> None:
    config = {"intensity": 5, "children": [zygote(), probe("w", tmp_path / "w.log")]}
    async with tree_of(config) as (tree, rec):
        worker_pid = tree.pid("root/w")
        await kill_and_replace(tree, rec, "root/zygote")
        assert tree.pid("root/w") == worker_pid  # its workers do not die with it
        again = await kill_and_replace(tree, rec, "root/w")
        assert again.detail == "forked by zygote probe"


async def test_zygote_that_cannot_preload_fails_to_start_naming_the_module() -> None:
    bus = EventBus()
    rec = Recorder(bus)
    config = {"intensity": 0, "children": [zygote(preload=["no_such_module_xyz"])]}
    with pytest.raises(StartError, match="root/zygote"):
        async with running(from_dict(config), bus=bus):
            pass
    logged = " ".join(e.detail or "" for e in rec.of(Kind.WORKER_LOG, "root/zygote"))
    assert "cannot preload no_such_module_xyz" in logged


def test_a_worker_naming_an_unknown_image_is_refused() -> None:
    config = {"children": [zygote(), worker("w", "workers.chaos:steady", zygote="other")]}
    with pytest.raises(ConfigError, match=r"children\[1\]\.zygote: no zygote has image 'other'"):
        from_dict(config)


def test_two_zygotes_for_one_image_are_refused() -> None:
    config = {"children": [zygote(), {**zygote(), "id": "zygote2"}]}
    with pytest.raises(ConfigError, match=r"children\[1\]\.image: image 'probe' already has a zygote"):
        from_dict(config)


def spares(zygote_pid: int) -> set[int]:
    return spares_of(zygote_pid, linux.child_pids())


async def test_a_dead_spare_is_replaced_at_once_and_forks_still_work(tmp_path: Path) -> None:
    config = {"intensity": 5, "children": [zygote(idle=2), probe("w", tmp_path / "w.log")]}
    async with tree_of(config) as (tree, rec):
        zygote_pid = tree.pid("root/zygote")
        assert zygote_pid is not None
        with anyio.fail_after(WAIT):
            while len(spares(zygote_pid)) < 2:  # noqa: ASYNC110 - /proc has no wakeup
                await anyio.sleep(0.02)
        victim = min(spares(zygote_pid))
        os.kill(victim, signal.SIGKILL)
        with anyio.fail_after(WAIT):
            while victim in spares(zygote_pid) or len(spares(zygote_pid)) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        again = await kill_and_replace(tree, rec, "root/w")
        assert again.detail == "forked by zygote probe" and again.pid != victim


async def test_without_spares_every_worker_is_forked_on_demand(tmp_path: Path) -> None:
    config = {"children": [zygote(idle=0), probe("a", tmp_path / "a.log"), probe("b", tmp_path / "b.log")]}
    async with tree_of(config) as (tree, rec):
        zygote_pid = tree.pid("root/zygote")
        assert zygote_pid is not None and spares(zygote_pid) == set()
        assert [e.detail for e in started(rec, "root/a") + started(rec, "root/b")] == [
            "forked by zygote probe"
        ] * 2
