"""Heartbeats: the supervisor pings each protocol worker every ``ping_interval``, starting at a
random phase so a fleet's pings are spread over the interval; one task serves every worker
(:class:`Heartbeats`). The worker echoes the ping's own timestamp from its event loop, so the
round-trip time is measured on the supervisor's clock and a stalled worker loop shows up as a
missing pong, not as a wrong number: after ``ping_timeout`` without one, a ``hang``: stack dump,
SIGKILL, a crash with reason ``hang``."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import anyio
import anyio.lowlevel

from otp_agents import linux
from otp_agents.events import Kind
from otp_agents.health.actions import kill_for
from otp_agents.health.host import HealthHost
from otp_agents.health.timewheel import TimeWheel
from otp_agents.proc.handle import ChildProcess
from otp_agents.wire.channel import Channel
from otp_agents.wire.messages import Ping, Pong

SLOW_PING_EVERY = 30.0  # at most one slow_ping event per child in this many seconds
PING_SLOT = 0.05  # seconds


@dataclass(eq=False)
class _Beat:
    proc: ChildProcess
    next_ping: float
    seq: int = 0
    sending: bool = False  # a ping is waiting for room in the socket
    gone: bool = False


class Heartbeats:
    """The one heartbeat task: it pings every protocol worker when its ping is due and calls a
    hang when a worker's silence reaches ``ping_timeout``. Workers are filed in a timer wheel of
    PING_SLOT slots, so the loop wakes once per slot for all the pings of that slot, and a ping
    is one non-blocking ``send`` (a task is started only for a worker whose socket is full)."""

    def __init__(self, host: HealthHost) -> None:
        self._host = host
        self._wheel: TimeWheel[_Beat] = TimeWheel(PING_SLOT)
        self._beats: dict[int, _Beat] = {}
        self._changed = anyio.Event()

    def add(self, proc: ChildProcess) -> None:
        # A random first ping spreads a fleet started together over the interval.
        beat = _Beat(proc, time.monotonic() + random.uniform(0, proc.spec.settings.ping_interval))
        self._beats[id(proc)] = beat
        self._file(beat)
        self._changed.set()

    def remove(self, proc: ChildProcess) -> None:
        beat = self._beats.pop(id(proc), None)
        if beat is not None:
            beat.gone = True  # its wheel entry is dropped when its slot comes

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            for beat in self._wheel.take_due(now):
                if not beat.gone:
                    self._serve(beat, now)
            self._changed = anyio.Event()
            delay = self._wheel.next_time() - time.monotonic()
            if delay <= 0:  # behind: let the pong readers run before the next slot
                await anyio.lowlevel.checkpoint()
                continue
            with anyio.move_on_after(min(delay, 3600.0)):
                await self._changed.wait()

    def _file(self, beat: _Beat) -> None:
        # Wake for the next ping, or when the silence would reach ping_timeout (whichever first).
        s = beat.proc.spec.settings
        self._wheel.add(beat, min(beat.next_ping, beat.proc.last_pong + s.ping_timeout))

    def _serve(self, beat: _Beat, now: float) -> None:
        proc, host = beat.proc, self._host
        if proc.exit is not None:
            return
        s = proc.spec.settings
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
            self.remove(proc)
            host.tg.start_soon(kill_for, proc, host, "hang")
            return
        if now >= beat.next_ping:
            beat.seq += 1
            beat.next_ping = max(beat.next_ping + s.ping_interval, now)
            self._ping(beat)
        self._file(beat)

    def _ping(self, beat: _Beat) -> None:
        channel = beat.proc.channel
        if channel is None or beat.sending:
            return  # the last ping still waits for room: a missing pong will tell
        ping = Ping(seq=beat.seq, sent_ns=time.monotonic_ns())
        try:
            if channel.send_nowait(ping):
                return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return  # the process is going away; its exit says how
        beat.sending = True
        self._host.tg.start_soon(self._ping_slowly, beat, channel, ping)

    @staticmethod
    async def _ping_slowly(beat: _Beat, channel: Channel, ping: Ping) -> None:
        try:
            await channel.send(ping, timeout=beat.proc.spec.settings.ping_interval)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            beat.sending = False


def on_pong(proc: ChildProcess, pong: Pong, host: HealthHost) -> None:
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
