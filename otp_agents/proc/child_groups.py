"""A child process's cgroups, where the tree has them (:mod:`~.cgroup`, :mod:`~.memcg`): one
to kill everything it started, one to read and limit its memory."""

from __future__ import annotations

import logging
import signal

import anyio

from otp_agents.linux import ExitStatus
from otp_agents.proc.cgroup import Cgroup
from otp_agents.proc.guard import Guard
from otp_agents.proc.memcg import MB, MemoryGroup
from otp_agents.spec.model import HealthSettings

log = logging.getLogger("otp_agents")


class ChildGroups:
    def __init__(self, path: str, cgroup: Cgroup | None, memory: MemoryGroup | None) -> None:
        self.path = path
        self.cgroup = cgroup
        self.memory = memory

    @classmethod
    def place(cls, guard: Guard | None, path: str, pid: int) -> ChildGroups:
        """Move ``pid`` into cgroups of its own below the tree's (those the tree has)."""
        name = f"{path.replace('/', '.')}.{pid}"
        cgroup = guard.cgroup.child(name, pid) if guard is not None and guard.cgroup is not None else None
        memory = guard.memory.child(name, pid) if guard is not None and guard.memory is not None else None
        return cls(path, cgroup, memory)

    def kill(self) -> None:
        """SIGKILL everything in the child's cgroup (what left its process group too)."""
        if self.cgroup is not None:
            self.cgroup.kill()

    def limit(self, s: HealthSettings) -> None:
        """The kernel's hard limit and reclaim target, from ``memory_max_mb``/``memory_high_mb``."""
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

    def working_set_bytes(self) -> int | None:
        return self.memory.working_set_bytes() if self.memory is not None else None

    def oom_killed(self, status: ExitStatus) -> float | None:
        """The peak MB, if the kernel's OOM killer ended the child in its memory cgroup."""
        if self.memory is None or status.signal != signal.SIGKILL or not self.memory.oom_kills():
            return None
        peak = self.memory.peak_bytes()
        return round(peak / MB, 1) if peak is not None else 0.0

    async def dispose(self) -> None:
        """Remove the gone child's cgroups once the kill has emptied them (bounded; one that
        will not empty is left, and the tree's own cgroup still holds what is in it)."""
        for _ in range(200):
            gone = self.cgroup is None or self.cgroup.remove()
            if gone and (self.memory is None or self.memory.remove()):
                return
            self.kill()
            await anyio.sleep(0.025)


__all__ = ["ChildGroups"]
