"""What the engine needs from the world around it, as small Protocols (the runtime implements
them): a host that starts processes and keeps their checkpoints, and a handle per running process.
The engine never imports the process layer; the process layer never imports the engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import anyio.abc

from otp_agents.events import EventBus
from otp_agents.linux import ExitStatus
from otp_agents.spec.model import ProcessSpec


class ExitReport(Protocol):
    """How one process ended."""

    @property
    def status(self) -> ExitStatus: ...

    @property
    def requested(self) -> bool:
        """The supervisor asked it to stop."""

    @property
    def fault(self) -> str | None:
        """Killed by the supervisor for a fault: a protocol error, or a monitor's reason."""

    def describe(self) -> str: ...


class ChildHandle(Protocol):
    """One running OS process."""

    @property
    def pid(self) -> int: ...

    @property
    def forked_from(self) -> str | None:
        """The zygote image it was forked from, if it was."""

    @property
    def recycle(self) -> str | None:
        """Set when it was asked to drain (memory_soft, lifetime): its exit is a recycle."""

    @property
    def last_words(self) -> str | None:
        """The reason it gave in its Bye, if it stated one."""

    @property
    def exit(self) -> ExitReport | None: ...

    @property
    def last_output(self) -> list[str]:
        """The last lines it wrote on stderr."""

    async def stop(self) -> bool:
        """The stop ladder; True if it needed SIGKILL."""

    def kill(self) -> None: ...

    async def wait_killed(self) -> None: ...

    def respec(self, spec: ProcessSpec) -> None:
        """A reload changed only how it is supervised: same process, new settings."""


class EngineHost(Protocol):
    @property
    def tg(self) -> anyio.abc.TaskGroup: ...

    @property
    def bus(self) -> EventBus: ...

    @property
    def stopping(self) -> bool:
        """The whole tree is being stopped: start nothing new."""

    async def spawn(
        self, path: str, spec: ProcessSpec, on_exit: Callable[[ChildHandle], None]
    ) -> ChildHandle:
        """Start the process (and whatever watches it); raises StartError."""

    async def clear_checkpoints_under(self, path: str) -> None: ...

    def forget_checkpoint(self, path: str) -> None: ...
