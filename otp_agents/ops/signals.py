"""What ``otp-agents run`` does with each signal it takes (the README's table lists the rest)."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc

from otp_agents import linux
from otp_agents.errors import ChildNotFound, Refused, StartError
from otp_agents.ops.status import status as tree_status
from otp_agents.runtime.host import Host
from otp_agents.runtime.notify import Notifier
from otp_agents.runtime.reload import reload_tree
from otp_agents.runtime.tree import Tree
from otp_agents.tree.supervisor import Supervisor

log = logging.getLogger("otp_agents")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGXCPU)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


class SignalControl:
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
