"""The event stream: every supervision decision, as a typed record with a timestamp and a path.

Producers call :meth:`EventBus.emit`, which never blocks and never fails: each subscriber has a
bounded buffer and an overflowing subscriber loses events (counted in ``dropped``), never the
supervisor's time. Sinks (the JSON-lines file, the stderr log, later the control socket and
metrics) are subscribers.
"""

from __future__ import annotations

import contextvars
import enum
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import msgspec

from otp_agents.redact import REDACTOR
from otp_agents.retention import DEFAULT, Retention, rotate_if_large

log = logging.getLogger("otp_agents")


class Kind(enum.StrEnum):
    SUPERVISOR_STARTED = "supervisor_started"
    SUPERVISOR_STOPPED = "supervisor_stopped"
    CHILD_STARTED = "child_started"
    START_FAILED = "start_failed"
    CHILD_EXITED = "child_exited"  # ended without the supervisor asking
    CHILD_TERMINATED = "child_terminated"  # stopped by its supervisor
    RESTARTING = "restarting"
    RESTART_DELAYED = "restart_delayed"
    INTENSITY_EXCEEDED = "intensity_exceeded"
    ESCALATED = "escalated"
    AUTO_SHUTDOWN = "auto_shutdown"
    PROTOCOL_ERROR = "protocol_error"
    ORPHAN_REAPED = "orphan_reaped"
    WORKER_LOG = "worker_log"
    WORKER_REPORT = "worker_report"  # a measurement: reason = name, value, detail = "k=v,k=v"
    # crash-resume checkpoints (checkpoint.py)
    CHECKPOINT = "checkpoint"  # kept (value = size in bytes; 0: cleared)
    CHECKPOINT_DROPPED = "checkpoint_dropped"  # refused or unreadable; reason says why
    RESUMED = "resumed"
    # services workers offer each other (Publish / Lookup)
    SERVICE_UP = "service_up"  # reason = service name, detail = address
    SERVICE_DOWN = "service_down"  # a (re)started child was handed its checkpoint (value = size)
    # zygotes (zygote.py)
    ZYGOTE_FALLBACK = "zygote_fallback"  # reason = image, detail = why the child starts cold
    # health monitors
    SLOW_PING = "slow_ping"
    HANG = "hang"
    MEMORY_WARN = "memory_warn"
    MEMORY_OK = "memory_ok"
    MEMORY_SOFT = "memory_soft"
    MEMORY_LIMIT = "memory_limit"
    LIFETIME = "lifetime"
    DUMP_TAKEN = "dump_taken"
    HEALTH_KILL = "health_kill"
    STATE_WRITE_FAILED = "state_write_failed"  # reason: dump | control_socket; detail: the error
    RECYCLED = "recycled"
    RELOAD = "reload"  # reason: applied | refused; detail: the changes, or why it was refused


class Operator(msgspec.Struct, frozen=True):
    """Who asked, over the control socket: the peer's uid and pid (from the kernel) and its
    command line."""

    uid: int
    pid: int
    command: str


# The operator whose request is being carried out: set by the control server around a request,
# carried into the supervisors' mailboxes with it, and stamped on every event emitted meanwhile.
OPERATOR: contextvars.ContextVar[Operator | None] = contextvars.ContextVar("operator", default=None)


class Event(msgspec.Struct, omit_defaults=True, frozen=True):
    kind: Kind
    path: str
    ts: float  # wall clock, seconds since the epoch (for humans and log correlation)
    pid: int | None = None
    code: int | None = None
    signal: str | None = None
    requested: bool | None = None  # for exits: did the supervisor ask for it?
    killed: bool | None = None  # for terminations: did it take SIGKILL?
    reason: str | None = None
    detail: str | None = None
    child: str | None = None  # the child a supervisor-level event is about
    delay: float | None = None
    value: float | None = None  # the measurement that triggered a health event (ms, MB, s)
    threshold: float | None = None  # the configured limit it was compared with
    file: str | None = None  # a file the event refers to (a stack dump)
    cause: str | None = None  # why a child is started again (restarting, recycled): rules.Cause
    output: str | None = None  # child_exited: the last lines it wrote on stderr
    operator: Operator | None = None  # an event an operator's request caused: who asked


_json = msgspec.json.Encoder()


def to_json_line(event: Event) -> bytes:
    return _json.encode(event) + b"\n"


class Subscription:
    """A bounded buffer of events for one consumer."""

    def __init__(self, bus: EventBus, maxlen: int) -> None:
        self._bus = bus
        self._items: deque[Event] = deque()
        self._maxlen = maxlen
        self._ready = anyio.Event()
        self.dropped = 0
        self.closed = False

    def _push(self, event: Event) -> None:
        if len(self._items) >= self._maxlen:
            self.dropped += 1
            return
        self._items.append(event)
        self._ready.set()

    async def batch(self) -> list[Event]:
        """Wait for at least one event; return everything buffered ([] once closed and empty)."""
        while not self._items:
            if self.closed:
                return []
            await self._ready.wait()
            self._ready = anyio.Event()
        items = list(self._items)
        self._items.clear()
        return items

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        self._bus._subs.discard(self)


