"""What happens when a child dies: Erlang/OTP's supervisor rules as pure functions.

This module is the whole decision logic of a supervisor and does no I/O. The engine
(``supervisor.py``) feeds it one event at a time and carries out the plan it returns; a
differential test runs the same trees and faults through OTP's own ``supervisor`` module.

The rules, as OTP states them (``lib/stdlib/src/supervisor.erl``):

* **Restart type.** ``permanent`` children are always restarted. ``transient`` children are
  restarted only after an abnormal exit; for an OS process *normal* means exit code 0, or an exit
  the supervisor itself asked for. ``temporary`` children are never restarted and are removed
  from the child list when they end, including when a sibling's restart takes them down.
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
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from otp_agents.spec.model import AutoShutdown, RestartType, Strategy


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


# -- decisions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nothing:
    """No restart: the child stays stopped (or was removed)."""

    removed: bool = False


@dataclass(frozen=True)
class Restart:
    """Terminate ``terminate`` (in that order), then start ``start`` (in that order).

    Temporary siblings appear in ``terminate`` but not in ``start``: they are dropped.
    """

    child: str
    terminate: tuple[str, ...]
    start: tuple[str, ...]


class GiveUpReason(enum.StrEnum):
    INTENSITY = "reached_max_restart_intensity"
    AUTO_SHUTDOWN = "auto_shutdown"


@dataclass(frozen=True)
class GiveUp:
    """Terminate every child in reverse start order, then exit with reason ``shutdown``."""

    reason: GiveUpReason
    child: str


Decision = Nothing | Restart | GiveUp


# -- the rules ---------------------------------------------------------------------------------


def is_normal_exit(code: int | None, requested: bool) -> bool:
    """OTP's normal/shutdown reasons, for an OS process."""
    return requested or code == 0


def child_exited(state: SupState, child_id: str, normal: bool, now: float) -> Decision:
    """A running child ended without the supervisor asking. Decide what to do."""
    rec = state.find(child_id)
    if rec is None or rec.status is not Status.RUNNING:
        return Nothing()  # stale news: the supervisor already dealt with this child
    rec.status = Status.STOPPED
    if rec.restart is RestartType.PERMANENT or (rec.restart is RestartType.TRANSIENT and not normal):
        return _restart(state, rec, now)
    removed = _forget(state, rec)
    return _auto_shutdown(state, rec) or Nothing(removed=removed)


def try_again(state: SupState, child_id: str, now: float) -> Decision:
    """The retry that a failed restart scheduled (OTP's ``try_again_restart``)."""
    rec = state.find(child_id)
    if rec is None or rec.status is not Status.RESTARTING:
        return Nothing()
    return _restart(state, rec, now)


def start_failed(state: SupState, failed_id: str) -> None:
    """A start within a restart plan failed: the child is ``restarting`` and will be retried.

    The children of the plan after it stay stopped; the retry's own plan starts them.
    """
    rec = state.find(failed_id)
    if rec is not None:
        rec.status = Status.RESTARTING


def child_started(state: SupState, child_id: str) -> None:
    rec = state.find(child_id)
    if rec is not None:
        rec.status = Status.RUNNING


def child_terminated(state: SupState, child_id: str) -> bool:
    """The supervisor stopped a child itself. Returns True if the child was removed (temporary)."""
    rec = state.find(child_id)
    if rec is None:
        return False
    rec.status = Status.STOPPED
    return _forget(state, rec)


def child_recycled(state: SupState, child_id: str) -> bool:
    """A child ended after the supervisor asked it to drain (memory soft limit, lifetime).

    Not a crash and not counted against intensity: the child starts again unless its restart
    type says it never restarts (temporary, which leaves the list). Returns True to restart.
    """
    rec = state.find(child_id)
    if rec is None:
        return False
    rec.status = Status.STOPPED
    if rec.restart is RestartType.TEMPORARY:
        state.children.remove(rec)
        return False
    return True


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


def _restart(state: SupState, rec: ChildRec, now: float) -> Decision:
    if not add_restart(state, now):
        rec.status = Status.STOPPED
        _forget(state, rec)
        return GiveUp(GiveUpReason.INTENSITY, rec.id)
    if state.strategy in (Strategy.ONE_FOR_ONE, Strategy.SIMPLE_ONE_FOR_ONE):
        return Restart(rec.id, terminate=(), start=(rec.id,))
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
    return Restart(rec.id, terminate=terminate, start=start)


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
