"""Stack dumps, taken before every kill the supervisor does for health reasons.

Three routes, tried in order until one gives text:

1. **channel** (protocol workers): a ``DumpRequest`` frame; the worker answers from its event loop
   with every thread and every task (asyncio or trio), so coroutine stacks are included.
2. **signal**: the worker registered :data:`~otp_agents.process.DUMP_SIGNAL` with faulthandler at
   startup, writing to a file the supervisor named. faulthandler's handler is C code: it works
   while the loop is blocked or C code holds the GIL. Plain commands get this route only if
   they opt in with ``dump_signal`` (and write their stacks to ``$OTP_AGENTS_DUMP_FILE``).
3. **py-spy**, when installed and permitted (``py-spy dump --nonblocking``), which reads a Python
   process' memory from outside: it works on a stopped process too.

Every dump is kept as a file under ``STATE_DIR/dumps/`` (named for the child's path, pid, reason
and time), announced by a ``dump_taken`` event and a log line. Each route is bounded by
``dump_timeout``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import anyio

from otp_agents import linux
from otp_agents.events import EventBus, Kind
from otp_agents.redact import REDACTOR
from otp_agents.retention import DEFAULT, Retention, prune

if TYPE_CHECKING:
    from otp_agents.proc.handle import ChildProcess

log = logging.getLogger("otp_agents")


def _find_pyspy() -> str | None:
    """py-spy on PATH, or installed beside this interpreter (a virtualenv not on PATH)."""
    found = shutil.which("py-spy")
    if found is None:
        beside = Path(sys.executable).parent / "py-spy"
        found = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None
    return found


_PYSPY = _find_pyspy()
_POLL = 0.01


def slug(path: str) -> str:
    """A child path as a file-name part: ``root/voice/leaf-3`` -> ``root.voice.leaf-3``."""
    return path.replace("/", ".")


@dataclass(frozen=True)
class Dump:
    """A stack dump kept on disk, and the route that got it (``none``: nothing could be had)."""

    file: Path
    route: str

    @property
    def complete(self) -> bool:
        return self.route != "none"


class Dumper:
    def __init__(
        self, state_dir: Path, bus: EventBus, tracked: dict[int, str], retention: Retention = DEFAULT
    ) -> None:
        self.retention = retention
        self.dir = state_dir / "dumps"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _remove_stale_signal_files(self.dir)
        self.bus = bus
        self.tracked = tracked
        self._seq = itertools.count(1)

    def signal_file(self, path: str) -> str:
        """A fresh file for one process' faulthandler output (removed when it is reaped)."""
        return str(self.dir / f".signal.{slug(path)}.{os.getpid()}.{next(self._seq)}")

    async def take(self, proc: ChildProcess, reason: str) -> Dump | None:
        """Dump ``proc``'s stacks by the first route that works; keep and announce the result."""
        timeout = proc.spec.settings.dump_timeout
        state = _process_state(proc.pid)
        text, route = None, "none"
        attempts: list[str] = []
        stopped = state.startswith(("T", "t"))  # runs no handler: only py-spy can help
        if proc.channel is not None and proc.ready and not stopped:
            text = await proc.request_dump(timeout)
            attempts.append("channel" + ("" if text else ": no answer"))
            route = "channel"
        if text is None and proc.signal_file is not None and proc.dump_signal is not None and not stopped:
            text = await _by_signal(proc, proc.signal_file, proc.dump_signal, timeout)
            attempts.append("signal" + ("" if text else ": nothing written"))
            route = "signal"
        if text is None and _PYSPY is not None:
            text = await _by_pyspy(proc.pid, max(timeout, 2.0), self.tracked)
            attempts.append("py-spy" + ("" if text else ": failed"))
            route = "py-spy"
        if text is None:
            route = "none"
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.dir / f"{slug(proc.path)}.{proc.pid}.{reason}.{stamp}.txt"
        header = (
            f"child: {proc.path}\npid: {proc.pid}\nreason: {reason}\nprocess state: {state}\n"
            f"route: {route}\nattempts: {', '.join(attempts) or 'none available'}\n"
            f"time: {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC\n\n"
        )
        body = REDACTOR.scrub(text) if text is not None else "no stack dump could be obtained\n"
        try:
            target = await anyio.to_thread.run_sync(_write_new, target, header + body)
        except OSError as exc:
            self.bus.emit(
                Kind.STATE_WRITE_FAILED,
                proc.path,
                pid=proc.pid,
                reason="dump",
                file=str(target),
                detail=f"stack dump for {reason} not written: {exc.strerror or exc}",
            )
            return None
        self.bus.emit(Kind.DUMP_TAKEN, proc.path, pid=proc.pid, reason=reason, detail=route, file=str(target))
        keep, days = self.retention.dumps_keep, self.retention.dumps_max_days
        await anyio.to_thread.run_sync(prune, self.dir, ".txt", keep, days)  # bounded, never this one
        return Dump(target, route)


