"""The orphan guard: makes sure no child's process group outlives a supervisor killed by SIGKILL.

``PR_SET_PDEATHSIG`` kills each direct child when the supervisor dies, but not what that child
started (a shell's ``sleep``, a worker's helper). The guard is a tiny process forked at startup,
before the event loop exists; the supervisor tells it, over a pipe, each process group it
creates and each one it has reaped. If the supervisor dies in any way, the pipe reaches end of
file and the guard SIGKILLs every group still registered, then exits. It ignores terminal
signals and sits in its own process group, so a Ctrl-C meant for the supervisor does not reach it.

Where a cgroup can be made (:mod:`otp_agents.cgroup`), the supervisor moves itself into one
after forking the guard, and the guard also kills that whole cgroup: grandchildren that left
their process group (``setsid``) and orphans the supervisor had adopted are gone with the rest.
On a normal end the supervisor first moves back out, so the guard's sweep of the cgroup only
finds what outlived the ordered stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from otp_agents.proc.cgroup import Cgroup
from otp_agents.proc.memcg import MemoryGroups


class Guard:
    """The supervisor's end of the pipe. Registering costs one small non-blocking write."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self._fd = fd
        self.cgroup: Cgroup | None = None
        self.memory: MemoryGroups | None = None  # the tree's memory cgroup (v1), if there is one
        self.containment = "process groups"  # what a supervisor death is contained by

    def contain(self) -> None:
        """Move this process (and so every child it starts) into a cgroup of its own, which the
        guard kills if this process dies. Best effort: ``containment`` says what was done."""
        group, where = Cgroup.create()
        if group is None:
            self.containment = f"process groups ({where})"
            return
        problem = group.enter()
        if problem is not None:
            self.containment = f"process groups ({problem})"
            return
        self.cgroup = group
        self.containment = f"a cgroup per child, in {group.path}"
        self._send(b"c%s\n" % os.fsencode(str(group.path)))
        memory, where = MemoryGroups.create()
        if memory is None:
            self.containment += f"; memory read from /proc ({where})"
            return
        self.memory = memory
        self.containment += f"; memory from a memory cgroup per child, in {memory.path}"
        self._send(b"m%s\n" % os.fsencode(str(memory.path)))

    def add(self, pgid: int) -> None:
        self._send(b"+%d\n" % pgid)

    def remove(self, pgid: int) -> None:
        self._send(b"-%d\n" % pgid)

    def _send(self, line: bytes) -> None:
        with contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
            os.write(self._fd, line)

    def close(self) -> None:
        """Normal end: every group has been stopped and removed; the guard exits by itself."""
        if self.memory is not None:
            self.memory.remove()
        if self.cgroup is not None and not self.cgroup.leave() and self._fd >= 0:
            # We are still inside: the guard must not kill the cgroup. This line may not be lost.
            os.set_blocking(self._fd, True)
            self._send(b"=\n")
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


def start() -> Guard:
    """Fork the guard. Call it before starting the event loop (no threads may exist yet)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked guard
        try:
            os.close(write_fd)
            _serve(read_fd)
        finally:
            os._exit(0)
    os.close(read_fd)
    os.set_blocking(write_fd, False)
    os.set_inheritable(write_fd, False)
    return Guard(pid, write_fd)


def _serve(fd: int) -> None:  # pragma: no cover - runs in the forked guard
    os.setpgid(0, 0)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    os.closerange(3, fd)
    os.closerange(fd + 1, 65536)
    groups: set[int] = set()
    cgroup: Cgroup | None = None
    memory: MemoryGroups | None = None
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line[:1] == b"+":
                groups.add(int(line[1:]))
            elif line[:1] == b"-":
                groups.discard(int(line[1:]))
            elif line[:1] == b"c":
                path = os.fsdecode(line[1:])
                cgroup = Cgroup(Path(path), Path(path).parent)
            elif line[:1] == b"m":
                memory = MemoryGroups(Path(os.fsdecode(line[1:])))
            elif line == b"=":
                cgroup = None
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    if cgroup is not None:
        cgroup.kill()
        cgroup.wait_empty()
        cgroup.remove()
    if memory is not None:  # emptied by the kill above
        memory.remove()
