"""Memory circuit breakers: one sampler for every watched child, reading /proc.

A child is measured over its whole process tree (grandchildren included). Each sample first
sums resident memory from ``/proc/PID/statm`` (a few microseconds per process). Only when that
cheap total reaches the lowest configured threshold is the configured metric read from
``/proc/PID/smaps_rollup`` (``pss`` by default; ``uss`` = private pages; or ``rss``). Since
RSS >= PSS >= USS, skipping the precise read below the threshold never misses a breach.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from . import linux
from .events import EventBus, Kind

if TYPE_CHECKING:
    from .process import ChildProcess

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
    parts = data.split()
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


def sample(pid: int, metric: str, floor_mb: float, pids: list[int] | None = None) -> tuple[float, bool]:
    """Memory of the tree under ``pid`` (or of ``pids``) in MB, and whether the precise metric
    was read."""
    pids = tree_pids(pid) if pids is None else pids
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


class MemoryWatch:
    """The one sampler task. Children are added when they start and removed when they end."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self._watches: dict[int, _Watch] = {}
        self._changed = anyio.Event()

    def add(
        self,
        proc: ChildProcess,
        on_soft: Callable[[ChildProcess, float], None],
        on_limit: Callable[[ChildProcess, float], None],
    ) -> None:
        self._watches[id(proc)] = _Watch(proc, on_soft, on_limit, next_due=anyio.current_time())
        self._changed.set()

    def remove(self, proc: ChildProcess) -> None:
        self._watches.pop(id(proc), None)

    def last_mb(self, proc: ChildProcess) -> float | None:
        w = self._watches.get(id(proc))
        return w.last_mb if w is not None else None

    async def run(self) -> None:
        while True:
            now = anyio.current_time()
            wake = math.inf
            # Children due within the next BATCH seconds are sampled now, together: one wake-up
            # serves many children, instead of one wake-up (and one scan) per child.
            for w in list(self._watches.values()):
                if w.next_due <= now + BATCH:
                    self._check(w)
                    w.next_due = now + w.proc.spec.settings.memory_interval
                wake = min(wake, w.next_due)
            self._changed = anyio.Event()
            delay = max(BATCH, wake - anyio.current_time()) if wake != math.inf else 3600
            with anyio.move_on_after(delay):
                await self._changed.wait()

    def _check(self, w: _Watch) -> None:
        s = w.proc.spec.settings
        if w.proc.exit is not None:
            return
        levels = [v for v in (s.memory_warn_mb, s.memory_soft_mb, s.memory_limit_mb) if v is not None]
        floor = min(levels) * HYSTERESIS if levels else math.inf
        if w.samples % TREE_EVERY == 0:  # listing descendants costs more than reading statm
            w.tree = tree_pids(w.proc.pid)
        w.samples += 1
        mb, _ = sample(w.proc.pid, s.memory_metric, floor, w.tree)
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