class EventBus:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._listeners: list[Callable[[Event], None]] = []

    def subscribe(self, maxlen: int = 10_000) -> Subscription:
        sub = Subscription(self, maxlen)
        self._subs.add(sub)
        return sub

    def listen(self, fn: Callable[[Event], None]) -> None:
        """A synchronous listener, called inline: it must be cheap and must not raise."""
        self._listeners.append(fn)

    def emit(self, kind: Kind, path: str, **fields: Any) -> Event:
        for name in ("detail", "reason"):  # text that may come from a worker
            value = fields.get(name)
            if value:
                fields[name] = REDACTOR.scrub(value)
        if "operator" not in fields and (operator := OPERATOR.get()) is not None:
            fields["operator"] = operator
        event = Event(kind=kind, path=path, ts=time.time(), **fields)
        for fn in self._listeners:
            try:
                fn(event)
            except Exception:  # a broken observer must not break supervision
                log.exception("event listener failed")
        for sub in self._subs:
            sub._push(event)
        return event

    def close(self) -> None:
        for sub in list(self._subs):
            sub.close()


async def write_jsonl(sub: Subscription, path: str, retention: Retention = DEFAULT) -> None:
    """Append events to ``path`` as JSON lines until the subscription closes; past
    ``retention.events_max_mb`` the file is rotated (``path.1`` ...) and a new one begun.

    Writes happen in a worker thread, batched, so the supervisor's loop never waits on the disk.
    A write that fails (a full disk) drops that batch, never the supervisor: the log says so
    once, and again with the number dropped when writing works again. What part of the batch
    was written is cut off again, so the file holds whole lines only (should even that fail,
    the cut line is ended before the next batch, so only that one line is unreadable).
    """
    fd = await anyio.to_thread.run_sync(
        lambda: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    )
    dropped = 0
    try:
        while True:
            events = await sub.batch()
            if not events:
                break
            data = b"".join(to_json_line(e) for e in events)
            fd = await anyio.to_thread.run_sync(_same_file, fd, path)
            if fd in _torn:
                data = b"\n" + data
            if await anyio.to_thread.run_sync(_write_all, fd, data):
                _torn.discard(fd)
                max_mb, keep = retention.events_max_mb, retention.events_keep
                await anyio.to_thread.run_sync(rotate_if_large, fd, path, max_mb, keep)  # reopened next
                if dropped:
                    log.warning("event stream %s: writing again; %d events were dropped", path, dropped)
                dropped = 0
                continue
            if not dropped:
                log.error(
                    "event stream %s: cannot write (%s); events are dropped until it can", path, _why(fd)
                )
            dropped += len(events)
    finally:
        os.close(fd)


def _same_file(fd: int, path: str) -> int:
    """``fd``, or a new descriptor for ``path`` if the file was moved or deleted meanwhile (a
    log rotation): the stream goes on in a file of that name, as logrotate expects."""
    try:
        now = os.stat(path)
        was = os.fstat(fd)
        if (now.st_dev, now.st_ino) == (was.st_dev, was.st_ino):
            return fd
    except FileNotFoundError:
        pass
    except OSError:
        return fd
    try:
        fresh = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    except OSError:
        return fd  # keep writing where we were; the next batch tries again
    _torn.discard(fd)
    os.close(fd)
    return fresh


def _write_all(fd: int, data: bytes) -> bool:
    """Append all of ``data``, or nothing (a partial write is truncated away)."""
    view = memoryview(data)
    done = 0
    try:
        start = os.fstat(fd).st_size
    except OSError as exc:
        _errors[fd] = exc.strerror or str(exc)
        return False
    while done < len(data):
        try:
            done += os.write(fd, view[done:])
        except InterruptedError:
            continue
        except OSError as exc:
            _errors[fd] = exc.strerror or str(exc)
            if done:
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    _torn.add(fd)  # the next write first ends the cut line
            return False
    return True


_errors: dict[int, str] = {}
_torn: set[int] = set()  # event files whose last line was cut and could not be truncated away


def _why(fd: int) -> str:
    return _errors.pop(fd, "unknown error")


_LEVELS = {
    Kind.HANG: logging.ERROR,
    Kind.MEMORY_LIMIT: logging.ERROR,
    Kind.HEALTH_KILL: logging.ERROR,
    Kind.DUMP_TAKEN: logging.WARNING,
    Kind.SLOW_PING: logging.WARNING,
    Kind.MEMORY_WARN: logging.WARNING,
    Kind.MEMORY_SOFT: logging.WARNING,
    Kind.START_FAILED: logging.ERROR,
    Kind.INTENSITY_EXCEEDED: logging.ERROR,
    Kind.ESCALATED: logging.ERROR,
    Kind.PROTOCOL_ERROR: logging.ERROR,
    Kind.CHILD_EXITED: logging.WARNING,
    Kind.AUTO_SHUTDOWN: logging.WARNING,
    Kind.CHECKPOINT_DROPPED: logging.WARNING,
    Kind.ZYGOTE_FALLBACK: logging.WARNING,
    Kind.STATE_WRITE_FAILED: logging.ERROR,
    # Frequent by design (one per checkpoint or measurement): not for the stderr log at INFO.
    Kind.CHECKPOINT: logging.DEBUG,
    Kind.WORKER_REPORT: logging.DEBUG,
}


def log_event(event: Event) -> None:
    """Human-readable line for stderr."""
    level = _LEVELS.get(event.kind, logging.INFO)
    if event.kind is Kind.CHILD_EXITED and event.code == 0:
        level = logging.INFO
    if not log.isEnabledFor(level):
        return
    parts = [f"{event.path}: {event.kind.value.replace('_', ' ')}"]
    for name in ("pid", "code", "signal", "reason", "child", "delay", "value", "threshold", "file", "detail"):
        value = getattr(event, name)
        if value is not None:
            parts.append(f"{name}={value}")
    if event.killed:
        parts.append("(needed SIGKILL)")
    log.log(level, " ".join(parts), extra={"otp_event": event})
