"""Linux process plumbing: prctl flags, exit decoding, orphan reaping.

Everything here is a thin, synchronous wrapper around one system call; none of it blocks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
from collections.abc import Callable, Container
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def set_child_subreaper() -> bool:
    """Make this process adopt orphaned descendants, so they are reaped here, not by init."""
    return bool(_prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Receive ``sig`` when the parent dies (PR_SET_PDEATHSIG); check getppid() after."""
    return bool(_prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0)


def die_with_parent_hook(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive ``sig`` when the supervisor dies.

    The parent's pid is captured before the fork: if the supervisor died between fork and the
    prctl call, the child would already be orphaned and never get the signal, so it kills itself.
    """
    parent = os.getpid()
    prctl = _prctl
    kill = os.kill
    getppid = os.getppid

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if getppid() != parent:
            kill(os.getpid(), signal.SIGKILL)

    return hook


@dataclass(frozen=True)
class ExitStatus:
    """How an OS process ended: an exit ``code`` or the ``signal`` that killed it."""

    code: int | None
    signal: int | None

    @classmethod
    def from_waitid(cls, result: os.waitid_result) -> ExitStatus:
        if result.si_code == os.CLD_EXITED:
            return cls(code=result.si_status, signal=None)
        return cls(code=None, signal=result.si_status)

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by {signal_name(self.signal)}"
        return f"exit code {self.code}"


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def parse_signal(name: str) -> int:
    name = name.upper()
    return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])


def reap_pidfd(pidfd: int) -> ExitStatus:
    """Reap the (already exited) process behind ``pidfd``."""
    result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    if result is None:  # pragma: no cover - only called once the pidfd is readable
        raise ChildProcessError("process has not exited")
    return ExitStatus.from_waitid(result)


def reap_orphans(tracked: Container[int], limit: int = 1024) -> list[tuple[int, int | None, ExitStatus]]:
    """Reap exited children that nobody tracks (adopted orphans), without touching tracked ones.

    ``waitid(WNOWAIT)`` peeks at one zombie; an untracked one is reaped, a tracked one is left
    for its own watcher (which reaps it and then calls this again).
    """
    reaped: list[tuple[int, int | None, ExitStatus]] = []
    for _ in range(limit):
        try:
            peek = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            break
        if peek is None or peek.si_pid == 0 or peek.si_pid in tracked:
            break
        pgid = zombie_pgid(peek.si_pid)
        try:
            result = os.waitid(os.P_PID, peek.si_pid, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            continue
        if result is not None:
            reaped.append((peek.si_pid, pgid, ExitStatus.from_waitid(result)))
    return reaped


def stat_fields(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat after the parenthesised command name (state, ppid, pgrp, ...).

    Still readable for a zombie, until it is reaped. None if the process is gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def zombie_pgid(pid: int) -> int | None:
    """Process group of a (possibly zombie) process."""
    fields = stat_fields(pid)
    return int(fields[2]) if fields is not None and len(fields) > 2 else None


def child_pids(pid: int | None = None) -> list[int]:
    """Direct children of a process (default: this one, adopted orphans included), from /proc."""
    pid = os.getpid() if pid is None else pid
    pids: list[int] = []
    task_dir = f"/proc/{pid}/task"
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return pids
    for tid in tids:  # os.open/os.read: a Python file object costs more than the read itself
        try:
            fd = os.open(f"{task_dir}/{tid}/children", os.O_RDONLY)
        except OSError:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:
            continue
        finally:
            os.close(fd)
        pids.extend(int(p) for p in data.split())
    return pids


def cpu_ticks(pid: int) -> int:
    """utime + stime of a whole process (all threads, ended ones included), in clock ticks."""
    fields = stat_fields(pid)
    if fields is None:
        raise ProcessLookupError(f"process {pid} is gone")
    return int(fields[11]) + int(fields[12])


def per_task_counters(pid: int) -> dict[int, tuple[int, int]]:
    """Per live thread: (ns on CPU from schedstat, voluntary + involuntary context switches)."""
    out: dict[int, tuple[int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                ns = int(f.read().split()[0])
            switches = 0
            with open(f"/proc/{pid}/task/{tid}/status", "rb") as f:
                for line in f:
                    if line.startswith((b"voluntary_ctxt_switches", b"nonvoluntary_ctxt_switches")):
                        switches += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(tid)] = (ns, switches)
    return out
