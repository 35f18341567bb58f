"""Memory circuit breakers: one sampler for every watched child, reading its memory cgroup
where it has one (its working set, :mod:`otp_agents.proc.memcg`), else /proc.

A child is measured over its whole process tree (grandchildren included). Each sample first
sums resident memory from ``/proc/PID/statm`` (a few microseconds per process). Only when that
cheap total reaches the lowest configured threshold is the configured metric read from
``/proc/PID/smaps_rollup`` (``pss`` by default; ``uss`` = private pages; or ``rss``). Since
RSS >= PSS >= USS, skipping the precise read below the threshold never misses a breach.

The sampler keeps ``/proc/PID/statm`` of every process it watches open and re-reads it with one
``pread`` per sample (a fifth of an open-read-close). The open file stays bound to the process it
was opened for: once that process is gone, reads fail and the pid is dropped until the next
listing, so a reused pid is not misread. At most a quarter of the fd limit is spent on these;
beyond it, files are opened per read (by pid number, as before).

Levels, per child (``health`` settings):

* ``memory_warn_mb``: a ``memory_warn`` event when crossed, ``memory_ok`` once back under 90 %;
* ``memory_soft_mb``: ask the child to drain (a ``Drain`` frame for a protocol worker, its
  ``stop_signal`` for a plain command); its exit is then a recycle, restarted by its restart
  type without counting as a crash;
* ``memory_limit_mb``: above it for ``memory_grace`` consecutive samples: dump, kill, and a crash
  with reason ``memory``.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from otp_agents import linux
from otp_agents.events import EventBus, Kind
from otp_agents.health.timewheel import TimeWheel

if TYPE_CHECKING:
    from otp_agents.proc.handle import ChildProcess

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024
HYSTERESIS = 0.9
MAX_TREE = 4096  # processes per child tree, a bound for pathological fork storms
BATCH = 0.1  # seconds: samples due this close together are taken in one wake-up
# A child's descendants are listed again every this many samples (every 5 s at the default
# interval); in between, the same processes are read. A new subprocess is counted within that.
TREE_EVERY = 5


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out = [pid]
    i = 0
    while i < len(out) and len(out) < MAX_TREE:
        out.extend(linux.child_pids(out[i]))
        i += 1
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size from /proc/PID/statm (0 if the process is gone)."""
    try:
        fd = os.open(f"/proc/{pid}/statm", os.O_RDONLY)
    except OSError:
        return 0
    try:
        data = os.read(fd, 256)
    except OSError:
        return 0
    finally:
        os.close(fd)
    return _resident(data)


def _resident(statm: bytes) -> int:
    parts = statm.split()
    return int(parts[1]) * PAGE if len(parts) > 1 else 0


def precise_bytes(pid: int, metric: str) -> int:
    """PSS or USS (private clean + dirty) from /proc/PID/smaps_rollup; RSS for ``rss``."""
    if metric == "rss":
        return rss_bytes(pid)
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except OSError:
        return 0
    total = 0
    keys = (b"Pss:",) if metric == "pss" else (b"Private_Clean:", b"Private_Dirty:")
    for line in text.splitlines():
        if line.startswith(keys):
            total += int(line.split()[1]) * 1024
    return total


def sample(pid: int, metric: str, floor_mb: float) -> tuple[float, bool]:
    """Memory of the tree under ``pid`` in MB, and whether the precise metric was read: a one-off
    sample (open, read, close per process). The sampler's own rounds keep the files open."""
    pids = tree_pids(pid)
    cheap = sum(rss_bytes(p) for p in pids) / MB
    if cheap < floor_mb or metric == "rss":
        return cheap, metric == "rss"
    return sum(precise_bytes(p, metric) for p in pids) / MB, True


@dataclass
class _Watch:
    proc: ChildProcess
    on_soft: Callable[[ChildProcess, float], None]
    on_limit: Callable[[ChildProcess, float], None]
    next_due: float = 0.0
    warned: bool = False
    soft_sent: bool = False
    over: int = 0
    last_mb: float = 0.0
    tree: list[int] = field(default_factory=list)  # the child and its descendants, as last listed
    samples: int = 0
    statm: dict[int, int] = field(default_factory=dict)  # pid -> open /proc/PID/statm
    gone: bool = False


