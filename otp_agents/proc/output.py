"""A child's stdout and stderr: two pipes the supervisor reads, line by line, without blocking its
loop (non-blocking reads woken by the event loop, no thread). Each line goes to the host (which
writes the child's log file); the last lines of stderr stay with the process handle, so a start
failure, an exit event and ``status`` can say what the child said last."""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Awaitable, Callable

import anyio

MAX_LINE = 16 * 1024  # longer lines are cut into pieces this long
TAIL_LINES = 20  # stderr lines kept for the exit report
READ_SIZE = 64 * 1024

# (stream, line) -> awaited: the host's writer may make the pipe wait (back-pressure), never drop.
LineSink = Callable[[str, str], Awaitable[None]]


class Pipes:
    """The two pipes of one child, before it is spawned: give ``out_w``/``err_w`` to the child,
    then :meth:`parent_side` closes them here."""

    def __init__(self) -> None:
        self.out_r, self.out_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.err_r, self.err_w = os.pipe2(os.O_CLOEXEC)
        except OSError:
            for fd in (self.out_r, self.out_w):
                os.close(fd)
            raise
        for fd in (self.out_r, self.err_r):
            os.set_blocking(fd, False)

    @property
    def child_fds(self) -> tuple[int, int]:
        return self.out_w, self.err_w

    def parent_side(self) -> None:
        """The child has its copies: close ours of the write ends (EOF comes when it is gone)."""
        for fd in (self.out_w, self.err_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.out_w = self.err_w = -1

    def close(self) -> None:
        for fd in (self.out_r, self.out_w, self.err_r, self.err_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.out_r = self.out_w = self.err_r = self.err_w = -1


class Output:
    """Reading one child's pipes until both reach end of file."""

    def __init__(self, pipes: Pipes, sink: LineSink) -> None:
        self._pipes = pipes
        self._sink = sink
        self.stderr_tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.done = anyio.Event()

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, self._pipes.out_r, "out")
                tg.start_soon(self._pump, self._pipes.err_r, "err")
        finally:
            self._pipes.close()
            self.done.set()

    async def _pump(self, fd: int, stream: str) -> None:
        pending = b""
        while True:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                await anyio.wait_readable(fd)
                continue
            except OSError:
                data = b""
            if not data:
                if pending:
                    await self._line(stream, pending)
                return
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                await self._line(stream, line)
            while len(pending) > MAX_LINE:
                await self._line(stream, pending[:MAX_LINE])
                pending = pending[MAX_LINE:]

    async def _line(self, stream: str, raw: bytes) -> None:
        for start in range(0, max(len(raw), 1), MAX_LINE):
            text = raw[start : start + MAX_LINE].decode("utf-8", "replace").rstrip("\r")
            if stream == "err":
                self.stderr_tail.append(text)
            await self._sink(stream, text)
