"""Every strategy x restart type x exit kind, with real processes.

Three plain-command children a, b, c; b has the restart type under test and ends with the exit
kind under test. The expected reaction follows OTP's rules (see otp_agents/rules.py).
"""

from __future__ import annotations

import signal

import pytest

from otp_agents.events import Kind

from .helpers import cmd, settle, signal_child, tree_of

pytestmark = pytest.mark.anyio

EXITS = {
    "crash_code": (signal.SIGUSR2, 3, None),  # faulty.sh exits 3
    "signal": (signal.SIGKILL, None, "SIGKILL"),
    "normal": (signal.SIGUSR1, 0, None),  # faulty.sh exits 0
}


def _restarted(restart: str, exit_kind: str) -> bool:
    return restart == "permanent" or (restart == "transient" and exit_kind != "normal")


@pytest.mark.parametrize("exit_kind", list(EXITS))
@pytest.mark.parametrize("restart", ["permanent", "transient", "temporary"])
@pytest.mark.parametrize("strategy", ["one_for_one", "rest_for_one", "one_for_all"])
async def test_matrix(strategy: str, restart: str, exit_kind: str) -> None:
    config = {
        "strategy": strategy,
        "intensity": 10,
        "children": [cmd("a"), cmd("b", restart=restart), cmd("c")],
    }
    async with tree_of(config) as (tree, rec):
        before = {p: tree.pid(f"root/{p}") for p in "abc"}
        assert all(before.values())
        assert rec.compact(kinds=(Kind.CHILD_STARTED,)) == [
            "child_started root/a",
            "child_started root/b",
            "child_started root/c",
        ]
        mark = rec.mark()
        sig, code, signame = EXITS[exit_kind]
        await signal_child(tree, "root/b", sig)
        exited = await rec.wait_kind(Kind.CHILD_EXITED, "root/b", mark)
        assert exited.code == code and exited.signal == signame and exited.requested is False
        await settle(tree)
        after = {p: tree.pid(f"root/{p}") for p in "abc"}
        lifecycle = rec.compact(mark, kinds=(Kind.CHILD_TERMINATED, Kind.CHILD_STARTED))

        if not _restarted(restart, exit_kind):
            assert lifecycle == []
            assert after == {**before, "b": None}
            ids = [c.id for c in tree.root.which_children()]
            # temporary children leave the child list; transient ones keep their place, stopped
            assert ids == (["a", "c"] if restart == "temporary" else ["a", "b", "c"])
            return

        if strategy == "one_for_one":
            assert lifecycle == ["child_started root/b"]
            assert after["a"] == before["a"] and after["c"] == before["c"]
        elif strategy == "rest_for_one":
            assert lifecycle == ["child_terminated root/c", "child_started root/b", "child_started root/c"]
            assert after["a"] == before["a"] and after["c"] != before["c"]
        else:
            assert lifecycle == [
                "child_terminated root/c",
                "child_terminated root/a",
                "child_started root/a",
                "child_started root/b",
                "child_started root/c",
            ]
            assert after["a"] != before["a"] and after["c"] != before["c"]
        assert after["b"] not in (None, before["b"])
        assert all(c.status == "running" for c in tree.root.which_children())
        # siblings were stopped by the supervisor, not counted as crashes
        assert all(e.requested for e in rec.of(Kind.CHILD_TERMINATED))


@pytest.mark.parametrize("strategy", ["rest_for_one", "one_for_all"])
async def test_temporary_sibling_taken_down_is_removed(strategy: str) -> None:
    config = {
        "strategy": strategy,
        "intensity": 10,
        "children": [cmd("a"), cmd("b"), cmd("t", restart="temporary")],
    }
    async with tree_of(config) as (tree, rec):
        mark = rec.mark()
        await signal_child(tree, "root/b", signal.SIGKILL)
        await rec.wait_kind(Kind.CHILD_EXITED, "root/b", mark)
        await settle(tree)
        assert [c.id for c in tree.root.which_children()] == ["a", "b"]
        assert "child_terminated root/t" in rec.compact(mark)
        assert "child_started root/t" not in rec.compact(mark)


async def test_transient_that_ended_normally_is_started_again_by_group_restart() -> None:
    # OTP keeps an ended transient child in the list; a one_for_all restart starts it again.
    config = {
        "strategy": "one_for_all",
        "intensity": 10,
        "children": [cmd("a"), cmd("t", restart="transient")],
    }
    async with tree_of(config) as (tree, rec):
        await signal_child(tree, "root/t", signal.SIGUSR1)
        await rec.wait_kind(Kind.CHILD_EXITED, "root/t")
        await settle(tree)
        assert tree.pid("root/t") is None
        mark = rec.mark()
        await signal_child(tree, "root/a", signal.SIGKILL)
        await rec.wait_kind(Kind.CHILD_EXITED, "root/a", mark)
        await settle(tree)
        assert rec.compact(mark, kinds=(Kind.CHILD_STARTED,)) == [
            "child_started root/a",
            "child_started root/t",
        ]
        assert tree.pid("root/t") is not None
