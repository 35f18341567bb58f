"""Regressions found by review: each once crashed or hung the runtime, leaked a process, or
misreported an exit."""

from __future__ import annotations

import collections
import os
import resource

import anyio
import pytest

from otp_agents.errors import StartError
from otp_agents.events import Kind

from .helpers import FAULTY, ROOT, alive, armed, settle, tree_of, worker

pytestmark = pytest.mark.anyio


def pool(child: dict[str, object]) -> dict[str, object]:
    return {
        "children": [
            {"id": "ok", "command": FAULTY},
            {"id": "pool", "strategy": "simple_one_for_one", "children": [child]},
        ]
    }


@pytest.mark.parametrize(
    "child",
    [
        {"id": "w", "script": "workers/broken_import.py", "cwd": str(ROOT), "restart": "temporary"},
        {"id": "w", "script": "workers/exit_at_once.py", "cwd": str(ROOT), "restart": "temporary"},
        worker("w", "workers.chaos:killed_in_setup", restart="temporary"),
        worker("w", "workers.chaos:exit_before_ready", restart="temporary"),
    ],
    ids=["import-error", "exit-before-hello", "killed-in-setup", "raises-in-setup"],
)
async def test_worker_dying_before_ready_is_a_start_failure_not_a_runtime_crash(
    child: dict[str, object],
) -> None:
    async with tree_of(pool(child)) as (tree, _rec):
        sup = tree.supervisor("root/pool")
        for _ in range(15):
            with pytest.raises(StartError):
                await sup.start_child()
        assert tree.root.exit is None and sup.exit is None


async def test_killed_subsupervisor_leaves_no_process_behind() -> None:
    config = {
        "children": [
            {
                "id": "A",
                "shutdown": 1,
                "children": [{"id": "leaf", "command": FAULTY, "env": {"IGNORE_TERM": "1"}, "shutdown": 30}],
            }
        ]
    }
    async with tree_of(config) as (tree, _rec):
        pid = await armed(tree.pid("root/A/leaf"))
        with anyio.fail_after(10):
            await tree.root.terminate_child("A")  # A overruns its shutdown: A is killed
        assert not alive(pid), "the leaf A was stopping survived A's kill"


async def test_sys_exit_0_in_main_is_a_normal_exit() -> None:
    config = {"intensity": 10, "children": [worker("job", "workers.chaos:done_exit0", restart="transient")]}
    async with tree_of(config) as (tree, rec):
        exited = await rec.wait_kind(Kind.CHILD_EXITED, "root/job")
        await settle(tree)
    assert exited.code == 0
    assert len(rec.of(Kind.CHILD_STARTED, "root/job")) == 1


async def test_graceful_stop_ends_with_exit_code_0() -> None:
    config = {
        "children": [
            {
                "id": "pool",
                "strategy": "simple_one_for_one",
                "children": [worker("w", "workers.chaos:steady", restart="temporary")],
            }
        ]
    }
    async with tree_of(config) as (tree, rec):
        for _ in range(3):
            sup = tree.supervisor("root/pool")
            for _ in range(8):
                await sup.start_child()
            await tree.root.terminate_child("pool")  # stops the 8 workers concurrently
            await tree.root.restart_child("pool")
    outcomes = collections.Counter((e.code, e.signal) for e in rec.of(Kind.CHILD_TERMINATED))
    assert outcomes == {(0, None): 24}


async def test_ready_then_exit_is_a_started_child() -> None:
    config = {
        "children": [
            {
                "id": "pool",
                "strategy": "simple_one_for_one",
                "children": [worker("w", "workers.chaos:ready_then_exit0", restart="temporary")],
            }
        ]
    }
    async with tree_of(config) as (tree, _rec):
        sup = tree.supervisor("root/pool")
        failures = []
        for _ in range(30):
            try:
                await sup.start_child()
            except StartError as exc:
                failures.append(str(exc))
        await settle(tree)
    assert failures == []


async def test_fd_exhaustion_is_a_start_failure() -> None:
    config = {
        "children": [
            {
                "id": "pool",
                "strategy": "simple_one_for_one",
                "children": [worker("w", "workers.chaos:steady", restart="temporary")],
            }
        ]
    }
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with tree_of(config) as (tree, _rec):
        sup = tree.supervisor("root/pool")
        hog: list[int] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
        try:
            while True:
                try:
                    hog.append(os.open("/dev/null", os.O_RDONLY))
                except OSError:
                    break
            os.close(hog.pop())  # exactly one free descriptor: a child's pipes and channel need more
            with pytest.raises(StartError, match="out of file descriptors"), anyio.fail_after(10):
                await sup.start_child()
        finally:
            for fd in hog:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert sup.exit is None
