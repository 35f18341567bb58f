"""Running a whole tree: ``running(spec)``, the embedding API, and :class:`Tree`, the running tree
as its users see it. (``otp-agents run`` wraps this in ``ops/serve.py``.)"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc

from otp_agents import linux
from otp_agents.errors import (
    StartError,
)
from otp_agents.events import EventBus, write_jsonl
from otp_agents.proc import reaper
from otp_agents.proc.guard import Guard
from otp_agents.redact import REDACTOR
from otp_agents.retention import Retention
from otp_agents.runtime.host import Host
from otp_agents.spec.model import CommandSpec, SupervisorSpec, WorkerSpec, ZygoteSpec, walk
from otp_agents.tree.lookup import TreeLookup
from otp_agents.tree.supervisor import Supervisor

log = logging.getLogger("otp_agents")


class Tree(TreeLookup):
    """A running tree: its root supervisor, its host and event bus. Paths are ``root/voice/leaf-3``."""

    def __init__(self, root: Supervisor, host: Host) -> None:
        super().__init__(root)
        self.host = host
        self.bus = host.bus


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
    retention: Retention | None = None,
) -> AsyncIterator[Tree]:
    """Start the tree; yield it; stop it (reverse start order) when the block exits.

    Raises :class:`~otp_agents.process.StartError` if the root cannot start (nothing is left
    running then). ``subreaper`` makes this process adopt and reap orphaned grandchildren; the
    CLI turns it on, and so does a tree with a zygote (its workers are adopted by this process).
    It takes over reaping for the whole process: untracked children that exit are reaped, and
    untracked children left at the end are killed, so an application embedding such a tree must
    not rely on waiting for subprocesses of its own. ``state_dir`` holds
    stack dumps (``dumps/``) and checkpoints (``checkpoints/``); by default a new temporary
    directory, which is kept. ``retention``: how many dumps are kept, when the events file is
    rotated.
    """
    bus = bus or EventBus()
    REDACTOR.learn_all(child.env for _, child in walk(spec) if isinstance(child, CommandSpec | WorkerSpec))
    async with anyio.create_task_group() as tg:
        state = Path(state_dir) if state_dir is not None else Path(tempfile.mkdtemp(prefix="otp-agents-"))
        host = Host(tg=tg, bus=bus, guard=guard, state_dir=state, retention=retention or Retention())
        tg.start_soon(host.memory.run, name="memory sampler")
        tg.start_soon(host.heartbeats.run, name="heartbeats")
        logs_done = anyio.Event()

        async def write_logs() -> None:
            try:
                await host.logs.run()
            finally:
                logs_done.set()

        tg.start_soon(write_logs, name="child logs")
        if on_host is not None:
            on_host(host)
        writer_done = anyio.Event()
        if events_file is not None:
            sub = bus.subscribe()

            async def writer() -> None:
                try:
                    await write_jsonl(sub, events_file, host.retention)
                finally:
                    writer_done.set()

            tg.start_soon(writer)
        else:
            writer_done.set()
        # Workers forked by a zygote are adopted by this process, which must reap them.
        subreaper = subreaper or any(isinstance(node, ZygoteSpec) for _path, node in walk(spec))
        if subreaper:
            linux.set_child_subreaper()
            host.sweep = lambda: reaper.sweep_orphans(host, spec.id)
            tg.start_soon(reaper.reap_on_sigchld, host, spec.id)
        root = Supervisor(spec, spec.id, host)
        start_error: StartError | None = None
        try:
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
        finally:  # also when the body raised: nothing of the host is left open
            with anyio.CancelScope(shield=True):
                for client in host.zygote_clients.values():
                    client.close()
                with anyio.move_on_after(5):  # the children's last checkpoints, for the next run
                    await host.checkpoints.flush()
                if subreaper:
                    await reaper.kill_adopted(host, spec.id)
                bus.close()
                host.logs.close()
                with anyio.move_on_after(5):
                    await writer_done.wait()
                    await logs_done.wait()
        tg.cancel_scope.cancel()
    if start_error is not None:
        raise start_error
