"""What a monitor does to a child: ask it to drain (its exit is a recycle), or dump its stacks and
kill it (its exit is a crash with the monitor's reason)."""

from __future__ import annotations

import anyio

from otp_agents.events import Kind
from otp_agents.health.host import HealthHost
from otp_agents.proc.handle import ChildProcess
from otp_agents.wire.messages import Drain


def drain(proc: ChildProcess, host: HealthHost, reason: str) -> None:
    """Ask the child to finish its current work and exit; its exit will be a recycle."""
    if proc.exit is not None or proc.recycle is not None:
        return
    proc.recycle = reason
    if proc.channel is not None:
        channel = proc.channel

        async def send() -> None:
            try:
                with anyio.move_on_after(1.0):
                    await channel.send(Drain(reason=reason))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

        host.tg.start_soon(send)
    else:
        proc.polite_signal()


def kill_soon(proc: ChildProcess, host: HealthHost, reason: str) -> None:
    host.tg.start_soon(kill_for, proc, host, reason)


async def kill_for(proc: ChildProcess, host: HealthHost, reason: str) -> None:
    """Dump, then SIGKILL the group; the exit is a crash with ``reason``."""
    if proc.exit is not None or proc.health_kill is not None:
        return
    proc.health_kill = reason
    dump = await host.dumper.take(proc, reason)
    host.bus.emit(
        Kind.HEALTH_KILL, proc.path, pid=proc.pid, reason=reason, file=str(dump.file) if dump else None
    )
    proc.fault(reason)
