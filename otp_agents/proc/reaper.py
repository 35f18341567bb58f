"""Orphans: processes of the tree that left their process group (``setsid``, double forks) and
were adopted by the supervisor, a child subreaper. They are reaped when they end
(``orphan_reaped``, attributed to the child whose group they were in) and killed at the end."""

from __future__ import annotations

import os
import signal
from contextlib import suppress
from typing import Protocol

import anyio

from otp_agents import linux
from otp_agents.events import EventBus, Kind
from otp_agents.proc.guard import Guard


class ReaperHost(Protocol):
    @property
    def bus(self) -> EventBus: ...

    @property
    def tracked(self) -> dict[int, str]: ...

    @property
    def guard(self) -> Guard | None: ...

    @property
    def forks_in_flight(self) -> int: ...


def sweep_orphans(host: ReaperHost, root: str) -> None:
    if host.forks_in_flight:  # a forked worker may be ours already but not tracked yet
        return
    for pid, pgid, status in linux.reap_orphans(host.tracked):
        # An orphan still in a child's process group is attributed to that child.
        owner = host.tracked.get(pgid, root) if pgid is not None else root
        host.bus.emit(Kind.ORPHAN_REAPED, owner, pid=pid, code=status.code, signal=_sig(status.signal))


def _sig(sig: int | None) -> str | None:
    return linux.signal_name(sig) if sig is not None else None


async def reap_on_sigchld(host: ReaperHost, root: str) -> None:
    with anyio.open_signal_receiver(signal.SIGCHLD) as signals:
        sweep_orphans(host, root)
        async for _ in signals:
            sweep_orphans(host, root)


async def kill_adopted(host: ReaperHost, root: str) -> None:
    """At the very end: adopted descendants that escaped their process group die too."""
    for _ in range(3):
        keeper = host.guard.pid if host.guard is not None else None
        strays = [pid for pid in linux.child_pids() if pid not in host.tracked and pid != keeper]
        if not strays:
            return
        for pid in strays:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await anyio.sleep(0.05)
        sweep_orphans(host, root)
