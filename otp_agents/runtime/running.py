"""Running a whole tree: the task group, the event sinks, signals, orphan reaping.

``running(spec)`` is the embedding API (tests use it); ``run(spec)`` is what ``otp-agents run``
calls: it also handles SIGTERM/SIGINT (first: graceful stop in reverse start order; second:
SIGKILL everything) and turns the outcome into an exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from otp_agents import linux
from otp_agents.errors import (
    EXIT_GAVE_UP,
    EXIT_OK,
    EXIT_START_FAILED,
    ChildNotFound,
    Refused,
    StartAborted,
    StartError,
)
from otp_agents.events import EventBus, Kind, log_event, write_jsonl
from otp_agents.ops.control import ControlServer, reload_tree, socket_path, watch_tree_file
from otp_agents.ops.control import status as tree_status
from otp_agents.ops.metrics import Metrics
from otp_agents.ops.metrics import serve as serve_metrics
from otp_agents.proc.guard import Guard
from otp_agents.proc.handle import Host
from otp_agents.redact import REDACTOR
from otp_agents.runtime.notify import Notifier
from otp_agents.spec.model import CommandSpec, SupervisorSpec, WorkerSpec, ZygoteSpec, walk
from otp_agents.tree.supervisor import Slot, Supervisor

log = logging.getLogger("otp_agents")


class Tree:
    """A running tree. Paths are ``root/voice/leaf-3``."""

    def __init__(self, root: Supervisor, host: Host) -> None:
        self.root = root
        self.host = host
        self.bus = host.bus

    def supervisor(self, path: str) -> Supervisor:
        node = self._walk(path)
        if isinstance(node, Supervisor):
            return node
        if isinstance(node, Slot) and isinstance(node.instance, Supervisor):
            return node.instance
        raise ChildNotFound(f"{path} is not a running supervisor")

    def slot(self, path: str) -> Slot:
        node = self._walk(path)
        if not isinstance(node, Slot):
            raise ChildNotFound(f"{path} is the root supervisor, not a child")
        return node

    def pid(self, path: str) -> int | None:
        """The OS pid of a running process child, else None."""
        try:
            inst = self.slot(path).instance
        except ChildNotFound:
            return None
        return getattr(inst, "pid", None) if inst is not None else None

    def _walk(self, path: str) -> Supervisor | Slot:
        parts = path.split("/")
        if parts[0] != self.root.path:
            raise ChildNotFound(path)
        node: Supervisor | Slot = self.root
        for part in parts[1:]:
            sup = node if isinstance(node, Supervisor) else node.instance
            if not isinstance(sup, Supervisor) or part not in sup.slots:
                raise ChildNotFound(path)
            node = sup.slots[part]
        return node


@asynccontextmanager
async def running(
    spec: SupervisorSpec,
    *,
    events_file: str | None = None,
    subreaper: bool = False,
    bus: EventBus | None = None,
    guard: Guard | None = None,
    on_host: Callable[[Host], None] | None = None,
    state_dir: str | Path | None = None,
) -> AsyncIterator[Tree]:
    """Start the tree; yield it; stop it (reverse start order) when the block exits.

    Raises :class:`~otp_agents.process.StartError` if the root cannot start (nothing is left
    running then). ``subreaper`` makes this process adopt and reap orphaned grandchildren; the
    CLI turns it on, and so does a tree with a zygote (its workers are adopted by this process).
    It takes over reaping for the whole process: untracked children that exit are reaped, and
    untracked children left at the end are killed, so an application embedding such a tree must
    not rely on waiting for subprocesses of its own. ``state_dir`` holds
    stack dumps (``dumps/``) and checkpoints (``checkpoints/``); by default a new temporary
    directory, which is kept.
    """
    bus = bus or EventBus()
    REDACTOR.learn_all(child.env for _, child in walk(spec) if isinstance(child, CommandSpec | WorkerSpec))
    async with anyio.create_task_group() as tg:
        state = Path(state_dir) if state_dir is not None else Path(tempfile.mkdtemp(prefix="otp-agents-"))
        host = Host(tg=tg, bus=bus, guard=guard, state_dir=state)
        tg.start_soon(host.memory.run, name="memory sampler")
        tg.start_soon(host.heartbeats.run, name="heartbeats")
        if on_host is not None:
            on_host(host)
        writer_done = anyio.Event()
        if events_file is not None:
            sub = bus.subscribe()

            async def writer() -> None:
                try:
                    await write_jsonl(sub, events_file)
                finally:
                    writer_done.set()

            tg.start_soon(writer)
        else:
            writer_done.set()
        # Workers forked by a zygote are adopted by this process, which must reap them.
        subreaper = subreaper or any(isinstance(node, ZygoteSpec) for _path, node in walk(spec))
        if subreaper:
            linux.set_child_subreaper()
            host.after_reap = lambda: _sweep_orphans(host, spec.id)
            tg.start_soon(_reap_on_sigchld, host, spec.id)
        root = Supervisor(spec, spec.id, host)
        start_error: StartError | None = None
        try:
            await root.start()
        except StartError as exc:
            start_error = exc  # raised below, outside the task group, as itself
        else:
            try:
                yield Tree(root, host)
            finally:
                with anyio.CancelScope(shield=True):
                    if not root.finished.is_set():
                        await root.stop()
        with anyio.CancelScope(shield=True):
            for client in host.zygote_clients.values():
                client.close()
            with anyio.move_on_after(5):  # the children's last checkpoints, for the next run
                await host.checkpoints.flush()
            if subreaper:
                await _kill_adopted(host, spec.id)
            bus.close()
            with anyio.move_on_after(5):
                await writer_done.wait()
        tg.cancel_scope.cancel()
    if start_error is not None:
        raise start_error


@dataclass(frozen=True)
class Outcome:
    code: int
    message: str


async def run(
    spec: SupervisorSpec,
    *,
    events_file: str | None = None,
    guard: Guard | None = None,
    state_dir: str | Path | None = None,
    metrics_socket: socket.socket | None = None,
    tree_file: str | None = None,
    control_group: int | None = None,
    watch_tree: float | None = None,
    tree_loaded: bytes | None = None,
) -> Outcome:
    """Run until the root ends or a stop signal arrives; the CLI's main loop.

    Signals are taken from the start: a stop requested while the tree is still starting stops
    it as soon as the child being started is up (each start is bounded by its start_timeout).
    """
    bus = EventBus()
    bus.listen(log_event)
    notifier = Notifier()
    ctl = _SignalControl(notifier, tree_file)
    metrics = Metrics() if metrics_socket is not None else None
    ready, stopping = anyio.Event(), anyio.Event()
    ctl.stopping = stopping
    outcome: Outcome | None = None
    with anyio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ctl.serve, signals, tg)
            if metrics is not None and metrics_socket is not None:
                tg.start_soon(serve_metrics, metrics, metrics_socket, ready, stopping)
            try:
                async with running(
                    spec,
                    events_file=events_file,
                    subreaper=True,
                    bus=bus,
                    guard=guard,
                    on_host=ctl.attach,
                    state_dir=state_dir,
                ) as tree:
                    ctl.root, ctl.tree = tree.root, tree
                    if ctl.count:
                        tg.start_soon(tree.root.stop)
                    elif ctl.reload_pending:  # a SIGHUP that came while the tree was starting
                        tg.start_soon(ctl.reload)
                    root = tree.root

                    def stop_requested() -> None:
                        notifier.stopping("stop requested over the control socket")
                        stopping.set()
                        tg.start_soon(root.stop)

                    control = ControlServer(
                        tree, socket_path(tree.host.state_dir), stop_requested, tree_file, control_group
                    )
                    tg.start_soon(control.serve, name="control socket")
                    if watch_tree is not None and tree_file is not None:
                        tg.start_soon(
                            watch_tree_file, tree, tree_file, watch_tree, tree_loaded, name="tree file watch"
                        )
                    tg.start_soon(notifier.watchdog, name="sd_notify watchdog")
                    if metrics is not None:
                        metrics.attach(tree)
                    ready.set()
                    notifier.ready(f"{spec.id}: running")
                    await tree.root.finished.wait()
                    ex = tree.root.exit
                assert ex is not None
                if ex.requested:
                    outcome = Outcome(EXIT_OK, f"{spec.id}: stopped")
                elif ex.reason == "auto_shutdown":  # OTP: exits with reason shutdown, not a failure
                    outcome = Outcome(EXIT_OK, f"{spec.id}: done ({ex.child} ended; auto_shutdown)")
                else:
                    outcome = Outcome(EXIT_GAVE_UP, f"{spec.id}: root supervisor gave up: {ex.describe()}")
            except StartAborted:
                outcome = Outcome(EXIT_OK, f"{spec.id}: stopped while starting")
            except StartError as exc:
                outcome = Outcome(EXIT_START_FAILED, f"{spec.id}: could not start: {exc}")
            tg.cancel_scope.cancel()
    if outcome is None:  # the second signal cut the start short
        outcome = Outcome(EXIT_OK, f"{spec.id}: killed while starting")
    notifier.status(outcome.message)
    notifier.close()
    return outcome


# What ``otp-agents run`` does on each signal it takes (the README's "Signals" lists the rest).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGXCPU)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


class _SignalControl:
    """SIGTERM, SIGINT, SIGQUIT (and SIGXCPU, a CPU-time limit reached): orderly stop; a second
    one: SIGKILL everything now. SIGHUP: reload the tree file, as ``otp-agents reload`` does.
    SIGUSR1: the tree's status into the log. SIGUSR2 and SIGALRM: logged, nothing else (their
    default would end the supervisor, and its guard would kill every child)."""

    def __init__(self, notifier: Notifier, tree_file: str | None = None) -> None:
        self.count = 0
        self.host: Host | None = None
        self.root: Supervisor | None = None
        self.tree: Tree | None = None
        self.tree_file = tree_file
        self.notifier = notifier
        self.stopping: anyio.Event | None = None
        self.reload_pending = False
        self._reloading = False

    def attach(self, host: Host) -> None:
        self.host = host

    async def serve(self, signals: AsyncIterator[int], tg: anyio.abc.TaskGroup) -> None:
        async for sig in signals:
            name = linux.signal_name(sig)
            if sig == signal.SIGHUP:
                self._hangup(tg)
            elif sig == signal.SIGUSR1:
                self._log_status()
            elif sig not in STOP_SIGNALS:
                log.info("%s received: ignored (it has no meaning for otp-agents)", name)
            else:
                self._stop(name, tg)

    def _stop(self, name: str, tg: anyio.abc.TaskGroup) -> None:
        self.count += 1
        if self.count == 1:
            log.info("%s received: stopping the tree in reverse start order", name)
            self.notifier.stopping(f"{name} received: stopping")
            if self.stopping is not None:
                self.stopping.set()
            if self.host is not None:
                self.host.stopping = True
            if self.root is not None:
                tg.start_soon(self.root.stop)
        else:
            log.warning("%s received again: killing every child now", name)
            if self.root is not None:
                tg.start_soon(self.root.kill)
            else:  # still starting: abandon it; PDEATHSIG and the guard end the children
                tg.cancel_scope.cancel()

    def _hangup(self, tg: anyio.abc.TaskGroup) -> None:
        if self.tree_file is None:
            log.warning("SIGHUP received: this tree was not started from a file, nothing to reload")
        elif self.count:
            log.info("SIGHUP received: ignored, the tree is stopping")
        elif self.tree is None:
            log.info("SIGHUP received while the tree starts: reloading %s once it is up", self.tree_file)
            self.reload_pending = True
        elif self._reloading:
            self.reload_pending = True  # the file may have changed again: read it once more after
        else:
            log.info("SIGHUP received: reloading %s", self.tree_file)
            tg.start_soon(self.reload)

    async def reload(self) -> None:
        """The same reload as ``otp-agents reload``; a refused file changes nothing."""
        assert self.tree is not None and self.tree_file is not None
        self._reloading = True
        try:
            while True:
                self.reload_pending = False
                try:
                    changes = await reload_tree(self.tree, self.tree_file)
                except (Refused, ChildNotFound, StartError) as exc:
                    log.error("SIGHUP: %s", exc)
                except Exception:  # a reload must never take the running tree down
                    log.exception("SIGHUP: the reload of %s failed", self.tree_file)
                else:
                    log.info("SIGHUP: reloaded %s: %s", self.tree_file, "; ".join(changes) or "no changes")
                if not self.reload_pending or self.count:
                    return
        finally:
            self._reloading = False

    def _log_status(self) -> None:
        if self.tree is None:
            log.info("SIGUSR1 received: the tree is still starting")
            return
        lines = _status_lines(tree_status(self.tree)["children"])
        log.info("SIGUSR1 received: status of %d children\n%s", len(lines), "\n".join(lines))


def _status_lines(children: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for c in children:
        pid = f" pid {c['pid']}" if c.get("pid") else ""
        out.append(f"  {c['path']} {c['status']}{pid} restarts {c['restarts']}")
        out.extend(_status_lines(c.get("children", [])))
    return out


# -- orphans -----------------------------------------------------------------------------------


def _sweep_orphans(host: Host, root: str) -> None:
    if host.forks_in_flight:  # a forked worker may be ours already but not tracked yet
        return
    for pid, pgid, status in linux.reap_orphans(host.tracked):
        # An orphan still in a child's process group is attributed to that child.
        owner = host.tracked.get(pgid, root) if pgid is not None else root
        host.bus.emit(Kind.ORPHAN_REAPED, owner, pid=pid, code=status.code, signal=_sig(status.signal))


def _sig(sig: int | None) -> str | None:
    return linux.signal_name(sig) if sig is not None else None


async def _reap_on_sigchld(host: Host, root: str) -> None:
    with anyio.open_signal_receiver(signal.SIGCHLD) as signals:
        _sweep_orphans(host, root)
        async for _ in signals:
            _sweep_orphans(host, root)


async def _kill_adopted(host: Host, root: str) -> None:
    """At the very end: adopted descendants that escaped their process group die too."""
    for _ in range(3):
        keeper = host.guard.pid if host.guard is not None else None
        strays = [pid for pid in linux.child_pids() if pid not in host.tracked and pid != keeper]
        if not strays:
            return
        for pid in strays:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await anyio.sleep(0.05)
        _sweep_orphans(host, root)