def _write_new(target: Path, text: str) -> Path:
    """Write ``text`` to ``target``, or beside it (``.2.txt``, ...) if a dump of the same child,
    pid and reason was already taken within that second. In a worker thread."""
    for n in range(1, 1000):
        path = target if n == 1 else target.with_name(f"{target.stem}.{n}.txt")
        try:
            with open(path, "x") as f:
                f.write(text)
            return path
        except FileExistsError:
            continue
    target.write_text(text)
    return target


def _remove_stale_signal_files(where: Path) -> None:
    """Signal files left by a supervisor that died before reaping its children (its pid is in
    the name): nobody will read them."""
    for file in where.glob(".signal.*"):
        owner = file.name.rsplit(".", 2)[-2]
        if owner.isdigit() and int(owner) != os.getpid() and not Path(f"/proc/{owner}").exists():
            with contextlib.suppress(OSError):
                file.unlink()


def _process_state(pid: int) -> str:
    fields = linux.stat_fields(pid)
    if fields is None:
        return "gone"
    letter = fields[0].decode()
    names = {"R": "running", "S": "sleeping", "D": "disk sleep", "T": "stopped", "t": "traced", "Z": "zombie"}
    return f"{letter} ({names.get(letter, '?')})"


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _read_range(path: str, start: int, end: int) -> str:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start).decode("utf-8", "replace")


async def _by_signal(proc: ChildProcess, file: str, sig: int, limit: float) -> str | None:
    start = _size(file)
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        return None
    size, stable = start, 0
    with anyio.move_on_after(limit):
        # faulthandler writes in one burst: wait until the file grew and then stopped growing.
        while stable < 3:
            await anyio.sleep(_POLL)
            now = _size(file)
            stable = stable + 1 if now == size and now > start else 0
            size = now
    return _read_range(file, start, size) if size > start else None


def _start_pyspy(pid: int, out: IO[bytes]) -> subprocess.Popen[bytes] | None:
    assert _PYSPY is not None
    try:
        return subprocess.Popen(
            [_PYSPY, "dump", "--pid", str(pid), "--nonblocking"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
    except OSError:
        return None


async def _by_pyspy(pid: int, limit: float, tracked: dict[int, str]) -> str | None:
    """Run py-spy as our own tracked child (so the orphan sweep leaves its exit alone)."""
    with tempfile.TemporaryFile() as out:
        spy = _start_pyspy(pid, out)
        if spy is None:
            return None
        tracked[spy.pid] = "py-spy"
        pidfd = os.pidfd_open(spy.pid)
        try:
            with anyio.move_on_after(limit):
                await anyio.wait_readable(pidfd)
            if spy.poll() is None:
                spy.kill()
            spy.wait()
        finally:
            os.close(pidfd)
            tracked.pop(spy.pid, None)
        if spy.returncode != 0:
            return None
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    return text or None
