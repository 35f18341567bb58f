"""The single entry point into the rules, ``rules.on_exit``, as a table: every restart type, every
way a child can end, under every strategy, against what OTP decides (``supervisor.erl``: a clause
per restart type x exit reason, then one per strategy) or the documented extension (recycle,
backoff, held). The expected outcomes are written out here, not computed by the code under test."""

from __future__ import annotations

import signal

import pytest

from otp_agents.spec.model import Backoff, RestartType, Strategy
from otp_agents.tree import rules
from otp_agents.tree.rules import (
    Cause,
    ChildRec,
    ExitFacts,
    GiveUp,
    GiveUpReason,
    Nothing,
    Recycle,
    Restart,
    Status,
    SupState,
)

P, TR, TE = RestartType.PERMANENT, RestartType.TRANSIENT, RestartType.TEMPORARY
KILL, TERM = signal.SIGKILL, signal.SIGTERM

# How a child can end (name -> facts), with OTP's reading of it and the restart cause.
ENDINGS: dict[str, tuple[ExitFacts, bool, Cause]] = {
    "code 0": (ExitFacts(code=0), True, Cause.CRASH),
    "code 3": (ExitFacts(code=3), False, Cause.CRASH),
    "killed by a signal it was not sent": (ExitFacts(signal=KILL), False, Cause.CRASH),
    "stopped as the supervisor asked": (ExitFacts(signal=TERM, requested=True), True, Cause.CRASH),
    "a protocol error": (ExitFacts(signal=KILL, fault="protocol error: malformed frame"), False, Cause.CRASH),
    "a hang kill": (ExitFacts(signal=KILL, fault="hang"), False, Cause.HANG),
    "a memory kill": (ExitFacts(signal=KILL, fault="memory"), False, Cause.MEMORY),
    "a child supervisor that gave up": (ExitFacts(gave_up=True), True, Cause.ESCALATION),
    "a child supervisor killed": (ExitFacts(killed=True), False, Cause.CRASH),
}


# OTP: permanent always, transient only after an abnormal exit, temporary never.
def restarted(restart: RestartType, normal: bool) -> bool:
    return restart is P or (restart is TR and not normal)


def tree(strategy: Strategy, subject: RestartType) -> SupState:
    """``b`` (permanent), ``x`` (the child under test), ``t`` (temporary), all running."""
    st = SupState(strategy=strategy, intensity=10, period=60)
    st.children = [
        ChildRec("b", P, status=Status.RUNNING),
        ChildRec("x", subject, status=Status.RUNNING),
        ChildRec("t", TE, status=Status.RUNNING),
    ]
    return st


# What each strategy terminates and starts again when x is restarted (OTP's clauses).
PLANS: dict[Strategy, tuple[tuple[str, ...], tuple[str, ...]]] = {
    Strategy.ONE_FOR_ONE: ((), ("x",)),
    Strategy.SIMPLE_ONE_FOR_ONE: ((), ("x",)),
    Strategy.REST_FOR_ONE: (("t",), ("x",)),  # those started after x, reverse order; t is dropped
    Strategy.ONE_FOR_ALL: (("t", "b"), ("b", "x")),  # all the others; temporary t is dropped
}


@pytest.mark.parametrize("strategy", list(PLANS))
@pytest.mark.parametrize("restart", [P, TR, TE])
@pytest.mark.parametrize("ending", list(ENDINGS))
def test_every_restart_type_and_ending_under_every_strategy(
    strategy: Strategy, restart: RestartType, ending: str
) -> None:
    facts, normal, cause = ENDINGS[ending]
    st = tree(strategy, restart)
    assert rules.is_normal(facts) is normal
    decision = rules.on_exit(st, "x", facts, now=1.0)
    if restarted(restart, normal):
        terminate, start = PLANS[strategy]
        assert decision == Restart("x", terminate=terminate, start=start, cause=cause, delay=0.0)
        assert len(st.restarts) == 1  # counted against intensity
        assert st.find("x") is not None and st.find("x").status is Status.STOPPED  # type: ignore[union-attr]
    else:
        # Not restarted: a temporary child, or any dynamic child, leaves the list; others stay.
        leaves = restart is TE or strategy is Strategy.SIMPLE_ONE_FOR_ONE
        assert decision == Nothing(removed=leaves)
        assert (st.find("x") is None) is leaves
        assert len(st.restarts) == 0


