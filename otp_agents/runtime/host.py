"""The runtime's host: the one object that joins the engine, the process handles and the monitors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio.abc

from otp_agents.events import EventBus
from otp_agents.health import monitors
from otp_agents.health.dump import Dumper
from otp_agents.health.heartbeat import Heartbeats
from otp_agents.health.memory import MemoryWatch
from otp_agents.proc.guard import Guard
from otp_agents.proc.handle import ChildProcess
from otp_agents.proc.spawn import spawn
from otp_agents.proc.zygote_client import ZygoteClient
from otp_agents.retention import Retention
from otp_agents.runtime.checkpoint import CheckpointStore
from otp_agents.runtime.frames import serve as serve_frame
from otp_agents.runtime.logs import ChildLogs
from otp_agents.runtime.services import withdraw_all
from otp_agents.spec.model import ProcessSpec
from otp_agents.wire.messages import Message, Report


@dataclass
class Host:
    """The runtime around the processes: the engine's host (``spawn`` = start the process and its
    monitors), the process handles' host (tracking, dumps before kills, frames), and the shared
    registries (services, zygotes, checkpoints)."""

    tg: anyio.abc.TaskGroup
    bus: EventBus
    state_dir: Path
    tracked: dict[int, str] = field(default_factory=dict)  # pid -> path, for pids with a watcher
    sweep: Callable[[], None] = lambda: None  # after each reap: sweep adopted orphans (a subreaper's)
    guard: Guard | None = None  # kills our process groups if this process dies
    stopping: bool = False  # the whole tree is being stopped: start nothing new
    on_rtt: Callable[[str, float], None] | None = None  # heartbeat round trips, for metrics
    on_report: Callable[[str, Report], None] | None = None  # worker measurements, for metrics
    # Services workers offer each other (Publish/Lookup): name -> (address, publisher path, pid).
    services: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    # Zygotes: image -> the path of its zygote child; and our connection to each running one.
    zygotes: dict[str, str] = field(default_factory=dict)
    zygote_clients: dict[str, ZygoteClient] = field(default_factory=dict)
    forks_in_flight: int = 0  # zygote forks not yet tracked: the orphan sweep waits for them
    retention: Retention = field(default_factory=Retention)  # dumps kept, the events file rotated
    dumper: Dumper = field(init=False)
    memory: MemoryWatch = field(init=False)
    heartbeats: Heartbeats = field(init=False)
    checkpoints: CheckpointStore = field(init=False)
    logs: ChildLogs = field(init=False)

    def __post_init__(self) -> None:
        self.dumper = Dumper(self.state_dir, self.bus, self.tracked, self.retention)
        self.memory = MemoryWatch(self.bus)
        self.heartbeats = Heartbeats(self)
        self.checkpoints = CheckpointStore(self.state_dir, self.bus, self.tg)
        self.logs = ChildLogs(self.state_dir)

    # -- the engine's port (tree/ports.py) -------------------------------------------------------

    async def spawn(
        self, path: str, spec: ProcessSpec, on_exit: Callable[[ChildProcess], None]
    ) -> ChildProcess:
        """Start the process, then its monitors beside it."""
        proc = await spawn(path, spec, self, on_exit)
        self.tg.start_soon(monitors.watch, proc, self, name=f"health {path}")
        return proc

    async def clear_checkpoints_under(self, path: str) -> None:
        await self.checkpoints.clear_under(path)

    def forget_checkpoint(self, path: str) -> None:
        self.checkpoints.clear(path)

    # -- the process handles' port (proc/handle.py, proc/spawn.py) ------------------------------

    def after_reap(self) -> None:
        self.sweep()

    async def before_kill(self, proc: ChildProcess, why: str) -> None:
        await self.dumper.take(proc, why)

    def on_frame(self, proc: ChildProcess, msg: Message) -> None:
        serve_frame(self, proc, msg)

    def on_gone(self, proc: ChildProcess) -> None:
        withdraw_all(self, proc)

    async def on_output(self, proc: ChildProcess, stream: str, line: str) -> None:
        await self.logs.write(proc, stream, line)

    def signal_file(self, path: str) -> str:
        return self.dumper.signal_file(path)

    async def checkpoint(self, path: str, limit: int) -> bytes | None:
        return await self.checkpoints.get(path, limit)
