"""The pure OTP rules, on a virtual clock (no processes, no sleeping)."""

from __future__ import annotations

import pytest

from otp_agents.spec.model import AutoShutdown, RestartType, Strategy
from otp_agents.tree import rules
from otp_agents.tree.rules import (
    ChildRec,
    Decision,
    ExitFacts,
    GiveUp,
    GiveUpReason,
    Nothing,
    Restart,
    Status,
    SupState,
)

P, TR, TE = RestartType.PERMANENT, RestartType.TRANSIENT, RestartType.TEMPORARY


def state(
    strategy: Strategy, *children: tuple[str, RestartType], intensity: int = 1, period: float = 5.0
) -> SupState:
    st = SupState(strategy=strategy, intensity=intensity, period=period)
    st.children = [ChildRec(cid, r, status=Status.RUNNING) for cid, r in children]
    return st


CRASH = ExitFacts(code=1)
NORMAL = ExitFacts(code=0)


def exited(st: SupState, child: str, normal: bool, now: float) -> Decision:
    """A child ended normally (exit code 0) or not (exit code 1)."""
    return rules.on_exit(st, child, NORMAL if normal else CRASH, now)


def test_intensity_is_a_sliding_window_on_the_clock() -> None:
    st = state(Strategy.ONE_FOR_ONE, ("a", P), intensity=2, period=10)
    for t in (0.0, 1.0):
        assert isinstance(exited(st, "a", False, t), Restart)
        rules.child_started(st, "a")
    # a third restart within 10 s exceeds intensity 2
    assert exited(st, "a", False, 9.0) == GiveUp(GiveUpReason.INTENSITY, "a")
    # ...but once the first two are older than the period, it is allowed
    st2 = state(Strategy.ONE_FOR_ONE, ("a", P), intensity=2, period=10)
    for t in (0.0, 1.0, 10.5):
        assert isinstance(exited(st2, "a", False, t), Restart)
        rules.child_started(st2, "a")


def test_intensity_zero_gives_up_at_once() -> None:
    st = state(Strategy.ONE_FOR_ONE, ("a", P), intensity=0)
    assert isinstance(exited(st, "a", True, 0.0), GiveUp)


def test_group_restart_counts_once() -> None:
    st = state(Strategy.ONE_FOR_ALL, ("a", P), ("b", P), ("c", P), intensity=1)
    plan = exited(st, "b", False, 0.0)
    assert plan == Restart("b", terminate=("c", "a"), start=("a", "b", "c"))
    assert len(st.restarts) == 1


def test_rest_for_one_plan_and_temporary_siblings_dropped() -> None:
    st = state(Strategy.REST_FOR_ONE, ("a", P), ("b", P), ("t", TE), ("c", TR))
    plan = exited(st, "b", False, 0.0)
    assert plan == Restart("b", terminate=("c", "t"), start=("b", "c"))
    for cid in plan.terminate:
        rules.child_terminated(st, cid)
    assert [c.id for c in st.children] == ["a", "b", "c"]


def test_stale_exit_is_ignored() -> None:
    st = state(Strategy.ONE_FOR_ONE, ("a", P))
    rules.child_terminated(st, "a")
    assert exited(st, "a", False, 0.0) == Nothing()


def test_failed_restart_marks_restarting_and_try_again_counts() -> None:
    st = state(Strategy.ONE_FOR_ONE, ("a", P), intensity=2, period=100)
    assert isinstance(exited(st, "a", False, 0.0), Restart)
    assert rules.start_failed(st, "a", 0.0) == 0.0  # no backoff: retried at once
    assert st.children[0].status is Status.RESTARTING
    assert isinstance(rules.try_again(st, "a", 0.1), Restart)
    rules.start_failed(st, "a", 0.1)
    assert rules.try_again(st, "a", 0.2) == GiveUp(GiveUpReason.INTENSITY, "a")


@pytest.mark.parametrize(
    ("restart", "normal", "expect_restart"),
    [
        (P, True, True),
        (P, False, True),
        (TR, True, False),
        (TR, False, True),
        (TE, True, False),
        (TE, False, False),
    ],
)
def test_restart_types(restart: RestartType, normal: bool, expect_restart: bool) -> None:
    st = state(Strategy.ONE_FOR_ONE, ("a", restart), intensity=5)
    decision = exited(st, "a", normal, 0.0)
    assert isinstance(decision, Restart) is expect_restart
    if restart is TE:
        assert decision == Nothing(removed=True) and st.children == []


def test_all_significant_waits_for_the_last_one() -> None:
    st = state(Strategy.ONE_FOR_ONE, ("x", TR), ("y", TR), ("z", P))
    st.auto_shutdown = AutoShutdown.ALL_SIGNIFICANT
    st.children[0].significant = st.children[1].significant = True
    assert exited(st, "x", True, 0.0) == Nothing()
    assert exited(st, "y", True, 0.0) == GiveUp(GiveUpReason.AUTO_SHUTDOWN, "y")


def test_simple_one_for_one_children_always_leave_when_not_restarted() -> None:
    st = state(Strategy.SIMPLE_ONE_FOR_ONE, ("leaf-1", TR), ("leaf-2", TR), intensity=5)
    assert exited(st, "leaf-1", True, 0.0) == Nothing(removed=True)
    assert [c.id for c in st.children] == ["leaf-2"]
    assert rules.shutdown_order(st) == ["leaf-2"]
