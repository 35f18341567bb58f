"""What happens when a child dies: Erlang/OTP's supervisor rules as pure functions.

This module is the whole decision logic of a supervisor and does no I/O. The engine
(``supervisor.py``) hands it one fact at a time and carries out the decision it returns; a
differential test runs the same trees and faults through OTP's own ``supervisor`` module.

The entry point is :func:`on_exit`: a child ended, here is how (:class:`ExitFacts`); what now?

* **Normal or abnormal.** For an OS process *normal* means exit code 0, or an exit the supervisor
  itself asked for (its shutdown, a sibling's restart, an operator). Killed by a signal the
  supervisor did not send, any other code, or killed by the supervisor for a fault (a protocol
  error, a hang, a memory limit) is abnormal. A child supervisor that gave up exits with reason
  ``shutdown``, which OTP counts as normal.
* **Restart type.** ``permanent`` children are always restarted. ``transient`` children are
  restarted only after an abnormal exit. ``temporary`` children are never restarted and are
  removed from the child list when they end, including when a sibling's restart takes them down.
* **Strategy.** ``one_for_one`` (and ``simple_one_for_one``) restart only the dead child.
  ``rest_for_one`` terminates the children started after it, ``one_for_all`` all the others,
  in reverse start order, then starts the dead child and those siblings again in start order.
  A transient child that had ended normally keeps its place and is started again too.
* **Intensity.** Every restart is recorded on a monotonic clock; restarts older than ``period``
  are forgotten. If more than ``intensity`` remain, the supervisor gives up: it terminates all
  its children in reverse start order and exits with reason ``shutdown``; its parent then applies
  its own rules to it (escalation). As in OTP, a ``transient`` supervisor child that gives up is
  therefore *not* restarted (``shutdown`` is a normal reason); a ``permanent`` one is.
* **Failed restart.** If a start fails during a restart, the child is marked ``restarting`` and
  the supervisor retries through its own mailbox (OTP's ``try_again_restart``), so other
  requests are served in between. Each retry counts against intensity.
* **auto_shutdown.** When a ``significant`` child ends and is not restarted, the supervisor shuts
  down if ``auto_shutdown`` is ``any_significant``, or, for ``all_significant``, once no
  significant child is left running.

Extensions, not in OTP, decided here too:

* **Recycle.** A child the supervisor asked to drain (``memory_soft_mb``, ``max_lifetime``)
  that then exits normally is started again by itself: no intensity, no siblings (a temporary
  one leaves). It was healthy; it is being renewed, not restarted after a crash.
* **Backoff.** A child with ``backoff`` is restarted after a growing, jittered delay; the count
  resets once it has run ``reset_after`` seconds. Intensity still applies.
* **Held.** A child an operator stopped stays down, even through a sibling's restart.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from otp_agents.spec.model import AutoShutdown, Backoff, RestartType, Strategy


class Status(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"  # OTP: pid = undefined (never started, ended normally, or terminated)
    RESTARTING = "restarting"  # OTP: pid = {restarting, _}: a restart failed and will be retried


@dataclass
class ChildRec:
    id: str
    restart: RestartType
    significant: bool = False
    status: Status = Status.STOPPED
    # An operator stopped it (terminate): no automation starts it again, not even a sibling's
    # one_for_all/rest_for_one restart, until an operator starts it. (OTP would restart it with
    # its siblings; operators of process fleets expect their stop to stick.)
    held: bool = False
    backoff: Backoff | None = None
    started_at: float | None = None  # when it last started (monotonic), for backoff's reset
    in_a_row: int = 0  # restarts since it last ran reset_after seconds, for backoff


@dataclass
class SupState:
    strategy: Strategy
    intensity: int
    period: float
    auto_shutdown: AutoShutdown = AutoShutdown.NEVER
    children: list[ChildRec] = field(default_factory=list)  # start order
    restarts: deque[float] = field(default_factory=deque)  # monotonic timestamps, oldest first

    def find(self, child_id: str) -> ChildRec | None:
        for rec in self.children:
            if rec.id == child_id:
                return rec
        return None

    def index(self, child_id: str) -> int:
        for i, rec in enumerate(self.children):
            if rec.id == child_id:
                return i
        raise KeyError(child_id)


# -- facts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExitFacts:
    """How a child ended, as the engine saw it; what it means is decided here."""

    code: int | None = None  # exit code; None when killed by a signal (or for a supervisor)
    signal: int | None = None
    requested: bool = False  # the supervisor asked it to stop
    fault: str | None = None  # killed by the supervisor for a fault: "hang", "memory", a protocol error
    drained: str | None = None  # it had been asked to drain: "memory" or "lifetime"
    gave_up: bool = False  # a child supervisor that gave up (OTP: exit reason shutdown)
    killed: bool = False  # a child supervisor that was killed, not stopped in order


def is_normal(facts: ExitFacts) -> bool:
    """OTP's ``normal``/``shutdown`` exit reasons, for an OS process or a child supervisor."""
    if facts.fault is not None or facts.killed:
        return False
    return facts.requested or facts.gave_up or facts.code == 0


