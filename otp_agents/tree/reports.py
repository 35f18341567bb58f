"""What a supervisor says about its children: the events of an exit, a termination and a failed
start, and the record of the last one on the child's slot (what ``status`` shows when it is down)."""

from __future__ import annotations

import time

from otp_agents.events import EventBus, Kind
from otp_agents.linux import signal_name
from otp_agents.tree import rules
from otp_agents.tree.node import LastExit, Node, Slot
from otp_agents.tree.ports import ChildHandle

OUTPUT_LINES = 5  # stderr lines attached to an exit


def exited(bus: EventBus, slot: Slot, instance: ChildHandle | Node, facts: rules.ExitFacts) -> None:
    """It ended without being asked."""
    if isinstance(instance, Node) or instance.exit is None:
        return
    reason = facts.fault or ("normal" if rules.is_normal(facts) else "crash")
    output = tuple(instance.last_output[-OUTPUT_LINES:])
    slot.last_exit = LastExit(instance.exit.describe(), reason, time.time(), instance.last_words, output)
    bus.emit(
        Kind.CHILD_EXITED,
        slot.path,
        pid=instance.pid,
        code=facts.code,
        signal=_signame(facts.signal),
        requested=False,
        reason=reason,
        detail=instance.last_words,
        output="\n".join(output) or None,
    )


def terminated(bus: EventBus, slot: Slot, proc: ChildHandle, killed: bool) -> None:
    """Its supervisor stopped it."""
    end = proc.exit
    st = end.status if end else None
    slot.last_exit = LastExit(end.describe() if end else "stopped", "stopped", time.time())
    bus.emit(
        Kind.CHILD_TERMINATED,
        slot.path,
        pid=proc.pid,
        code=st.code if st else None,
        signal=_signame(st.signal) if st else None,
        requested=True,
        killed=killed,
    )


def start_failed(bus: EventBus, slot: Slot, error: Exception) -> None:
    slot.last_exit = LastExit("not started", "start_failed", time.time(), str(error))
    bus.emit(Kind.START_FAILED, slot.path, detail=str(error))


def _signame(sig: int | None) -> str | None:
    return signal_name(sig) if sig is not None else None
