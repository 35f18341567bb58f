"""Services workers offer each other (``Publish`` / ``Lookup``, PROTOCOL.md section 11): a name
for an address, held by the supervisor for as long as its publisher lives."""

from __future__ import annotations

from typing import Protocol

from otp_agents.events import EventBus, Kind
from otp_agents.proc.handle import ChildProcess
from otp_agents.wire.env import RESERVED_SERVICES
from otp_agents.wire.messages import Located, Lookup, Publish


class Registry(Protocol):
    @property
    def bus(self) -> EventBus: ...

    @property
    def services(self) -> dict[str, tuple[str, str, int]]:
        """name -> (address, publisher path, publisher pid)"""


def publish(host: Registry, proc: ChildProcess, msg: Publish) -> None:
    """Offer (``address`` set) or withdraw (empty) a service under ``msg.name``."""
    services = host.services
    if proc.exit is not None:
        return  # a frame read after its writer's death: nothing may serve at that address
    if msg.name.startswith(RESERVED_SERVICES):
        detail = f"publish refused: {msg.name} is reserved"
        host.bus.emit(Kind.WORKER_LOG, proc.path, pid=proc.pid, reason="error", detail=detail)
        return
    if msg.address:
        services[msg.name] = (msg.address, proc.path, proc.pid)
        host.bus.emit(Kind.SERVICE_UP, proc.path, pid=proc.pid, reason=msg.name, detail=msg.address)
    elif services.get(msg.name, ("", "", 0))[2] == proc.pid:
        del services[msg.name]
        host.bus.emit(Kind.SERVICE_DOWN, proc.path, pid=proc.pid, reason=msg.name)


def lookup(host: Registry, proc: ChildProcess, msg: Lookup) -> None:
    entry = host.services.get(msg.name)
    proc.reply(Located(id=msg.id, name=msg.name, address=entry[0] if entry else None))


def withdraw_all(host: Registry, proc: ChildProcess) -> None:
    """The publisher is gone: so are its services (a restarted one publishes anew)."""
    services = host.services
    for name in [n for n, (_, _, pid) in services.items() if pid == proc.pid]:
        del services[name]
        host.bus.emit(Kind.SERVICE_DOWN, proc.path, pid=proc.pid, reason=name, detail="exited")