class Cause(enum.StrEnum):
    """Why a child is started again (a metric label: otp_agents_restarts_total{reason})."""

    CRASH = "crash"
    HANG = "hang"
    MEMORY = "memory"
    ESCALATION = "escalation"  # a child supervisor gave up
    OPERATOR = "operator"  # otp-agents restart
    MEMORY_RECYCLE = "memory_recycle"
    LIFETIME_RECYCLE = "lifetime_recycle"


def cause_of(facts: ExitFacts) -> Cause:
    if facts.gave_up:
        return Cause.ESCALATION
    if facts.fault in (Cause.HANG, Cause.MEMORY):
        return Cause(facts.fault)
    return Cause.CRASH


# -- decisions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nothing:
    """No restart: the child stays stopped (or was removed)."""

    removed: bool = False


@dataclass(frozen=True)
class Restart:
    """Terminate ``terminate`` (in that order), then start ``start`` (in that order), after
    ``delay`` seconds (backoff). Temporary siblings appear in ``terminate`` but not in ``start``:
    they are dropped."""

    child: str
    terminate: tuple[str, ...]
    start: tuple[str, ...]
    cause: Cause = Cause.CRASH
    delay: float = 0.0


@dataclass(frozen=True)
class Recycle:
    """A drained child ended as asked: start it again alone, uncounted (``restart`` False: it
    was temporary and has left the list)."""

    child: str
    why: str  # memory | lifetime
    restart: bool

    @property
    def cause(self) -> Cause:
        return Cause(f"{self.why}_recycle") if self.why in ("memory", "lifetime") else Cause.CRASH


class GiveUpReason(enum.StrEnum):
    INTENSITY = "reached_max_restart_intensity"
    AUTO_SHUTDOWN = "auto_shutdown"


@dataclass(frozen=True)
class GiveUp:
    """Terminate every child in reverse start order, then exit with reason ``shutdown``."""

    reason: GiveUpReason
    child: str


Decision = Nothing | Restart | Recycle | GiveUp


# -- the rules ---------------------------------------------------------------------------------


def on_exit(state: SupState, child_id: str, facts: ExitFacts, now: float, rand: float = 0.5) -> Decision:
    """A running child ended without the supervisor asking. Decide what to do. ``rand`` in
    [0, 1) draws the backoff's jitter (the engine passes ``random.random()``; tests fix it)."""
    rec = state.find(child_id)
    if rec is None or rec.status is not Status.RUNNING:
        return Nothing()  # stale news: the supervisor already dealt with this child
    rec.status = Status.STOPPED
    normal = is_normal(facts)
    if facts.drained is not None and normal:
        if rec.restart is RestartType.TEMPORARY:
            state.children.remove(rec)
            return Recycle(child_id, facts.drained, restart=False)
        return Recycle(child_id, facts.drained, restart=True)
    if rec.restart is RestartType.PERMANENT or (rec.restart is RestartType.TRANSIENT and not normal):
        return _restart(state, rec, now, cause_of(facts), rand)
    removed = _forget(state, rec)
    return _auto_shutdown(state, rec) or Nothing(removed=removed)


def try_again(state: SupState, child_id: str, now: float) -> Decision:
    """The retry that a failed restart scheduled (OTP's ``try_again_restart``): no new delay."""
    rec = state.find(child_id)
    if rec is None or rec.status is not Status.RESTARTING:
        return Nothing()
    decision = _restart(state, rec, now, Cause.CRASH, None)
    return decision


def start_failed(state: SupState, failed_id: str, now: float, rand: float = 0.5) -> float:
    """A start within a restart plan failed: the child is ``restarting`` and will be retried
    after the delay returned (its backoff's next step; 0 without backoff).

    The children of the plan after it stay stopped; the retry's own plan starts them.
    """
    rec = state.find(failed_id)
    if rec is None:
        return 0.0
    rec.status = Status.RESTARTING
    return _backoff(rec, now, rand)


