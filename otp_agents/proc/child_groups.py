"""A child process's cgroups, where the tree has them (:mod:`~.cgroup`, :mod:`~.memcg`): one
to kill everything it started, one to read and limit its memory.

Moving a process into a cgroup (a write to ``cgroup.procs``) waits for the kernel's cgroup
lock, which waits for an RCU grace period: 10 to 50 ms here for a process that is starting.
That wait is done on a worker thread, never on the supervisor's loop, and the child runs
meanwhile (a restart does not wait for it). Until it is placed, its process group is what a
kill reaches and /proc is where its memory is read."""

from __future__ import annotations

import logging
import signal

import anyio
import anyio.abc
import anyio.to_thread

from otp_agents.linux import ExitStatus
from otp_agents.proc.cgroup import Cgroup
from otp_agents.proc.guard import Guard
from otp_agents.proc.memcg import MB, MemoryGroup
from otp_agents.spec.model import HealthSettings

log = logging.getLogger("otp_agents")


class ChildGroups:
    def __init__(self, path: str, cgroup: Cgroup | None = None, memory: MemoryGroup | None = None) -> None:
        self.path = path
        self.cgroup = cgroup
        self.memory = memory
        self.placed = anyio.Event()
        self._settings: HealthSettings | None = None

    @classmethod
    def place(cls, tg: anyio.abc.TaskGroup, guard: Guard | None, path: str, pid: int) -> ChildGroups:
        """Move ``pid`` into cgroups of its own below the tree's (those the tree has), on a
        worker thread; ``placed`` is set once that is done (or there is nothing to do)."""
        groups = cls(path)
        if guard is None or (guard.cgroup is None and guard.memory is None):
            groups.placed.set()
        else:
            tg.start_soon(groups._place, guard, pid, name=f"cgroups for {path}")
        return groups

    async def _place(self, guard: Guard, pid: int) -> None:
        name = f"{self.path.replace('/', '.')}.{pid}"
        v2, v1 = guard.cgroup, guard.memory
        try:
            with anyio.CancelScope(shield=True):  # a thread cannot be stopped half-way anyway
                self.cgroup = await anyio.to_thread.run_sync(v2.child, name, pid) if v2 is not None else None
                self.memory = await anyio.to_thread.run_sync(v1.child, name, pid) if v1 is not None else None
        finally:
            self.placed.set()
        if self._settings is not None:
            self.limit(self._settings)

    def kill(self) -> None:
        """SIGKILL everything in the child's cgroup (what left its process group too)."""
        if self.cgroup is not None:
            self.cgroup.kill()

    def limit(self, s: HealthSettings) -> None:
        """The kernel's hard limit and reclaim target, from ``memory_max_mb``/``memory_high_mb``
        (applied once placed, if it is not yet)."""
        self._settings = s
        if not self.placed.is_set():
            return
        if s.memory_max_mb is None and s.memory_high_mb is None:
            if self.memory is not None:
                self.memory.set_limits(None, None)
            return
        if self.memory is None:
            problem: str | None = "no memory cgroup"
        else:
            problem = self.memory.set_limits(s.memory_max_mb, s.memory_high_mb)
        if problem:
            log.warning("%s: memory_max_mb/memory_high_mb not enforced by the kernel: %s", self.path, problem)

    def working_set_bytes(self, floor: float = 0.0) -> int | None:
        """Its memory cgroup's working set (see :meth:`MemoryGroup.working_set_bytes`)."""
        return self.memory.working_set_bytes(floor) if self.memory is not None else None

    def oom_killed(self, status: ExitStatus) -> float | None:
        """The peak MB, if the kernel's OOM killer ended the child in its memory cgroup."""
        if self.memory is None or status.signal != signal.SIGKILL or not self.memory.oom_kills():
            return None
        peak = self.memory.peak_bytes()
        return round(peak / MB, 1) if peak is not None else 0.0

    async def dispose(self) -> None:
        """Remove the gone child's cgroups once the kill has emptied them (bounded; one that
        will not empty is left, and the tree's own cgroup still holds what is in it)."""
        await self.placed.wait()
        for _ in range(200):
            gone = self.cgroup is None or self.cgroup.remove()
            if gone and (self.memory is None or self.memory.remove()):
                return
            self.kill()
            await anyio.sleep(0.025)


__all__ = ["ChildGroups"]
