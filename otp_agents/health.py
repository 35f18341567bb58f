"""Health monitors of one running child: heartbeat, memory breaker, lifetime limit.

They run beside the child handle and act on the process directly; they never reach into the
supervisor. What they do is seen by the supervisor only as the way the process ended:

* **hang** (no pong for ``ping_timeout``) and **memory** (over ``memory_limit_mb``): stack dump,
  then SIGKILL to the group; the exit is a crash with that reason, handled by the strategy;
* **drain** (over ``memory_soft_mb``, or ``max_lifetime`` reached): the child is asked to finish
  and exit; its exit is a *recycle*: restarted by its restart type, not counted as a crash.

Heartbeats: the supervisor pings each protocol worker every ``ping_interval``, starting at a
random phase so a fleet's pings are spread over the interval. The worker echoes the ping's own
timestamp from its event loop, so the round-trip time is measured on the supervisor's clock and
a stalled worker loop shows up as a missing pong, not as a wrong number.
"""

from __future__ import annotations

import math
import random
import time
from typing import TYPE_CHECKING

import anyio

from . import linux
from .events import Kind
from .messages import Drain, Ping, Pong

if TYPE_CHECKING:
    from .process import ChildProcess, Host

SLOW_PING_EVERY = 30.0  # at most one slow_ping event per child in this many seconds
PING_SLOT = 0.05  # seconds


async def watch(proc: ChildProcess, host: Host) -> None:
    """Run every monitor that applies to ``proc`` until it exits."""
    s = proc.spec.settings
    async with anyio.create_task_group() as tg:
        if proc.channel is not None:
            tg.start_soon(_heartbeat, proc, host)
        if s.max_lifetime is not None:
            tg.start_soon(_lifetime, proc, host)
        if s.watches_memory:
            host.memory.add(
                proc, lambda p, mb: drain(p, host, "memory"), lambda p, mb: _kill_soon(p, host, "memory")
            )
        try:
            await proc.exited.wait()
        finally:
            host.memory.remove(proc)
            tg.cancel_scope.cancel()


# -- heartbeat ---------------------------------------------------------------------------------


async def _heartbeat(proc: ChildProcess, host: Host) -> None:
    s = proc.spec.settings
    channel = proc.channel
    assert channel is not None
    next_ping = _slot(time.monotonic() + random.uniform(0, s.ping_interval))  # spread a fleet's pings
    seq = 0
    while proc.exit is None:
        now = time.monotonic()
        silent = now - proc.last_pong
        if silent >= s.ping_timeout:
            host.bus.emit(
                Kind.HANG,
                proc.path,
                pid=proc.pid,
                value=round(silent, 3),
                threshold=s.ping_timeout,
                detail=f"no pong for {silent:.1f}s ({linux_state(proc.pid)})",
            )
            await kill_for(proc, host, "hang")
            return
        if now >= next_ping:
            seq += 1
            next_ping = _slot(max(next_ping + s.ping_interval, now))
            try:
                await channel.send(Ping(seq=seq, sent_ns=time.monotonic_ns()), timeout=s.ping_interval)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return  # the process is going away; its exit says how
        # Wake for the next ping, or exactly when the silence would reach ping_timeout.
        wake = min(next_ping, proc.last_pong + s.ping_timeout)
        await anyio.sleep(max(0.0, wake - time.monotonic()))


def _slot(t: float) -> float:
    """Round a ping time up to the next PING_SLOT boundary: pings of a large fleet are still
    spread over the interval, but fall into a few shared instants, so the event loop wakes once
    per slot for many children instead of once per child."""
    return math.ceil(t / PING_SLOT) * PING_SLOT


def on_pong(proc: ChildProcess, pong: Pong, host: Host) -> None:
    """Called by the channel reader: record the true round trip, warn when it is slow."""
    now_ns = time.monotonic_ns()
    rtt = (now_ns - pong.sent_ns) / 1e9
    if rtt < 0:
        return  # not a timestamp of ours
    proc.last_pong = now_ns / 1e9
    proc.rtt = rtt
    if host.on_rtt is not None:
        host.on_rtt(proc.path, rtt)
    proc.loop_lag_ms = pong.loop_lag_ms
    s = proc.spec.settings
    if rtt > s.high_ping_threshold and proc.last_pong - proc.slow_ping_at >= SLOW_PING_EVERY:
        proc.slow_ping_at = proc.last_pong
        host.bus.emit(
            Kind.SLOW_PING,
            proc.path,
            pid=proc.pid,
            value=round(rtt * 1000, 3),
            threshold=s.high_ping_threshold * 1000,
            detail=f"loop lag {pong.loop_lag_ms:.1f} ms",
        )


def linux_state(pid: int) -> str:
    fields = linux.stat_fields(pid)
    return f"state {fields[0].decode()}" if fields else "gone"


# -- lifetime ----------------------------------------------------------------------------------


async def _lifetime(proc: ChildProcess, host: Host) -> None:
    s = proc.spec.settings
    assert s.max_lifetime is not None
    # Jitter only shortens the lifetime, so that a fleet started together does not recycle together.
    limit = s.max_lifetime * (1 - s.lifetime_jitter * random.random())
    await anyio.sleep(limit)
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


# -- actions -----------------------------------------------------------------------------------


def drain(proc: ChildProcess, host: Host, reason: str) -> None:
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


def _kill_soon(proc: ChildProcess, host: Host, reason: str) -> None:
    host.tg.start_soon(kill_for, proc, host, reason)


async def kill_for(proc: ChildProcess, host: Host, reason: str) -> None:
    """Dump, then SIGKILL the group; the exit is a crash with ``reason``."""
    if proc.exit is not None or proc.health_kill is not None:
        return
    proc.health_kill = reason
    dump = await host.dumper.take(proc, reason)
    host.bus.emit(Kind.HEALTH_KILL, proc.path, pid=proc.pid, reason=reason, file=str(dump) if dump else None)
    proc.fault(reason)
