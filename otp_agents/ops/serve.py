"""``otp-agents run``'s main loop: the tree, with its control socket, metrics endpoint, tree-file
watch and service-manager notifications around it, until the root ends or a stop signal comes."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import anyio

from otp_agents.errors import EXIT_GAVE_UP, EXIT_OK, EXIT_START_FAILED, StartAborted, StartError
from otp_agents.events import OPERATOR, EventBus, log_event
from otp_agents.ops.control import ControlServer
from otp_agents.ops.control_client import socket_path
from otp_agents.ops.metrics import Metrics
from otp_agents.ops.metrics import serve as serve_metrics
from otp_agents.ops.signals import HANDLED_SIGNALS, SignalControl
from otp_agents.proc.guard import Guard
from otp_agents.retention import Retention
from otp_agents.runtime.notify import Notifier
from otp_agents.runtime.reload import watch_tree_file
from otp_agents.runtime.tree import running
from otp_agents.spec.model import SupervisorSpec

log = logging.getLogger("otp_agents")


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
    retention: Retention | None = None,
) -> Outcome:
    """Run until the root ends or a stop signal arrives; the CLI's main loop.

    Signals are taken from the start: a stop requested while the tree is still starting stops
    it as soon as the child being started is up (each start is bounded by its start_timeout).
    """
    bus = EventBus()
    bus.listen(log_event)
    notifier = Notifier()
    ctl = SignalControl(notifier, tree_file)
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
                    retention=retention,
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
                        tg.start_soon(root.stop, OPERATOR.get())  # who asked, for the events

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
