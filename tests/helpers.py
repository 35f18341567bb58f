"""Shared test helpers: real trees, an event recorder, waiting for calm."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from otp_agents import linux
from otp_agents.events import Event, EventBus, Kind
from otp_agents.runtime.tree import Tree, running
from otp_agents.spec.load import from_dict
from otp_agents.tree.supervisor import Supervisor

ROOT = Path(__file__).resolve().parent.parent
FAULTY = [str(ROOT / "workers" / "faulty.sh")]
WAIT = 20.0  # failure bound for waits; never a speed claim


def cmd(cid: str, **extra: Any) -> dict[str, Any]:
    """A plain-command child running workers/faulty.sh (signal-driven exits)."""
    return {"id": cid, "command": FAULTY, "shutdown": 2, **extra}


def worker(cid: str, target: str, **extra: Any) -> dict[str, Any]:
    return {"id": cid, "module": target, "shutdown": 3, "cwd": str(ROOT), **extra}


class Recorder:
    """Collects every event; lets a test wait for one."""

    def __init__(self, bus: EventBus) -> None:
        self.events: list[Event] = []
        self._changed = anyio.Event()
        bus.listen(self._on)

    def _on(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, kind: Kind, path: str | None = None) -> list[Event]:
        return [e for e in self.events if e.kind is kind and (path is None or e.path == path)]

    def since(self, mark: int) -> list[Event]:
        return self.events[mark:]

    def mark(self) -> int:
        return len(self.events)

    async def wait_for(self, pred: Callable[[Event], bool], start: int = 0) -> Event:
        with anyio.fail_after(WAIT):
            while True:
                for e in self.events[start:]:
                    if pred(e):
                        return e
                start = len(self.events)
                self._changed = anyio.Event()
                await self._changed.wait()

    async def wait_kind(self, kind: Kind, path: str, start: int = 0) -> Event:
        return await self.wait_for(lambda e: e.kind is kind and e.path == path, start)

    def compact(self, start: int = 0, kinds: tuple[Kind, ...] | None = None) -> list[str]:
        """Events as 'kind path' strings, for readable assertions."""
        return [f"{e.kind.value} {e.path}" for e in self.events[start:] if kinds is None or e.kind in kinds]


def supervisors(sup: Supervisor) -> list[Supervisor]:
    out = [sup]
    for slot in sup.slots.values():
        if isinstance(slot.instance, Supervisor):
            out.extend(supervisors(slot.instance))
    return out


async def settle(tree: Tree) -> None:
    """Wait until every supervisor has an empty mailbox and nothing in progress (twice in a row)."""
    calm = 0
    with anyio.fail_after(WAIT):
        while calm < 3:
            await anyio.sleep(0.002)
            calm = calm + 1 if all(s.idle() for s in supervisors(tree.root)) else 0


@asynccontextmanager
async def tree_of(
    config: dict[str, Any], state_dir: Path | None = None
) -> AsyncIterator[tuple[Tree, Recorder]]:
    bus = EventBus()
    rec = Recorder(bus)
    async with running(from_dict(config), bus=bus, state_dir=state_dir) as tree:
        yield tree, rec


def alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    fields = linux.stat_fields(pid)
    return fields is not None and fields[0] != b"Z"


def _waits_on_child(pid: int) -> bool:
    # A process that is already gone counts as armed: the caller's own wait will tell.
    return bool(linux.child_pids(pid)) or not alive(pid)


async def armed(pid: int | None) -> int:
    """Wait until a faulty.sh process has installed its traps (it then waits on a child)."""
    assert pid is not None
    with anyio.fail_after(WAIT):
        while not _waits_on_child(pid):  # noqa: ASYNC110 - /proc has no wakeup
            await anyio.sleep(0.005)
    return pid


async def signal_child(tree: Tree, path: str, sig: int) -> int:
    """Send sig to the child at path once it is armed; returns the pid signalled."""
    pid = await armed(tree.pid(path))
    os.kill(pid, sig)
    return pid


def spares_of(zygote_pid: int, candidates: Iterable[int]) -> set[int]:
    """The zygote's spares among ``candidates``: workers forked ahead of need, adopted by the
    supervisor, still in the zygote's process group. A fork in progress (the zygote's own
    short-lived intermediate child, in the same group) is not one."""
    found = set()
    for pid in candidates:
        with contextlib.suppress(OSError, ValueError, IndexError):
            if pid == zygote_pid or os.getpgid(pid) != zygote_pid:
                continue
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != zygote_pid:
                found.add(pid)
    return found


def descendants(pid: int) -> set[int]:
    """Every process below pid, from /proc."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        kids = linux.child_pids(todo.pop())
        out.update(kids)
        todo.extend(kids)
    return out


def run_cli(
    tree: Path,
    state: Path,
    events: Path,
    backend: str,
    log: Path,
    *extra: str,
    prefix: tuple[str, ...] = (),
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """``otp-agents run`` as a real process with its own state dir, events file and stderr log."""
    argv = [*prefix, sys.executable, "-m", "otp_agents.cli", "run", str(tree), "--backend", backend]
    argv += ["--state-dir", str(state), "--events", str(events), *extra]
    with open(log, "wb") as err:
        return subprocess.Popen(argv, cwd=ROOT, stderr=err, **popen)


def poll(fn: Callable[[], Any], what: str = "condition", limit: float = WAIT) -> Any:
    """Call ``fn`` until it returns something true (returned), for at most ``limit`` seconds;
    for state that has no wakeup (files, /proc, another process's answers)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {limit}s")