def delayed(state: SupState, child_id: str) -> None:
    """A restart waits for its backoff delay: the child is ``restarting`` until then."""
    rec = state.find(child_id)
    if rec is not None:
        rec.status = Status.RESTARTING


def due(state: SupState, child_id: str) -> bool:
    """The backoff delay is over: True if the child is still waiting to be started."""
    rec = state.find(child_id)
    if rec is None or rec.status is not Status.RESTARTING:
        return False
    rec.status = Status.STOPPED
    return True


def child_started(state: SupState, child_id: str, now: float = 0.0) -> None:
    rec = state.find(child_id)
    if rec is not None:
        rec.status = Status.RUNNING
        rec.started_at = now


def child_terminated(state: SupState, child_id: str) -> bool:
    """The supervisor stopped a child itself. Returns True if the child was removed (temporary)."""
    rec = state.find(child_id)
    if rec is None:
        return False
    rec.status = Status.STOPPED
    return _forget(state, rec)


def shutdown_order(state: SupState) -> list[str]:
    """Children to terminate when the supervisor stops: running ones, reverse start order."""
    return [rec.id for rec in reversed(state.children) if rec.status is Status.RUNNING]


def add_restart(state: SupState, now: float) -> bool:
    """Record a restart; False if that exceeds ``intensity`` restarts within ``period``."""
    threshold = now - state.period
    while state.restarts and state.restarts[0] < threshold:
        state.restarts.popleft()
    state.restarts.append(now)
    return len(state.restarts) <= state.intensity


# -- internals ---------------------------------------------------------------------------------


def _restart(state: SupState, rec: ChildRec, now: float, cause: Cause, rand: float | None) -> Decision:
    if not add_restart(state, now):
        rec.status = Status.STOPPED
        _forget(state, rec)
        return GiveUp(GiveUpReason.INTENSITY, rec.id)
    delay = _backoff(rec, now, rand) if rand is not None else 0.0
    if state.strategy in (Strategy.ONE_FOR_ONE, Strategy.SIMPLE_ONE_FOR_ONE):
        return Restart(rec.id, terminate=(), start=(rec.id,), cause=cause, delay=delay)
    pos = state.index(rec.id)
    if state.strategy is Strategy.REST_FOR_ONE:
        affected = state.children[pos:]
    else:  # one_for_all
        affected = state.children
    others = [c for c in affected if c is not rec]
    terminate = tuple(c.id for c in reversed(others) if c.status is Status.RUNNING)
    start = tuple(
        c.id for c in affected if c is rec or (c.restart is not RestartType.TEMPORARY and not c.held)
    )
    return Restart(rec.id, terminate=terminate, start=start, cause=cause, delay=delay)


def _backoff(rec: ChildRec, now: float, rand: float) -> float:
    """``min(max, initial * factor**n) * (1 + jitter * U(-1, 1))``, n counting the restarts since
    the child last ran ``reset_after`` seconds."""
    backoff = rec.backoff
    if backoff is None:
        return 0.0
    if rec.started_at is not None and now - rec.started_at >= backoff.reset_after:
        rec.in_a_row = 0
    n = rec.in_a_row
    rec.in_a_row += 1
    base = min(backoff.max, backoff.initial * backoff.factor**n)
    return max(0.0, base * (1 + backoff.jitter * (2 * rand - 1)))


def _forget(state: SupState, rec: ChildRec) -> bool:
    """OTP's del_child: temporary children leave the list, others stay, stopped.

    Dynamic children of a simple_one_for_one supervisor always leave (they have no static slot).
    """
    if rec.restart is RestartType.TEMPORARY or state.strategy is Strategy.SIMPLE_ONE_FOR_ONE:
        state.children.remove(rec)
        return True
    return False


def _auto_shutdown(state: SupState, rec: ChildRec) -> GiveUp | None:
    if state.auto_shutdown is AutoShutdown.NEVER or not rec.significant:
        return None
    if state.auto_shutdown is AutoShutdown.ANY_SIGNIFICANT:
        return GiveUp(GiveUpReason.AUTO_SHUTDOWN, rec.id)
    left = any(c.significant and c.status is not Status.STOPPED for c in state.children)
    return None if left else GiveUp(GiveUpReason.AUTO_SHUTDOWN, rec.id)
