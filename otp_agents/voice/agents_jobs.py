"""What LiveKit Agents' process layer knows about its jobs but only logs, as facts the host acts on.

LiveKit logs an entrypoint that raised ("unhandled exception while running the job task", from
the job's process or thread) and a job process that died before it was ready ("error
initializing process"), then carries on: the worker keeps taking jobs and looks healthy while
every call fails. :class:`JobWatch` turns both into failures: each one is reported to the
supervisor at once with its exception, and ``limit`` of them in a row, with no job ending well in
between, give the host up (``given_up``), so it exits with that reason and its supervisor
restarts it by its rules, up to its intensity.

The log message is matched as livekit-agents 1.8.9 (pinned) writes it; the tests of the host
fail if a release changes it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

ENTRYPOINT_FAILED = "unhandled exception while running the job task"
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>.+)$')
_CHAINING = ("Traceback (most recent call last)", "During handling", "The above exception")


@dataclass(frozen=True)
class Failure:
    what: str  # one line: which job or process, and what went wrong


class JobWatch(logging.Handler):
    """Counts job failures; reports each one; gives up after ``limit`` in a row."""

    def __init__(self, app_file: str | Path, limit: int) -> None:
        super().__init__(logging.ERROR)
        self.app_file = str(Path(app_file).resolve())
        self.limit = max(1, limit)
        self.streak = 0
        self.failed = 0
        self.succeeded = 0
        self.recent: collections.deque[Failure] = collections.deque(maxlen=16)
        self.given_up = anyio.Event()
        self.reason: str | None = None
        self.closing = False  # set once the host stops taking jobs
        self._loop = asyncio.get_running_loop()
        self._send, self._reports = anyio.create_memory_object_stream[str](64)
        self._ready: set[int] = set()  # ids of the executors that became ready
        self._failed: set[int | str | None] = set()  # pids and job ids whose entrypoint raised

    # -- sources -------------------------------------------------------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        """A LiveKit log record, from any thread (a job thread, the job-log listener)."""
        try:
            message = record.getMessage()
        except Exception:
            return
        if not message.startswith(ENTRYPOINT_FAILED):
            return
        pid = getattr(record, "pid", None)
        job = getattr(record, "job_id", None)
        room = getattr(record, "room", None)
        where = f"job {job} (room {room})" if job else "the session"
        what = f"{where}: entrypoint raised {self._describe(record, message)}"
        key = pid if isinstance(pid, int) else job if isinstance(job, str) else None
        with contextlib.suppress(RuntimeError):  # the host's loop is closing
            self._loop.call_soon_threadsafe(self._failure, what, key)

    def watch_pool(self, pool: Any) -> None:
        """Follow LiveKit's process pool (its events come on the host's loop)."""
        pool.on("process_ready", lambda proc: self._ready.add(id(proc)))
        pool.on("process_closed", self._process_closed)

    def _process_closed(self, proc: Any) -> None:
        pid = getattr(proc, "pid", None)  # a thread executor has none
        code = getattr(proc, "exitcode", None)
        if self.closing:  # the pool is being shut down: what it stops now did not fail
            return
        if id(proc) not in self._ready:
            if code not in (0, None):  # 0: closed by the pool itself (a spare it no longer needs)
                self._failure(f"a job process (pid {pid}) ended before it was ready ({_code(code)})", None)
            return
        self._ready.discard(id(proc))
        running = getattr(proc, "running_job", None)
        job = running.job if running is not None else None
        if pid in self._failed or (job is not None and job.id in self._failed):
            self._failed.discard(pid)  # its entrypoint failure is counted already
            self._failed.discard(job.id if job is not None else None)
        elif job is not None:
            if code not in (0, None):
                self._failure(f"job {job.id} (room {job.room.name}): its process ended ({_code(code)})", None)
            else:
                self.succeeded += 1
                self.streak = 0

    # -- reporting -----------------------------------------------------------------------------

    def _failure(self, what: str, key: int | str | None) -> None:
        if key is not None:
            self._failed.add(key)
        self.failed += 1
        self.streak += 1
        self.recent.append(Failure(what))
        with contextlib.suppress(anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._send.send_nowait(what)
        if self.streak >= self.limit and not self.given_up.is_set():
            self.reason = (
                what if self.limit == 1 else f"{self.streak} job failures in a row; the last: {what}"
            )
            self.given_up.set()

    async def reports(self) -> Any:
        """Each failure's line, as it happens."""
        async with self._reports:
            async for line in self._reports:
                yield line

    def close(self) -> None:
        self._send.close()
        super().close()

    def _describe(self, record: logging.LogRecord, message: str) -> str:
        """``Type: message (app.py:12, in entrypoint)`` from the record's exception."""
        if record.exc_info and record.exc_info[1] is not None:
            text = "".join(traceback.format_exception(*record.exc_info))
        else:  # from a job process: the traceback arrives as text
            text = record.exc_text or message
        lines = [line for line in text.splitlines() if line.strip()]
        error = next(
            (ln for ln in reversed(lines) if not ln.startswith((" ", *_CHAINING)) and ln != message),
            "an exception",
        )
        where = ""
        for line in lines:
            m = _FRAME.match(line)
            if m and m["file"] == self.app_file:
                where = f" ({Path(m['file']).name}:{m['line']}, in {m['func']})"
        return f"{error.strip()}{where}"


def _code(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    return f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
