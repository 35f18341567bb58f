"""Start order, start failures, ordered shutdown, escalation, auto_shutdown, backoff."""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import pytest

from otp_agents.errors import StartError
from otp_agents.events import EventBus, Kind
from otp_agents.runtime.tree import running
from otp_agents.spec.load import from_dict

from .helpers import Recorder, alive, armed, cmd, settle, signal_child, tree_of, worker

pytestmark = pytest.mark.anyio


async def test_children_start_in_order_and_stop_in_reverse() -> None:
    config = {
        "children": [
            cmd("a"),
            {"id": "sub", "children": [cmd("x"), worker("y", "workers.chaos:steady")]},
            cmd("c"),
        ]
    }
    async with tree_of(config) as (tree, rec):
        pids = [tree.pid(p) for p in ("root/a", "root/sub/x", "root/sub/y", "root/c")]
    kinds = (Kind.SUPERVISOR_STARTED, Kind.CHILD_STARTED, Kind.CHILD_TERMINATED, Kind.SUPERVISOR_STOPPED)
    assert rec.compact(kinds=kinds) == [
        "supervisor_started root",
        "child_started root/a",
        "supervisor_started root/sub",
        "child_started root/sub/x",
        "child_started root/sub/y",
        "child_started root/c",
        "child_terminated root/c",
        "child_terminated root/sub/y",
        "child_terminated root/sub/x",
        "supervisor_stopped root/sub",
        "child_terminated root/a",
        "supervisor_stopped root",
    ]
    assert not any(alive(p) for p in pids if p)


async def test_child_ignoring_sigterm_gets_sigkill_after_its_timeout_and_order_holds() -> None:
    config = {
        "children": [
            cmd("first"),
            cmd("stubborn", env={"IGNORE_TERM": "1"}, shutdown=0.3),
            cmd("last"),
        ]
    }
    async with tree_of(config) as (tree, rec):
        for path in ("root/first", "root/stubborn", "root/last"):
            await armed(tree.pid(path))  # wait until their traps are installed
        stubborn = tree.pid("root/stubborn")
    terms = rec.of(Kind.CHILD_TERMINATED)
    assert [e.path for e in terms] == ["root/last", "root/stubborn", "root/first"]
    by_path = {e.path: e for e in terms}
    assert by_path["root/stubborn"].killed and by_path["root/stubborn"].signal == "SIGKILL"
    assert not by_path["root/last"].killed and by_path["root/last"].code == 0
    assert stubborn is not None and not alive(stubborn)


async def test_brutal_kill_is_immediate() -> None:
    config = {"children": [cmd("a", shutdown="brutal_kill")]}
    async with tree_of(config):
        pass


async def test_start_failure_terminates_started_children_and_fails() -> None:
    config = {
        "children": [
            cmd("a"),
            cmd("b"),
            {"id": "bad", "command": ["/nonexistent/program"]},
            cmd("never"),
        ]
    }
    with pytest.raises(StartError, match=r"root/bad: cannot execute '/nonexistent/program'"):
        async with tree_of(config) as (_tree, _rec):
            pass


async def test_start_failure_order_of_events() -> None:
    from otp_agents.events import EventBus
    from otp_agents.runtime.tree import running
    from otp_agents.spec.load import from_dict

    from .helpers import Recorder

    bus = EventBus()
    rec = Recorder(bus)
    config = {"children": [cmd("a"), cmd("b"), {"id": "bad", "command": ["/nonexistent/x"]}, cmd("never")]}
    with pytest.raises(StartError):
        async with running(from_dict(config), bus=bus):
            pass
    assert rec.compact(kinds=(Kind.CHILD_STARTED, Kind.START_FAILED, Kind.CHILD_TERMINATED)) == [
        "child_started root/a",
        "child_started root/b",
        "start_failed root/bad",
        "child_terminated root/b",
        "child_terminated root/a",
    ]


