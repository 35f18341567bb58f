"""Health monitors of one running child: heartbeat, memory breaker, lifetime limit.

They run beside the child handle and act on the process directly; they never reach into the
supervisor. What they do is seen by the supervisor only as the way the process ended:

* **hang** (no pong for ``ping_timeout``) and **memory** (over ``memory_limit_mb``): stack dump,
  then SIGKILL to the group; the exit is a crash with that reason, handled by the strategy;
* **drain** (over ``memory_soft_mb``, or ``max_lifetime`` reached): the child is asked to finish
  and exit; its exit is a *recycle*: restarted by its restart type, not counted as a crash.

Heartbeats: the supervisor pings each protocol worker every ``ping_interval``, starting at a
random phase so a fleet's pings are spread over the interval; one task serves every worker
(:class:`Heartbeats`). The worker echoes the ping's own
timestamp from its event loop, so the round-trip time is measured on the supervisor's clock and
a stalled worker loop shows up as a missing pong, not as a wrong number.
"""

from __future__ import annotations

import random
import time
from typing import Protocol

import anyio

from otp_agents.events import Kind
from otp_agents.health.actions import drain, kill_soon
from otp_agents.health.heartbeat import Heartbeats
from otp_agents.health.host import HealthHost
from otp_agents.health.memory import MemoryWatch
from otp_agents.proc.handle import ChildProcess


class MonitorHost(HealthHost, Protocol):
    @property
    def heartbeats(self) -> Heartbeats: ...

    @property
    def memory(self) -> MemoryWatch: ...


async def watch(proc: ChildProcess, host: MonitorHost) -> None:
    """Run every monitor that applies to ``proc`` until it exits; after a reload changed its
    settings in place, the monitors start over with the new ones (its lifetime still counts
    from when it was first watched)."""
    while proc.exit is None:
        changed = proc.respecified = anyio.Event()
        s = proc.spec.settings
        async with anyio.create_task_group() as tg:
            if proc.channel is not None:
                host.heartbeats.add(proc)
            if s.max_lifetime is not None:
                tg.start_soon(_lifetime, proc, host)
            if s.watches_memory:
                host.memory.add(
                    proc, lambda p, mb: drain(p, host, "memory"), lambda p, mb: kill_soon(p, host, "memory")
                )

            tg.start_soon(_until_set, changed, tg.cancel_scope)
            try:
                await proc.exited.wait()
            finally:
                host.memory.remove(proc)
                host.heartbeats.remove(proc)
                tg.cancel_scope.cancel()


async def _until_set(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


# -- lifetime ----------------------------------------------------------------------------------


async def _lifetime(proc: ChildProcess, host: HealthHost) -> None:
    s = proc.spec.settings
    assert s.max_lifetime is not None
    # Jitter only shortens the lifetime, so that a fleet started together does not recycle
    # together; drawn once per process, so a reload of the limit keeps it.
    if proc.lifetime_factor is None:  # its lifetime counts from when it was first watched
        proc.lifetime_factor, proc.lifetime_from = random.random(), time.monotonic()
    limit = s.max_lifetime * (1 - s.lifetime_jitter * proc.lifetime_factor)
    await anyio.sleep(max(0.0, proc.lifetime_from + limit - time.monotonic()))
    if proc.exit is not None:
        return
    host.bus.emit(Kind.LIFETIME, proc.path, pid=proc.pid, value=round(limit, 3), threshold=s.max_lifetime)
    drain(proc, host, "lifetime")
    shutdown = proc.spec.shutdown
    if shutdown == "infinity":
        return
    if shutdown != "brutal_kill":
        with anyio.move_on_after(float(shutdown)):
            await proc.exited.wait()
            return
        await host.dumper.take(proc, "lifetime_shutdown_timeout")
    proc.kill()
