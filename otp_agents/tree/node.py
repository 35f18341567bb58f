"""What a running supervisor node is made of, as the rest of the engine and the operator plane
see it: its child slots, the rows of ``which_children``, how it ended, and :class:`Node`, the
base every supervisor node derives from (its start, its operator requests and its engine live in
``startup.py``, ``operations.py`` and ``supervisor.py``)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio

from otp_agents.errors import ChildNotFound
from otp_agents.spec.model import ChildSpec, SupervisorSpec
from otp_agents.tree import rules
from otp_agents.tree.ports import ChildHandle, EngineHost
from otp_agents.tree.rules import Status


@dataclass(frozen=True)
class SupervisorExit:
    """How a supervisor ended. Like OTP, a supervisor that gives up exits with ``shutdown``."""

    reason: str  # "shutdown" (asked), reached_max_restart_intensity, auto_shutdown, killed
    requested: bool
    child: str | None = None  # the child whose exit made it give up
    cause: str | None = None  # how that child ended

    def describe(self) -> str:
        if self.child is None:
            return self.reason
        if self.cause is None:
            return f"{self.reason} after {self.child} ended"
        return f"{self.reason} after {self.child} ended ({self.cause})"


@dataclass
class Slot:
    """A child position: its spec, its path and the running instance, if any."""

    spec: ChildSpec
    path: str
    instance: ChildHandle | Node | None = None
    started_at: float = 0.0
    restarts: int = 0  # restarts of this child since the supervisor started
    last_exit: LastExit | None = None  # how its last instance ended (or failed to start)
    retry_at: float | None = None  # while restarting: when the next start is tried (monotonic)

    @property
    def id(self) -> str:
        return self.spec.id


@dataclass(frozen=True)
class LastExit:
    """How a child's last instance ended, for ``status`` to say why it is down."""

    how: str  # "exit code 3", "killed by SIGKILL", "not started"
    reason: str  # crash | normal | stopped | hang | memory | start_failed | a protocol error
    at: float  # wall clock
    detail: str | None = None  # its stated reason (Bye), or the start error
    output: tuple[str, ...] = ()  # the last lines of its stderr


@dataclass(frozen=True)
class ChildInfo:
    """One row of ``which_children``."""

    id: str
    path: str
    kind: str  # worker | command | supervisor
    status: str  # running | stopped | restarting | held (stopped by an operator)
    pid: int | None
    restarts: int
    started_at: float | None


class Node:
    """A running supervisor node: the state every part of the engine works on, and the few
    operations one part asks of another. Built only as a :class:`~otp_agents.tree.supervisor.Supervisor`."""

    spec: SupervisorSpec
    path: str
    host: EngineHost
    exit: SupervisorExit | None
    finished: anyio.Event
    started_at: float
    state: rules.SupState
    slots: dict[str, Slot]

    def __init__(self, spec: SupervisorSpec, path: str, host: EngineHost) -> None:
        self.spec = spec
        self.path = path
        self.host = host
        self.exit = None
        self.finished = anyio.Event()
        self.started_at = time.monotonic()
        self.state = rules.SupState(
            strategy=spec.strategy,
            intensity=spec.intensity,
            period=spec.period,
            auto_shutdown=spec.auto_shutdown,
        )
        self.slots = {}

    async def stop(self) -> None:
        raise NotImplementedError

    async def stop_within(self, shutdown: float | str) -> bool:
        raise NotImplementedError

    async def kill(self) -> None:
        raise NotImplementedError

    async def apply_spec(self, new: SupervisorSpec) -> list[str]:
        raise NotImplementedError

    async def _call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        raise NotImplementedError

    async def _start_slot(self, slot: Slot) -> None:
        raise NotImplementedError

    async def _terminate_slot(self, cid: str) -> None:
        raise NotImplementedError

    async def _terminate_all(self) -> None:
        raise NotImplementedError

    def _add_slot(self, spec: ChildSpec) -> Slot:
        slot = Slot(spec=spec, path=f"{self.path}/{spec.id}")
        self.slots[spec.id] = slot
        self.state.children.append(
            rules.ChildRec(spec.id, spec.restart, spec.significant, backoff=spec.backoff)
        )
        return slot

    def which_children(self) -> list[ChildInfo]:
        """Answered from current state, without waiting for the mailbox."""
        out = []
        for rec in self.state.children:
            slot = self.slots[rec.id]
            inst = slot.instance
            kind = "supervisor" if isinstance(slot.spec, SupervisorSpec) else slot.spec.__struct_config__.tag
            out.append(
                ChildInfo(
                    id=rec.id,
                    path=slot.path,
                    kind=str(kind),
                    status="held" if rec.held and rec.status is not Status.RUNNING else rec.status.value,
                    pid=inst.pid if inst is not None and not isinstance(inst, Node) else None,
                    restarts=slot.restarts,
                    started_at=slot.started_at if inst is not None else None,
                )
            )
        return out

    def child(self, child_id: str) -> Slot:
        try:
            return self.slots[child_id]
        except KeyError:
            raise ChildNotFound(f"{self.path}/{child_id}") from None

    def _all_slots(self) -> list[tuple[Node, Slot]]:
        out: list[tuple[Node, Slot]] = []
        for slot in self.slots.values():
            out.append((self, slot))
            if isinstance(slot.instance, Node):
                out.extend(slot.instance._all_slots())
        return out
