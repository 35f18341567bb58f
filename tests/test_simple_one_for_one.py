"""simple_one_for_one: children started at run time from one template."""

from __future__ import annotations

import signal

import pytest

from otp_agents.errors import Refused
from otp_agents.events import Kind

from .helpers import FAULTY, alive, settle, signal_child, tree_of, worker

pytestmark = pytest.mark.anyio


def pool(restart: str, max_children: int | None = 3) -> dict[str, object]:
    sup: dict[str, object] = {
        "id": "pool",
        "strategy": "simple_one_for_one",
        "intensity": 10,
        "children": [{"id": "leaf", "command": ["sh", FAULTY[0]], "restart": restart, "shutdown": 2}],
    }
    if max_children is not None:
        sup["max_children"] = max_children
    return {"children": [sup]}


async def test_start_child_appends_args_and_caps_at_max_children() -> None:
    config = {
        "children": [
            {
                "id": "pool",
                "strategy": "simple_one_for_one",
                "max_children": 2,
                "children": [worker("leaf", "workers.chaos:slow_start", restart="temporary")],
            }
        ]
    }
    async with tree_of(config) as (tree, rec):
        sup = tree.supervisor("root/pool")
        assert sup.which_children() == []
        first = await sup.start_child(["0.01"])
        second = await sup.start_child(["0.02"])
        assert (first, second) == ("root/pool/leaf-1", "root/pool/leaf-2")
        with pytest.raises(Refused, match="max_children=2"):
            await sup.start_child(["0"])
        assert [c.status for c in sup.which_children()] == ["running", "running"]
        pids = [tree.pid(first), tree.pid(second)]
    # dynamic children are stopped concurrently at shutdown, none left behind
    assert len(rec.of(Kind.CHILD_TERMINATED)) == 2
    assert not any(alive(p) for p in pids if p)


@pytest.mark.parametrize(
    ("restart", "restarted"), [("temporary", False), ("transient", True), ("permanent", True)]
)
async def test_dynamic_child_restart_types(restart: str, restarted: bool) -> None:
    async with tree_of(pool(restart)) as (tree, rec):
        sup = tree.supervisor("root/pool")
        path = await sup.start_child()
        await signal_child(tree, path, signal.SIGKILL)
        await rec.wait_kind(Kind.CHILD_EXITED, path)
        await settle(tree)
        ids = [c.id for c in sup.which_children()]
        assert ids == (["leaf-1"] if restarted else [])
        assert (tree.pid(path) is not None) == restarted


async def test_dynamic_transient_normal_exit_is_removed() -> None:
    async with tree_of(pool("transient")) as (tree, rec):
        sup = tree.supervisor("root/pool")
        path = await sup.start_child()
        await signal_child(tree, path, signal.SIGUSR1)
        await rec.wait_kind(Kind.CHILD_EXITED, path)
        await settle(tree)
        assert sup.which_children() == []


async def test_start_child_refused_on_static_supervisor() -> None:
    async with tree_of({"children": [{"id": "a", "command": ["sh", FAULTY[0]]}]}) as (tree, _rec):
        with pytest.raises(Refused, match="not a simple_one_for_one"):
            await tree.root.start_child()
