"""What the supervisor does with each frame a running worker sends: one small handler per frame
type, in one table. (The handle serves ``dump`` and ``bye`` itself, and treats a ``hello`` or
``ready`` after the start as a protocol fault.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from otp_agents.events import Kind
from otp_agents.health import heartbeat
from otp_agents.health.host import HealthHost
from otp_agents.proc.handle import ChildProcess
from otp_agents.runtime.checkpoint import CheckpointStore
from otp_agents.runtime.services import Registry, lookup, publish
from otp_agents.spec.model import WorkerSpec
from otp_agents.wire.messages import Checkpoint, Error, Log, Lookup, Message, Pong, Publish, Report


class Host(HealthHost, Registry, Protocol):
    """What serving a frame needs (the runtime's Host)."""

    @property
    def checkpoints(self) -> CheckpointStore: ...

    @property
    def on_report(self) -> Callable[[str, Report], None] | None:
        """Worker measurements, for metrics."""


def _pong(host: Host, proc: ChildProcess, msg: Pong) -> None:
    heartbeat.on_pong(proc, msg, host)


def _log(host: Host, proc: ChildProcess, msg: Log) -> None:
    host.bus.emit(Kind.WORKER_LOG, proc.path, pid=proc.pid, detail=msg.message, code=msg.level)


def _error(host: Host, proc: ChildProcess, msg: Error) -> None:
    host.bus.emit(Kind.WORKER_LOG, proc.path, pid=proc.pid, detail=msg.message, reason="error")


def _checkpoint(host: Host, proc: ChildProcess, msg: Checkpoint) -> None:
    spec = proc.spec
    limit, disk = (
        (spec.checkpoint_max_bytes, spec.checkpoint_store == "disk")
        if isinstance(spec, WorkerSpec)
        else (0, False)
    )
    host.checkpoints.put(proc.path, msg.data, limit, pid=proc.pid, disk=disk)


def _report(host: Host, proc: ChildProcess, msg: Report) -> None:
    labels = ",".join(f"{k}={v}" for k, v in msg.labels.items()) if msg.labels else None
    host.bus.emit(
        Kind.WORKER_REPORT, proc.path, pid=proc.pid, reason=msg.name, value=msg.value, detail=labels
    )
    if host.on_report is not None:
        host.on_report(proc.path, msg)


HANDLERS: dict[type[Any], Callable[[Host, ChildProcess, Any], None]] = {
    Pong: _pong,
    Log: _log,
    Error: _error,
    Checkpoint: _checkpoint,
    Report: _report,
    Publish: publish,
    Lookup: lookup,
}


def serve(host: Host, proc: ChildProcess, msg: Message) -> None:
    handler = HANDLERS.get(type(msg))
    if handler is not None:
        handler(host, proc, msg)
