"""What the health monitors need from the runtime around them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import anyio.abc

from otp_agents.events import EventBus
from otp_agents.health.dump import Dump
from otp_agents.proc.handle import ChildProcess


class Dumps(Protocol):
    async def take(self, proc: ChildProcess, reason: str) -> Dump | None:
        """A stack dump of ``proc`` by every route that works; the file, or None."""


class HealthHost(Protocol):
    @property
    def tg(self) -> anyio.abc.TaskGroup: ...

    @property
    def bus(self) -> EventBus: ...

    @property
    def on_rtt(self) -> Callable[[str, float], None] | None:
        """Heartbeat round trips, for metrics."""

    @property
    def dumper(self) -> Dumps: ...