@pytest.mark.parametrize("strategy", list(PLANS))
@pytest.mark.parametrize("restart", [P, TR, TE])
@pytest.mark.parametrize("why", ["memory", "lifetime"])
def test_a_drained_child_that_ends_normally_is_recycled_alone_and_uncounted(
    strategy: Strategy, restart: RestartType, why: str
) -> None:
    """Extension: asked to drain (memory_soft_mb, max_lifetime), it ended as asked."""
    for facts in (ExitFacts(code=0, drained=why), ExitFacts(signal=TERM, requested=True, drained=why)):
        st = tree(strategy, restart)
        decision = rules.on_exit(st, "x", facts, now=1.0)
        assert decision == Recycle("x", why, restart=restart is not TE)
        assert decision.cause is Cause(f"{why}_recycle")
        assert len(st.restarts) == 0
        assert (st.find("x") is None) is (restart is TE)


def test_a_drained_child_that_crashes_is_a_crash() -> None:
    st = tree(Strategy.ONE_FOR_ALL, P)
    decision = rules.on_exit(st, "x", ExitFacts(code=1, drained="memory"), now=1.0)
    assert decision == Restart("x", terminate=("t", "b"), start=("b", "x"), cause=Cause.CRASH)
    assert len(st.restarts) == 1


def test_intensity_exhausted_gives_up_whatever_the_strategy() -> None:
    for strategy in PLANS:
        st = tree(strategy, P)
        st.intensity = 0
        assert rules.on_exit(st, "x", ExitFacts(code=1), now=1.0) == GiveUp(GiveUpReason.INTENSITY, "x")


def test_a_held_sibling_is_not_started_by_a_group_restart() -> None:
    st = tree(Strategy.ONE_FOR_ALL, P)
    st.children[0].held = True
    st.children[0].status = Status.STOPPED
    decision = rules.on_exit(st, "x", ExitFacts(code=1), now=1.0)
    assert decision == Restart("x", terminate=("t",), start=("x",), cause=Cause.CRASH)


def test_stale_news_changes_nothing() -> None:
    st = tree(Strategy.ONE_FOR_ONE, P)
    st.children[1].status = Status.STOPPED  # the supervisor stopped it already
    assert rules.on_exit(st, "x", ExitFacts(code=1), now=1.0) == Nothing()
    assert rules.on_exit(st, "nobody", ExitFacts(code=1), now=1.0) == Nothing()


BACKOFF = Backoff(initial=0.1, max=1.0, factor=2.0, jitter=0.2, reset_after=10.0)


def test_backoff_grows_is_capped_jittered_and_resets_after_a_good_run() -> None:
    st = tree(Strategy.ONE_FOR_ONE, P)
    rec = st.children[1]
    rec.backoff = BACKOFF
    delays = []
    for n in range(6):
        rules.child_started(st, "x", now=float(n))
        decision = rules.on_exit(st, "x", ExitFacts(code=1), now=float(n) + 0.5, rand=0.5)  # no jitter
        assert isinstance(decision, Restart)
        delays.append(decision.delay)
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    rules.child_started(st, "x", now=100.0)  # then it ran longer than reset_after
    decision = rules.on_exit(st, "x", ExitFacts(code=1), now=111.0, rand=1.0)  # jitter at its top
    assert isinstance(decision, Restart) and decision.delay == pytest.approx(0.1 * 1.2)
    rules.child_started(st, "x", now=111.5)
    low = rules.on_exit(st, "x", ExitFacts(code=1), now=111.6, rand=0.0)
    assert isinstance(low, Restart) and low.delay == pytest.approx(0.2 * 0.8)


def test_a_failed_start_waits_its_backoff_and_the_retry_counts() -> None:
    st = tree(Strategy.ONE_FOR_ONE, P)
    st.children[1].backoff = BACKOFF
    st.intensity = 2
    first = rules.on_exit(st, "x", ExitFacts(code=1), now=0.0, rand=0.5)
    assert isinstance(first, Restart) and first.delay == 0.1
    assert rules.start_failed(st, "x", now=0.2, rand=0.5) == 0.2  # the next step, held "restarting"
    assert st.children[1].status is Status.RESTARTING
    retry = rules.try_again(st, "x", now=0.5)
    assert isinstance(retry, Restart) and retry.delay == 0.0  # the delay was already waited
    assert rules.start_failed(st, "x", now=0.6) > 0
    assert rules.try_again(st, "x", now=0.9) == GiveUp(GiveUpReason.INTENSITY, "x")


def test_a_delayed_restart_is_due_once() -> None:
    st = tree(Strategy.ONE_FOR_ONE, P)
    rules.on_exit(st, "x", ExitFacts(code=1), now=0.0)
    rules.delayed(st, "x")
    assert st.children[1].status is Status.RESTARTING
    assert rules.due(st, "x") is True
    assert rules.due(st, "x") is False  # the timer fired after an operator started it: nothing to do