async def test_escalation_two_levels_deep_reaches_root() -> None:
    config = {
        "intensity": 0,
        "children": [
            cmd("root_sibling"),
            {
                "id": "mid",
                "intensity": 1,
                "period": 3600,
                "children": [cmd("mid_sibling"), {"id": "inner", "intensity": 0, "children": [cmd("leaf")]}],
            },
        ],
    }
    async with tree_of(config) as (tree, rec):
        mark = rec.mark()
        await signal_child(tree, "root/mid/inner/leaf", signal.SIGKILL)
        await rec.wait_kind(Kind.SUPERVISOR_STARTED, "root/mid/inner", mark)
        await settle(tree)
        assert [e.path for e in rec.of(Kind.INTENSITY_EXCEEDED)] == ["root/mid/inner"]
        assert not tree.root.finished.is_set()
        await signal_child(tree, "root/mid/inner/leaf", signal.SIGKILL)
        await tree.root.finished.wait()
        assert tree.root.exit is not None and not tree.root.exit.requested
        assert tree.root.exit.reason == "reached_max_restart_intensity"
        assert tree.root.exit.child == "root/mid"
    exceeded = [(e.path, e.child) for e in rec.of(Kind.INTENSITY_EXCEEDED)]
    assert exceeded == [
        ("root/mid/inner", "root/mid/inner/leaf"),
        ("root/mid/inner", "root/mid/inner/leaf"),
        ("root/mid", "root/mid/inner"),
        ("root", "root/mid"),
    ]
    assert [e.path for e in rec.of(Kind.ESCALATED)] == ["root/mid/inner", "root/mid/inner", "root/mid"]
    # everything was stopped in reverse order on the way up
    assert rec.compact(kinds=(Kind.CHILD_TERMINATED,))[-2:] == [
        "child_terminated root/mid/mid_sibling",
        "child_terminated root/root_sibling",
    ]


async def test_transient_supervisor_that_gives_up_is_not_restarted() -> None:
    # OTP: a supervisor that gives up exits with reason `shutdown`, a normal reason.
    config = {
        "intensity": 5,
        "children": [
            cmd("a"),
            {"id": "sub", "restart": "transient", "intensity": 0, "children": [cmd("leaf")]},
        ],
    }
    async with tree_of(config) as (tree, rec):
        await signal_child(tree, "root/sub/leaf", signal.SIGKILL)
        await rec.wait_kind(Kind.SUPERVISOR_STOPPED, "root/sub")
        await settle(tree)
        assert len(rec.of(Kind.SUPERVISOR_STARTED, "root/sub")) == 1
        assert [(c.id, c.status) for c in tree.root.which_children()] == [
            ("a", "running"),
            ("sub", "stopped"),
        ]


async def test_auto_shutdown_any_significant() -> None:
    config = {
        "auto_shutdown": "any_significant",
        "children": [cmd("helper"), cmd("main", restart="transient", significant=True)],
    }
    async with tree_of(config) as (tree, rec):
        await signal_child(tree, "root/main", signal.SIGUSR1)  # normal exit
        await tree.root.finished.wait()
        assert tree.root.exit is not None and tree.root.exit.reason == "auto_shutdown"
    assert rec.compact(kinds=(Kind.CHILD_TERMINATED,)) == ["child_terminated root/helper"]


async def test_failed_restart_retries_through_the_mailbox_until_intensity() -> None:
    # b's program disappears after it started: every restart fails, each retry counts.
    import os
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp()
    prog = os.path.join(tmp, "faulty.sh")
    from .helpers import FAULTY

    shutil.copy(FAULTY[0], prog)
    config = {"intensity": 3, "period": 3600, "children": [cmd("a"), {"id": "b", "command": [prog]}]}
    async with tree_of(config) as (tree, rec):
        pid = await signal_child(tree, "root/b", 0)
        os.unlink(prog)
        os.kill(pid, signal.SIGKILL)
        await tree.root.finished.wait()
    failed = rec.of(Kind.START_FAILED, "root/b")
    assert len(failed) == 3  # 3 restarts allowed, each failed; the 4th exceeds intensity
    assert tree.root.exit is not None and tree.root.exit.reason == "reached_max_restart_intensity"
    shutil.rmtree(tmp)


async def test_backoff_delays_grow_and_are_reported() -> None:
    backoff = {"initial": 0.05, "factor": 2.0, "max": 0.15, "jitter": 0.0, "reset_after": 60}
    config = {"intensity": 10, "children": [cmd("b", backoff=backoff)]}
    async with tree_of(config) as (tree, rec):
        for _ in range(4):
            mark = rec.mark()
            await signal_child(tree, "root/b", signal.SIGKILL)
            await rec.wait_kind(Kind.CHILD_STARTED, "root/b", mark)
    delays = [e.delay for e in rec.of(Kind.RESTART_DELAYED)]
    assert delays == [0.05, 0.1, 0.15, 0.15]