class MemoryWatch:
    """The one sampler task. Children are added when they start and removed when they end."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self._watches: dict[int, _Watch] = {}
        self._wheel: TimeWheel[_Watch] = TimeWheel(BATCH)
        self._changed = anyio.Event()
        self._open_files = 0
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._max_open = 1 << 16 if soft == resource.RLIM_INFINITY else soft // 4

    def add(
        self,
        proc: ChildProcess,
        on_soft: Callable[[ChildProcess, float], None],
        on_limit: Callable[[ChildProcess, float], None],
    ) -> None:
        w = _Watch(proc, on_soft, on_limit)
        self._watches[id(proc)] = w
        self._wheel.add(w, 0.0)  # sampled at once
        self._changed.set()

    def remove(self, proc: ChildProcess) -> None:
        w = self._watches.pop(id(proc), None)
        if w is not None:
            w.gone = True  # its wheel entry is dropped when its slot comes
            self._close_all(w)

    def last_mb(self, proc: ChildProcess) -> float | None:
        w = self._watches.get(id(proc))
        return w.last_mb if w is not None else None

    async def run(self) -> None:
        while True:
            # Children due within the same BATCH slot are sampled in one wake-up.
            now = anyio.current_time()
            for w in self._wheel.take_due(now):
                if not w.gone:
                    self._check(w)
                    if not w.gone:
                        self._wheel.add(w, now + w.proc.spec.settings.memory_interval)
            self._changed = anyio.Event()
            # At least BATCH between wake-ups, even if sampling fell behind the intervals: the
            # pong readers and everything else on the loop get their turn.
            delay = self._wheel.next_time() - anyio.current_time()
            with anyio.move_on_after(min(max(delay, BATCH), 3600.0)):
                await self._changed.wait()

    # -- reading ---------------------------------------------------------------------------------

    def _relist(self, w: _Watch) -> None:
        w.tree = tree_pids(w.proc.pid)
        listed = set(w.tree)
        for pid in [p for p in w.statm if p not in listed]:
            self._close(w, pid)
        for pid in w.tree:
            if pid not in w.statm and self._open_files < self._max_open:
                try:
                    w.statm[pid] = os.open(f"/proc/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue
                self._open_files += 1

    def _resident_mb(self, w: _Watch) -> float:
        total = 0
        gone: list[int] = []
        for pid in w.tree:
            fd = w.statm.get(pid)
            if fd is None:
                total += rss_bytes(pid)
                continue
            try:
                total += _resident(os.pread(fd, 256, 0))
            except OSError:  # that process is gone: its pid must not be read again by number
                self._close(w, pid)
                gone.append(pid)
        if gone:
            w.tree = [p for p in w.tree if p not in gone]
        return total / MB

    def _close(self, w: _Watch, pid: int) -> None:
        fd = w.statm.pop(pid, None)
        if fd is not None:
            os.close(fd)
            self._open_files -= 1

    def _close_all(self, w: _Watch) -> None:
        for pid in list(w.statm):
            self._close(w, pid)

    # -- levels ----------------------------------------------------------------------------------

    def _check(self, w: _Watch) -> None:
        s = w.proc.spec.settings
        if w.proc.exit is not None:
            return
        levels = [v for v in (s.memory_warn_mb, s.memory_soft_mb, s.memory_limit_mb) if v is not None]
        floor = min(levels) * HYSTERESIS if levels else math.inf
        w.samples += 1
        # its memory cgroup, where it has one; under the lowest threshold the charge is enough
        charged = w.proc.groups.working_set_bytes(floor * MB)
        if charged is not None:
            mb = charged / MB
        else:
            if (w.samples - 1) % TREE_EVERY == 0:  # listing descendants costs more than reading statm
                self._relist(w)
            mb = self._resident_mb(w)
            if mb >= floor and s.memory_metric != "rss":
                mb = sum(precise_bytes(p, s.memory_metric) for p in w.tree) / MB
        w.last_mb = mb
        path, pid = w.proc.path, w.proc.pid
        value = round(mb, 1)
        if s.memory_warn_mb is not None:
            if not w.warned and mb >= s.memory_warn_mb:
                w.warned = True
                self.bus.emit(Kind.MEMORY_WARN, path, pid=pid, value=value, threshold=s.memory_warn_mb)
            elif w.warned and mb < s.memory_warn_mb * HYSTERESIS:
                w.warned = False
                self.bus.emit(Kind.MEMORY_OK, path, pid=pid, value=value, threshold=s.memory_warn_mb)
        if s.memory_soft_mb is not None and not w.soft_sent and mb >= s.memory_soft_mb:
            w.soft_sent = True
            self.bus.emit(Kind.MEMORY_SOFT, path, pid=pid, value=value, threshold=s.memory_soft_mb)
            w.on_soft(w.proc, mb)
        if s.memory_limit_mb is not None:
            w.over = w.over + 1 if mb >= s.memory_limit_mb else 0
            if w.over >= s.memory_grace:
                self.bus.emit(
                    Kind.MEMORY_LIMIT,
                    path,
                    pid=pid,
                    value=value,
                    threshold=s.memory_limit_mb,
                    detail=f"{w.over} samples over the limit",
                )
                self.remove(w.proc)
                w.on_limit(w.proc, mb)
