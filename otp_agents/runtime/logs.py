"""The children's logs: every line a child writes on stdout or stderr, in a file of its own instance.

``STATE_DIR/logs/<child path>/<start time>-<pid>.log``: one file per process instance, so a
reused name (a dynamic ``room-1``, a restarted worker) never mixes two lives in one file. Each
line is ``<UTC time> <out|err> <text>``. A file over ``max_bytes`` rotates (``.1`` the newest of
``backups`` kept); a child path keeps its ``keep`` newest instances. Both are set in the tree
file (``logs = {...}``, inherited like ``health``).

Writes happen in a worker thread, in batches, so the supervisor's loop never waits on the disk;
the queue is bounded, and a full one makes the child's pipe wait (its writes block) rather than
lose lines. With ``echo`` (the default) each line also goes to the supervisor's own log, labelled
with the child's path and pid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import anyio

from otp_agents.proc.handle import ChildProcess
from otp_agents.runtime.logfiles import child_dir, instance_name, instances
from otp_agents.spec.model import LogSettings

QUEUE = 4096  # lines waiting for the writer; a full queue holds the children's pipes back
BATCH = 2000  # lines written per trip to the worker thread

echo = logging.getLogger("otp_agents.child")
log = logging.getLogger("otp_agents")


@dataclass(frozen=True)
class _Line:
    file: Path
    settings: LogSettings
    stream: str
    text: str
    at: float


class ChildLogs:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "logs"
        self._send, self._receive = anyio.create_memory_object_stream[_Line](QUEUE)
        self._failing = False

    def file_of(self, proc: ChildProcess) -> Path:
        return child_dir(self.root, proc.path) / instance_name(proc.started_wall, proc.pid)

    async def write(self, proc: ChildProcess, stream: str, text: str) -> None:
        settings = proc.spec.log_settings
        if settings.echo:
            extra = {"child": proc.path, "child_pid": proc.pid, "stream": stream}
            echo.info("%s[%d] %s: %s", proc.path, proc.pid, stream, text, extra=extra)
        line = _Line(self.file_of(proc), settings, stream, text, time.time())
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await self._send.send(line)

    def close(self) -> None:
        """No more lines: the writer finishes what is queued and ends."""
        self._send.close()

    async def run(self) -> None:
        async with self._receive:
            while True:
                try:
                    batch = [await self._receive.receive()]
                except anyio.EndOfStream:
                    return
                while len(batch) < BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await anyio.to_thread.run_sync(self._write, batch)

    # -- in the worker thread ----------------------------------------------------------------

    def _write(self, batch: list[_Line]) -> None:
        by_file: dict[Path, list[_Line]] = {}
        for line in batch:
            by_file.setdefault(line.file, []).append(line)
        for file, lines in by_file.items():
            try:
                self._append(file, lines)
            except OSError as exc:
                if not self._failing:
                    log.error("child logs: cannot write %s (%s); lines are lost until it can", file, exc)
                self._failing = True
            else:
                if self._failing:
                    log.warning("child logs: writing again")
                self._failing = False

    def _append(self, file: Path, lines: list[_Line]) -> None:
        settings = lines[0].settings
        if not file.exists():
            file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _retain(file.parent, settings.keep - 1)
        size = file.stat().st_size if file.exists() else 0
        chunk: list[bytes] = []
        for line in lines:
            stamp = (
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(line.at)) + f".{int(line.at % 1 * 1000):03d}Z"
            )
            data = f"{stamp} {line.stream} {line.text}\n".encode()
            if size and size + len(data) > settings.max_bytes:
                _flush(file, chunk)
                chunk = []
                _rotate(file, settings.backups)
                size = 0
            chunk.append(data)
            size += len(data)
        _flush(file, chunk)


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"


def _flush(file: Path, chunk: list[bytes]) -> None:
    if not chunk:
        return
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, b"".join(chunk))
    finally:
        os.close(fd)


def _rotate(file: Path, backups: int) -> None:
    """``x.log`` -> ``x.log.1`` -> ``x.log.2`` ...; the oldest beyond ``backups`` is deleted."""
    if backups <= 0:
        file.unlink(missing_ok=True)
        return
    Path(f"{file}.{backups}").unlink(missing_ok=True)
    for n in range(backups - 1, 0, -1):
        older = Path(f"{file}.{n}")
        if older.exists():
            older.rename(f"{file}.{n + 1}")
    file.rename(f"{file}.1")


def _retain(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest instances (with their rotated pieces)."""
    old = instances(folder)
    for file in old[: max(0, len(old) - keep)]:
        for piece in folder.glob(file.name + "*"):
            piece.unlink(missing_ok=True)
