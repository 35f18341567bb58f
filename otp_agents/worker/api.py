"""The worker side of the protocol: what a Python child imports.

A worker is an async function taking a :class:`Worker`::

    async def main(worker: Worker) -> None:
        model = load_model()          # anything slow happens before ready()
        await worker.ready()          # from now on the supervisor counts us as started
        while not worker.stopping:
            ...                       # do the work; check worker.stopping between units
        # returning is a clean exit (code 0)

Point a tree at it with ``module = "package.module:main"``, or make a script that ends with
``otp_agents.worker.run(main)`` and use ``script = "path/to/script.py"``.

The library answers pings from the worker's own event loop (so a stalled loop shows up as a
missing pong), turns the supervisor's ``Shutdown`` frame and SIGTERM/SIGINT into
:attr:`Worker.stopping`, and enforces the shutdown deadline itself: if ``main`` has not returned
shortly before the supervisor would SIGKILL it, ``main`` is cancelled so the process still
leaves through its normal, orderly exit path. Everything is closed inside the event loop, so no
"no running event loop" errors appear on the way out.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

import anyio

from otp_agents.wire.channel import Channel
from otp_agents.wire.messages import (
    LABEL_NAME,
    MAX_CHECKPOINT,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    REPORT_NAME,
    Checkpoint,
    Located,
    Log,
    Lookup,
    Publish,
    Ready,
    Report,
)

_REPORT_NAME = re.compile(REPORT_NAME)
_LABEL_NAME = re.compile(LABEL_NAME)


class Worker:
    """Handed to a worker's main function.

    ``resumed`` is the last checkpoint this child sent before it was restarted (after a crash,
    a kill, a recycle or a supervisor restart), or None: resume from it, then keep checkpointing.
    """

    def __init__(
        self,
        channel: Channel,
        path: str,
        args: list[str],
        resumed: bytes | None = None,
        checkpoint_max: int = 0,
    ) -> None:
        self.path = path
        self.args = args
        self.resumed = resumed
        self.checkpoint_max = checkpoint_max  # 0: the supervisor keeps no checkpoints
        self._channel = channel
        self._stop = anyio.Event()
        self._ready_sent = False
        self.draining = False  # the supervisor asked us to finish current work and exit
        self.shutdown_timeout: float | None = None
        self._timeout_known = anyio.Event()
        self._lookups: dict[int, tuple[anyio.Event, list[str | None]]] = {}
        self._lookup_seq = 0
        self.stop_reason: str | None = None
        # Awaited before each pong when set: a worker whose real work runs on another event loop
        # (a thread's) routes its heartbeat through that loop, so a stuck loop misses pongs.
        self.liveness: Callable[[], Awaitable[None]] | None = None
        self._probing = False
        # Why this worker is about to exit, in its own words: sent in its Bye, and shown by the
        # supervisor as the exit's (or the failed start's) reason. Set it before a non-zero exit.
        self.exit_reason: str | None = None

    @property
    def stopping(self) -> bool:
        """True once the supervisor (or a signal) asked this worker to finish."""
        return self._stop.is_set()

    async def wait_stopping(self) -> None:
        await self._stop.wait()

    async def ready(self) -> None:
        """Tell the supervisor this worker is started. Call it once, after setup."""
        if not self._ready_sent:
            self._ready_sent = True
            await self._channel.send(Ready())

    async def log(self, message: str, level: int = logging.INFO) -> None:
        """Send a log line into the supervisor's event stream."""
        await self._channel.send(Log(level=level, message=message[:65536]))

    async def checkpoint(self, data: bytes) -> None:
        """Leave ``data`` with the supervisor: the next start of this child gets it as ``resumed``.

        Keep it small (at most ``checkpoint_max`` bytes) and send it when the state changes; only
        the newest one is kept. Empty data forgets it (:meth:`clear_checkpoint`).
        """
        limit = self.checkpoint_max or MAX_CHECKPOINT
        if len(data) > limit:
            raise ValueError(f"checkpoint of {len(data)} bytes is over the limit of {limit} bytes")
        await self._channel.send(Checkpoint(data=bytes(data)))

    async def clear_checkpoint(self) -> None:
        """The work is complete: the next start of this child begins fresh."""
        await self._channel.send(Checkpoint(data=b""))

    async def report(self, name: str, value: float, **labels: str) -> None:
        """Send a measurement (``voice_turn_latency_seconds``, 0.42) to the supervisor's event
        stream; known names also feed its Prometheus metrics."""
        if not _REPORT_NAME.fullmatch(name):
            raise ValueError(f"report name {name!r} must match {REPORT_NAME}")
        if len(labels) > MAX_LABELS:
            raise ValueError(f"at most {MAX_LABELS} labels, got {len(labels)}")
        for key, text in labels.items():
            if not _LABEL_NAME.fullmatch(key):
                raise ValueError(f"label name {key!r} must match {LABEL_NAME}")
            if len(text) > MAX_LABEL_VALUE:
                raise ValueError(f"label {key} is over {MAX_LABEL_VALUE} characters")
        await self._channel.send(Report(name=name, value=float(value), labels=labels))

    async def publish(self, name: str, address: str) -> None:
        """Offer a service (a socket address) to the other workers of the tree, which find it
        with :meth:`lookup`. It is withdrawn when this process exits, or with an empty address."""
        await self._channel.send(Publish(name=name, address=address))

    async def lookup(self, name: str, timeout: float = 2.0) -> str | None:  # noqa: ASYNC109
        """The address a worker of the tree published for ``name`` (None if nobody serves it,
        or the supervisor did not answer within ``timeout``)."""
        self._lookup_seq += 1
        ident = self._lookup_seq
        done, answer = anyio.Event(), list[str | None]([None])
        self._lookups[ident] = (done, answer)
        try:
            await self._channel.send(Lookup(id=ident, name=name))
            with anyio.move_on_after(timeout):
                await done.wait()
        finally:
            self._lookups.pop(ident, None)
        return answer[0]

    def _located(self, msg: Located) -> None:
        waiter = self._lookups.get(msg.id)
        if waiter is not None:
            waiter[1][0] = msg.address
            waiter[0].set()

    def request_stop(self, reason: str, timeout: float | None = None) -> None:
        if not self._stop.is_set():
            self.stop_reason = reason
            self._stop.set()
        # The Shutdown frame and the stop signal may arrive in either order: the frame's
        # deadline counts whichever came first.
        if timeout and self.shutdown_timeout is None:
            self.shutdown_timeout = timeout
            self._timeout_known.set()


Main = Callable[[Worker], Awaitable[None]]
