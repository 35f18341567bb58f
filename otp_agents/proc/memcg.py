"""A memory cgroup per child, where the host has a memory controller the tree may use.

With one, each child process is also placed in a memory cgroup of its own. Then:

- the memory breaker reads the child's memory from its cgroup: one file, whatever the child
  started, and memory of processes that already left counted until it is freed. It reads the
  *working set*, the charge less the page cache that can be dropped (``inactive_file``), as the
  kubelet does, instead of walking ``/proc``;
- ``memory_max_mb`` is a hard limit the kernel enforces (its OOM killer ends the child, reported
  as a ``memory`` crash), and ``memory_high_mb`` is where the kernel starts reclaiming.

Supported: the hybrid layout of these machines, cgroup v2 mounted for process tracking (no
controllers) beside cgroup v1's ``memory`` controller, whose hierarchy we may write to
(``memory.usage_in_bytes``, ``memory.limit_in_bytes``, ``memory.soft_limit_in_bytes``,
``memory.oom_control``). Not yet: cgroup v2's own memory controller, which needs the supervisor in
a leaf cgroup of its own so ``+memory`` can be delegated to the children (the tree then runs
without memory cgroups, and the breaker reads ``/proc`` as before).

Charges stay where pages were first touched: a worker forked from a zygote is charged for what
it allocates after the fork, not for the pages it shares with the zygote (much like USS).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from otp_agents.proc.cgroup import disabled, make_with

MB = 1024 * 1024


def _v1_memory_mount() -> Path | None:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fstype, _, options = [*right.split(" "), "", "", ""][:3]
                if fstype == "cgroup" and "memory" in options.strip().split(","):
                    return Path(left.split(" ")[4])
    except OSError:
        pass
    return None


def _v1_memory_path() -> str | None:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    return path
    except (OSError, ValueError):
        pass
    return None


class MemoryGroup:
    """One child's memory cgroup (v1)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fds: dict[str, int] = {}  # the files read at every sample, kept open

    def _read(self, name: str) -> str:
        with open(self.path / name) as f:
            return f.read()

    def _pread(self, name: str, size: int) -> bytes:
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(self.path / name, os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(fd, size, 0)

    def working_set_bytes(self, floor: float = 0.0) -> int | None:
        """The charge less the page cache the kernel can drop; None once it cannot be read.
        A charge under ``floor`` bytes is returned as it is: the working set is no larger, and
        ``memory.stat`` (which the kernel writes out in full, 40-odd lines, on every read) is
        read only when the answer could matter."""
        try:
            usage = int(self._pread("memory.usage_in_bytes", 64))
            if usage < floor:
                return usage
            stat = self._pread("memory.stat", 8192)
        except (OSError, ValueError):
            return None
        inactive = 0
        for line in stat.split(b"\n"):
            if line.startswith(b"total_inactive_file "):
                inactive = int(line[20:])
                break
        return max(0, usage - inactive)

    def peak_bytes(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self._read("memory.max_usage_in_bytes"))
        return None

    def set_limits(self, max_mb: float | None, high_mb: float | None) -> str | None:
        """Apply the hard limit and the reclaim target (None: no limit); an error text if the
        kernel refused one."""
        values = {
            "memory.limit_in_bytes": "-1" if max_mb is None else str(int(max_mb * MB)),
            "memory.soft_limit_in_bytes": "-1" if high_mb is None else str(int(high_mb * MB)),
        }
        for name, value in values.items():
            try:
                (self.path / name).write_text(value)
            except OSError as exc:
                return f"{name}: {exc.strerror or exc}"
        return None

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer ended in this cgroup."""
        with contextlib.suppress(OSError, ValueError):
            for line in self._read("memory.oom_control").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def remove(self) -> bool:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        try:
            self.path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True


class MemoryGroups:
    """The tree's memory cgroup (v1), under which each child gets one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls) -> tuple[MemoryGroups | None, str]:
        """The tree's memory cgroup; or None and why there is none."""
        if disabled():
            return None, "OTP_AGENTS_CGROUP=off"
        mount, own = _v1_memory_mount(), _v1_memory_path()
        if mount is None or own is None:
            return None, "no cgroup v1 memory controller (cgroup v2's is not used yet)"
        path = mount / own.lstrip("/") / f"otp-agents.{os.getpid()}"
        try:
            path.mkdir(exist_ok=True)
        except OSError as exc:
            return None, f"cannot create a memory cgroup in {path.parent}: {exc.strerror or exc}"
        return cls(path), str(path)

    def child(self, name: str, pid: int) -> MemoryGroup | None:
        path = self.path / name
        return MemoryGroup(path) if make_with(path, pid) else None

    def remove(self) -> bool:
        """The tree's memory cgroup and the (empty) ones below it."""
        ok = True
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.path):
                if entry.is_dir(follow_symlinks=False):
                    ok = MemoryGroup(Path(entry.path)).remove() and ok
        return MemoryGroup(self.path).remove() and ok


__all__ = ["MemoryGroup", "MemoryGroups"]
