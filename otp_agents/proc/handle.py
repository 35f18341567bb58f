"""One child process: its handle, exit detection and the stop ladder.

Each child runs in its own process group, receives SIGKILL if the supervisor dies
(``PR_SET_PDEATHSIG``), and is watched through a pidfd: its exit wakes the event loop directly,
with no polling and no thread. When the group leader exits, whatever it left in its group is
killed before the leader is reaped (so the group id cannot have been recycled), as systemd's
``KillMode=control-group`` does.

Stop ladder (``shutdown`` in the child spec):

* a number of seconds: the polite request (``stop_signal`` to the group for a plain command;
  a ``Shutdown`` frame plus ``stop_signal`` to the worker itself for a protocol worker), wait up
  to that long, then SIGKILL to the whole group (after the host's ``before_kill``: a stack dump);
* ``brutal_kill``: SIGKILL to the group at once;
* ``infinity``: the polite request, then wait as long as it takes.

A handle knows nothing of the tree or of the monitors: what it needs from whoever runs it is
:class:`ProcHost` (the runtime's ``Host`` is one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
import anyio.abc

from otp_agents import linux
from otp_agents.events import EventBus, Kind
from otp_agents.linux import ExitStatus
from otp_agents.proc.child_groups import ChildGroups
from otp_agents.proc.guard import Guard
from otp_agents.proc.output import Output
from otp_agents.spec.model import ProcessSpec
from otp_agents.wire.channel import Channel, ChannelClosed
from otp_agents.wire.env import PLAIN_BYE
from otp_agents.wire.framing import FrameError
from otp_agents.wire.messages import Bye, Dump, DumpRequest, Hello, Message, Ready, Shutdown

log = logging.getLogger("otp_agents")

# After SIGKILL a process normally disappears within milliseconds; a process stuck in
# uninterruptible sleep may not. We stop waiting after this long and say so.
KILL_WAIT = 10.0
# How long an exited worker's last frames (its final checkpoint, say) may take to be read before
# its exit is handled. The group is dead by then, so end of stream normally comes at once.
DRAIN_WAIT = 0.2


class ProcHost(Protocol):
    """What a process handle needs from whoever runs it."""

    tg: anyio.abc.TaskGroup
    bus: EventBus
    tracked: dict[int, str]  # pid -> path, for pids with a watcher
    guard: Guard | None  # kills our process groups if this process dies

    def after_reap(self) -> None:
        """Called after each reap (a subreaper sweeps the orphans it adopted)."""

    async def before_kill(self, proc: ChildProcess, why: str) -> None:
        """Called before a SIGKILL for a reason other than a request (a stack dump)."""

    def on_frame(self, proc: ChildProcess, msg: Message) -> None:
        """A frame from the worker that the handle does not serve itself."""

    def on_gone(self, proc: ChildProcess) -> None:
        """The process is gone and its last frames are read."""

    async def on_output(self, proc: ChildProcess, stream: str, line: str) -> None:
        """One line the child wrote on stdout (``out``) or stderr (``err``)."""


@dataclass
class Exit:
    """The end of one child process, as the supervisor sees it."""

    status: ExitStatus
    requested: bool  # the supervisor asked it to stop
    fault: str | None = None  # set when the supervisor killed it for a fault (protocol error...)

    def describe(self) -> str:
        text = self.status.describe()
        return f"{text} ({self.fault})" if self.fault else text


class ChildProcess:
    """One running OS process. Built only by :func:`spawn`."""

    def __init__(
        self,
        path: str,
        spec: ProcessSpec,
        pid: int,
        popen: subprocess.Popen[bytes] | None,
        pidfd: int,
        host: ProcHost,
        on_exit: Callable[[ChildProcess], None],
    ) -> None:
        self.path = path
        self.spec = spec
        self.pid = pid
        self.forked_from: str | None = None  # the zygote's image, when forked rather than spawned
        self.started_at = time.monotonic()
        self.started_wall = time.time()  # names its log file
        self.exited = anyio.Event()
        self.exit: Exit | None = None
        self.channel: Channel | None = None
        self._popen = popen
        self._pidfd = pidfd
        self._host = host
        self._on_exit = on_exit
        self._requested = False
        self._fault: str | None = None
        # health state, read by monitors and status
        self.ready = False
        self.last_pong = time.monotonic()
        self.rtt: float | None = None
        self.loop_lag_ms: float | None = None
        self.slow_ping_at = -1e9
        self.recycle: str | None = None  # asked to drain: its exit is a recycle, not a crash
        self.respecified = anyio.Event()  # set when a reload changed its supervision in place
        self.lifetime_factor: float | None = None  # the lifetime's jitter, drawn once
        self.lifetime_from = 0.0  # when its lifetime began (its monitors' first start)
        self.health_kill: str | None = None
        self.last_words: str | None = None  # the reason in its Bye, when it stated one
        self.output: Output | None = None  # its stdout and stderr, being read
        self.signal_file: str | None = None  # where faulthandler writes on dump_signal
        self.dump_signal: int | None = None
        self._dump_seq = 0
        self._dumps: dict[int, tuple[anyio.Event, list[str]]] = {}
        self._reader_done = anyio.Event()
        host.tracked[self.pid] = path
        if host.guard is not None:
            host.guard.add(self.pid)
        # cgroups of its own, where the tree has them: killing one kills all it started; the
        # other is where the breaker reads its memory and the kernel limits it
        self.groups = ChildGroups.place(host.tg, host.guard, path, pid)
        self.groups.limit(spec.settings)

    def respec(self, spec: ProcessSpec) -> None:
        """A reload changed how this process is supervised (health limits, restart type,
        shutdown), not the process: keep it, and let its monitors take the new settings."""
        self.spec = spec
        self.groups.limit(spec.settings)
        self.respecified.set()

    def _kernel_memory_kill(self, status: ExitStatus) -> None:
        """A SIGKILL from the kernel's OOM killer in its memory cgroup: a ``memory`` crash, as the
        breaker's own kill would be."""
        if self._requested or self._fault is not None or (peak := self.groups.oom_killed(status)) is None:
            return
        self._fault = "memory"
        self._host.bus.emit(
            Kind.MEMORY_LIMIT,
            self.path,
            pid=self.pid,
            value=peak,
            threshold=self.spec.settings.memory_max_mb,
            detail="killed by the kernel at memory_max_mb (its memory cgroup's OOM killer)",
        )

    # -- exit detection ------------------------------------------------------------------------

    async def _watch(self) -> None:
        # The leader has exited but is not reaped yet, so its pid (and the group id) cannot have
        # been reused: killing what is left of the group is safe. On cancellation (runtime
        # teardown) the same holds while we still own the unreaped pid.
        try:
            await anyio.wait_readable(self._pidfd)
        except BaseException:
            self._signal_group(signal.SIGKILL)
            self._reap()
            self._untrack()
            raise
        self._signal_group(signal.SIGKILL)
        status = self._reap()
        self._kernel_memory_kill(status)
        self._host.tg.start_soon(self.groups.dispose, name=f"cgroups of {self.path}")
        self._host.after_reap()  # orphans of this group are still attributed to this child
        self._untrack()
        if self.signal_file is not None:  # what faulthandler wrote there was read by now, or never will be
            with contextlib.suppress(OSError):
                os.unlink(self.signal_file)
        self.exit = Exit(status=status, requested=self._requested, fault=self._fault)
        if self.channel is not None and self.ready:  # during the handshake, spawn() owns it
            # What it wrote just before dying (a last checkpoint) may still be unread: let the
            # reader take it up to end of stream, so it is handled before the exit is, and
            # nothing of this instance arrives after its supervisor moved on.
            with anyio.move_on_after(DRAIN_WAIT):
                await self._reader_done.wait()
            await self.channel.aclose()
        if self.output is not None:  # its last words on stderr belong to this exit's report
            with anyio.move_on_after(DRAIN_WAIT):
                await self.output.done.wait()
        self._host.on_gone(self)  # after its last frames: a late publish cannot outlive it
        self.exited.set()
        self._on_exit(self)

    @property
    def last_output(self) -> list[str]:
        """The last lines it wrote on stderr (what a crash usually explains itself with)."""
        return list(self.output.stderr_tail) if self.output is not None else []

    def _untrack(self) -> None:
        self._host.tracked.pop(self.pid, None)
        if self._host.guard is not None:
            self._host.guard.remove(self.pid)

    def _reap(self) -> ExitStatus:
        try:
            result = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED)
            status = ExitStatus.from_waitid(result) if result else ExitStatus(None, signal.SIGKILL)
        except ChildProcessError:  # reaped elsewhere: we can no longer know how it ended
            status = ExitStatus(code=None, signal=None)
        finally:
            os.close(self._pidfd)
        # Tell subprocess the process is gone, so Popen.__del__ never waits on a recycled pid.
        if self._popen is not None:
            self._popen.returncode = status.code if status.code is not None else -(status.signal or 0)
        return status

    # -- signalling ----------------------------------------------------------------------------

    def _signal_group(self, sig: int) -> None:
        if self.exit is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        if sig == signal.SIGKILL:
            self.groups.kill()  # and whatever left the group (setsid, double fork)

    def _signal_leader(self, sig: int) -> None:
        if self.exit is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, sig)

    def polite_signal(self) -> None:
        """The child spec's ``stop_signal`` to the whole group (a plain command's drain).

        The supervisor asked for this exit, so however the command ends it is not a crash."""
        self._requested = True
        self._signal_group(linux.parse_signal(self.spec.stop_signal))

    async def request_dump(self, limit: float) -> str | None:
        """Ask the worker for its stacks over the channel; None if no answer within ``limit``."""
        if self.channel is None or self.exit is not None:
            return None
        self._dump_seq += 1
        ident = self._dump_seq
        done, box = anyio.Event(), list[str]()
        self._dumps[ident] = (done, box)
        try:
            with anyio.move_on_after(limit):
                await self.channel.send(DumpRequest(id=ident))
                await done.wait()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            self._dumps.pop(ident, None)
        return box[0] if box else None

    def fault(self, reason: str) -> None:
        """Kill the child because it misbehaved; its exit will be a crash with this reason."""
        if self.exit is None and self._fault is None:
            self._fault = reason
            self._signal_group(signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the whole group now (a requested stop)."""
        self._requested = True
        self._signal_group(signal.SIGKILL)

    async def stop(self) -> bool:
        """Run the stop ladder; returns True if SIGKILL was needed. Waits for the exit."""
        try:
            return await self._stop()
        except BaseException:
            self.kill()  # cancelled half-way (e.g. its supervisor was killed): finish the job
            raise

    async def _stop(self) -> bool:
        self._requested = True
        if self.exited.is_set():
            return False
        shutdown = self.spec.shutdown
        if shutdown == "brutal_kill":
            self.kill()
            await self.wait_killed()
            return True
        await self._polite_stop(None if shutdown == "infinity" else float(shutdown))
        if shutdown == "infinity":
            await self.exited.wait()
            return False
        with anyio.move_on_after(float(shutdown)):
            await self.exited.wait()
            return False
        log.warning("%s: did not stop within %ss, sending SIGKILL", self.path, shutdown)
        if self.exit is None:
            await self._host.before_kill(self, "shutdown_timeout")
        self.kill()
        await self.wait_killed()
        return True

    async def _polite_stop(self, grace: float | None) -> None:
        sig = linux.parse_signal(self.spec.stop_signal)
        if self.channel is None:
            self._signal_group(sig)
            return
        with anyio.move_on_after(0.5):
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await self.channel.send(Shutdown(timeout=grace or 0.0))
        self._signal_leader(sig)

    async def wait_killed(self) -> None:
        with anyio.move_on_after(KILL_WAIT):
            await self.exited.wait()
            return
        log.error("%s: pid %d still not gone %ss after SIGKILL", self.path, self.pid, KILL_WAIT)

    # -- protocol reader -------------------------------------------------------------------------

    async def _read(self, channel: Channel) -> None:
        """Serve the worker's frames after Ready. A bad frame is the child's fault, not ours."""
        bus = self._host.bus
        try:
            while True:
                msg = await channel.receive()
                self._handle(msg, bus)
        except ChannelClosed:
            return
        except FrameError as exc:
            bus.emit(Kind.PROTOCOL_ERROR, self.path, pid=self.pid, reason=exc.kind, detail=exc.detail)
            self.fault(f"protocol error: {exc}")
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            return
        finally:
            self._reader_done.set()

    @staticmethod
    async def _send_quietly(channel: Channel, msg: Message) -> None:
        # Bounded: a worker that asks and stops reading must not pile up tasks here.
        with (
            anyio.move_on_after(2),
            contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError),
        ):
            await channel.send(msg)

    def _handle(self, msg: Message, bus: EventBus) -> None:
        """One frame from the worker. Dumps, Bye and protocol faults are the handle's own
        business; everything else is served by the host's table of frame handlers."""
        if isinstance(msg, Dump):
            waiter = self._dumps.get(msg.id)
            if waiter is not None:
                waiter[1].append(msg.text)
                waiter[0].set()
        elif isinstance(msg, Bye):
            self.last_words = msg.reason if msg.reason not in PLAIN_BYE else None
        elif isinstance(msg, Hello | Ready):
            bus.emit(
                Kind.PROTOCOL_ERROR,
                self.path,
                pid=self.pid,
                reason="unexpected",
                detail=msg.__class__.__name__,
            )
            self.fault(f"protocol error: unexpected {type(msg).__name__} after start")
        else:
            self._host.on_frame(self, msg)

    def reply(self, msg: Message) -> None:
        """Send ``msg`` to the worker without waiting on it (an answer to one of its requests)."""
        if self.channel is not None:
            self._host.tg.start_soon(self._send_quietly, self.channel, msg)