async def test_backoff_resets_after_a_stable_run() -> None:
    backoff = {"initial": 0.05, "factor": 2.0, "max": 1.0, "jitter": 0.0, "reset_after": 0.3}
    config = {"intensity": 10, "children": [cmd("b", backoff=backoff)]}
    async with tree_of(config) as (tree, rec):
        for pause in (0.0, 0.0, 0.5):
            await anyio.sleep(pause)  # a run longer than reset_after before the last crash
            mark = rec.mark()
            await signal_child(tree, "root/b", signal.SIGKILL)
            await rec.wait_kind(Kind.CHILD_STARTED, "root/b", mark)
    assert [e.delay for e in rec.of(Kind.RESTART_DELAYED)] == [0.05, 0.1, 0.05]


async def test_spawn_without_setpriv_uses_the_preexec_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    from otp_agents.proc import spawn as process

    monkeypatch.setattr(process, "_SETPRIV", None)
    async with tree_of({"children": [cmd("a"), worker("w", "workers.chaos:steady")]}) as (tree, rec):
        await signal_child(tree, "root/a", 0)
        assert tree.pid("root/w") is not None
    assert [e.path for e in rec.of(Kind.CHILD_TERMINATED)] == ["root/w", "root/a"]


async def test_start_concurrency_starts_workers_together(tmp_path: Path) -> None:
    """Four barrier workers each wait for all four to be starting: one after another (OTP's
    default) they could never start; with start_concurrency = 4 they all do."""
    gate = tmp_path / "gate"
    gate.mkdir()
    barrier = [worker(f"w{i}", "workers.chaos:barrier", args=["4", str(gate)]) for i in range(4)]
    config = {"start_concurrency": 4, "children": barrier}
    async with tree_of(config) as (tree, rec):
        assert all(alive(tree.pid(f"root/w{i}") or 0) for i in range(4))
        assert len(rec.of(Kind.CHILD_STARTED)) == 4
    assert len(list(gate.iterdir())) == 4


async def test_start_concurrency_one_is_otp_order(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    config = {
        "children": [
            worker("w0", "workers.chaos:barrier", args=["2", str(gate)], start_timeout=1),
            worker("w1", "workers.chaos:barrier", args=["2", str(gate)], start_timeout=1),
        ]
    }
    with pytest.raises(StartError, match=r"root/w0: not ready within start_timeout"):
        async with tree_of(config):
            pass
    assert len(list(gate.iterdir())) == 1  # w1 was never started


async def test_start_concurrency_keeps_supervisors_and_zygotes_as_barriers() -> None:
    steady = "workers.chaos:steady"
    config = {
        "start_concurrency": 8,
        "children": [
            worker("a", steady),
            worker("b", steady),
            {"id": "sub", "children": [worker("x", steady)]},
            worker("c", steady),
            worker("d", steady),
        ],
    }
    async with tree_of(config) as (_tree, rec):
        started = [e.path for e in rec.of(Kind.CHILD_STARTED)]
    assert set(started[:2]) == {"root/a", "root/b"}
    assert started[2] == "root/sub/x"
    assert set(started[3:]) == {"root/c", "root/d"}


async def test_start_concurrency_failure_stops_the_started_and_names_the_child() -> None:
    config = {
        "start_concurrency": 3,
        "children": [
            worker("a", "workers.chaos:steady"),
            worker("bad", "workers.chaos:exit_before_ready"),
            worker("c", "workers.chaos:steady"),
            *[worker(f"later{i}", "workers.chaos:steady") for i in range(6)],
        ],
    }
    bus = EventBus()
    rec = Recorder(bus)
    with pytest.raises(StartError, match=r"root/bad: "):
        async with running(from_dict(config), bus=bus):
            pass
    started = {e.pid for e in rec.of(Kind.CHILD_STARTED)}
    terminated = {e.pid for e in rec.of(Kind.CHILD_TERMINATED)}
    assert started and started <= terminated  # whatever started was stopped again
    assert not any(alive(p) for p in started if p)
    assert rec.of(Kind.START_FAILED, "root/bad")
