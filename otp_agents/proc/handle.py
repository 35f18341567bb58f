"""Child process handles: spawning, exit detection, the stop ladder.

Each child runs in its own process group, receives SIGKILL if the supervisor dies
(``PR_SET_PDEATHSIG``), and is watched through a pidfd: its exit wakes the event loop directly,
with no polling and no thread. When the group leader exits, whatever it left in its group is
killed before the leader is reaped (so the group id cannot have been recycled), as systemd's
``KillMode=control-group`` does.

Stop ladder (``shutdown`` in the child spec):

* a number of seconds: the polite request (``stop_signal`` to the group for a plain command;
  a ``Shutdown`` frame plus ``stop_signal`` to the worker itself for a protocol worker), wait up
  to that long, then SIGKILL to the whole group;
* ``brutal_kill``: SIGKILL to the group at once;
* ``infinity``: the polite request, then wait as long as it takes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

from otp_agents import linux
from otp_agents.errors import StartError
from otp_agents.events import EventBus, Kind
from otp_agents.health import heartbeat as health
from otp_agents.health.dump import Dumper, remove_signal_file
from otp_agents.health.memory import MemoryWatch
from otp_agents.linux import ExitStatus
from otp_agents.proc.guard import Guard
from otp_agents.proc.zygote_client import ZygoteClient, ZygoteUnavailable
from otp_agents.runtime.checkpoint import CheckpointStore
from otp_agents.spec.model import CommandSpec, ProcessSpec, WorkerSpec, ZygoteSpec
from otp_agents.wire.channel import Channel, ChannelClosed
from otp_agents.wire.env import (
    DUMP_SIGNAL,
    ENV_BACKEND,
    ENV_DUMP_FILE,
    ENV_FD,
    ENV_PATH,
    ENV_SUPERVISOR_PID,
    PLAIN_BYE,
    RESERVED_SERVICES,
    SERVICE_PREFIX,
)
from otp_agents.wire.framing import FrameError
from otp_agents.wire.messages import (
    SUPPORTED_VERSIONS,
    Bye,
    Checkpoint,
    Dump,
    DumpRequest,
    Error,
    Hello,
    Located,
    Log,
    Lookup,
    Message,
    Pong,
    Publish,
    Ready,
    Reject,
    Report,
    Shutdown,
    Welcome,
)
from otp_agents.wire.zygote import ForkRequest

log = logging.getLogger("otp_agents")

# After SIGKILL a process normally disappears within milliseconds; a process stuck in
# uninterruptible sleep may not. We stop waiting after this long and say so.
KILL_WAIT = 10.0
# How long an exited worker's last frames (its final checkpoint, say) may take to be read before
# its exit is handled. The group is dead by then, so end of stream normally comes at once.
DRAIN_WAIT = 0.2


@dataclass
class Host:
    """What a process handle needs from the runtime around it."""

    tg: anyio.abc.TaskGroup
    bus: EventBus
    state_dir: Path
    tracked: dict[int, str] = field(default_factory=dict)  # pid -> path, for pids with a watcher
    after_reap: Callable[[], None] = lambda: None  # e.g. sweep adopted orphans
    guard: Guard | None = None  # kills our process groups if this process dies
    stopping: bool = False  # the whole tree is being stopped: start nothing new
    on_rtt: Callable[[str, float], None] | None = None  # heartbeat round trips, for metrics
    on_report: Callable[[str, Report], None] | None = None  # worker measurements, for metrics
    # Services workers offer each other (Publish/Lookup): name -> (address, publisher path, pid).
    services: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    # Zygotes: image -> the path of its zygote child; and our connection to each running one.
    zygotes: dict[str, str] = field(default_factory=dict)
    zygote_clients: dict[str, ZygoteClient] = field(default_factory=dict)
    forks_in_flight: int = 0  # zygote forks not yet tracked: the orphan sweep waits for them
    dumper: Dumper = field(init=False)
    memory: MemoryWatch = field(init=False)
    heartbeats: health.Heartbeats = field(init=False)
    checkpoints: CheckpointStore = field(init=False)

    def __post_init__(self) -> None:
        self.dumper = Dumper(self.state_dir, self.bus, self.tracked)
        self.memory = MemoryWatch(self.bus)
        self.heartbeats = health.Heartbeats(self)
        self.checkpoints = CheckpointStore(self.state_dir, self.bus, self.tg)


@dataclass
class Exit:
    """The end of one child process, as the supervisor sees it."""

    status: ExitStatus
    requested: bool  # the supervisor asked it to stop
    fault: str | None = None  # set when the supervisor killed it for a fault (protocol error...)

    @property
    def normal(self) -> bool:
        """OTP's normal/shutdown: exit code 0, or an exit the supervisor asked for."""
        return self.fault is None and (self.requested or self.status.code == 0)

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
        host: Host,
        on_exit: Callable[[ChildProcess], None],
    ) -> None:
        self.path = path
        self.spec = spec
        self.pid = pid
        self.forked_from: str | None = None  # the zygote's image, when forked rather than spawned
        self.started_at = time.monotonic()
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
        self.health_kill: str | None = None
        self.last_words: str | None = None  # the reason in its Bye, when it stated one
        self.signal_file: str | None = None  # where faulthandler writes on dump_signal
        self.dump_signal: int | None = None
        self._dump_seq = 0
        self._dumps: dict[int, tuple[anyio.Event, list[str]]] = {}
        self._reader_done = anyio.Event()
        host.tracked[self.pid] = path
        if host.guard is not None:
            host.guard.add(self.pid)

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
        self._host.after_reap()  # orphans of this group are still attributed to this child
        self._untrack()
        remove_signal_file(self.signal_file)
        self.exit = Exit(status=status, requested=self._requested, fault=self._fault)
        if self.channel is not None and self.ready:  # during the handshake, spawn() owns it
            # What it wrote just before dying (a last checkpoint) may still be unread: let the
            # reader take it up to end of stream, so it is handled before the exit is, and
            # nothing of this instance arrives after its supervisor moved on.
            with anyio.move_on_after(DRAIN_WAIT):
                await self._reader_done.wait()
            await self.channel.aclose()
        self._unpublish_all()  # after its last frames: a late publish cannot outlive it
        self.exited.set()
        self._on_exit(self)

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
            await self._wait_killed()
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
            await self._host.dumper.take(self, "shutdown_timeout")
        self.kill()
        await self._wait_killed()
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

    async def _wait_killed(self) -> None:
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

    def _publish(self, msg: Publish, bus: EventBus) -> None:
        services = self._host.services
        if self.exit is not None:
            return  # a frame read after its writer's death: nothing may serve at that address
        if msg.name.startswith(RESERVED_SERVICES):
            bus.emit(
                Kind.WORKER_LOG,
                self.path,
                pid=self.pid,
                reason="error",
                detail=f"publish refused: {msg.name} is reserved",
            )
            return
        if msg.address:
            services[msg.name] = (msg.address, self.path, self.pid)
            bus.emit(Kind.SERVICE_UP, self.path, pid=self.pid, reason=msg.name, detail=msg.address)
        elif services.get(msg.name, ("", "", 0))[2] == self.pid:
            del services[msg.name]
            bus.emit(Kind.SERVICE_DOWN, self.path, pid=self.pid, reason=msg.name)

    def _unpublish_all(self) -> None:
        """The publisher is gone: so are its services (a restarted one publishes anew)."""
        services = self._host.services
        for name in [n for n, (_, _, pid) in services.items() if pid == self.pid]:
            del services[name]
            self._host.bus.emit(Kind.SERVICE_DOWN, self.path, pid=self.pid, reason=name, detail="exited")

    @staticmethod
    async def _send_quietly(channel: Channel, msg: Message) -> None:
        # Bounded: a worker that asks and stops reading must not pile up tasks here.
        with (
            anyio.move_on_after(2),
            contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError),
        ):
            await channel.send(msg)

    def _handle(self, msg: Message, bus: EventBus) -> None:
        if isinstance(msg, Pong):
            health.on_pong(self, msg, self._host)
        elif isinstance(msg, Dump):
            waiter = self._dumps.get(msg.id)
            if waiter is not None:
                waiter[1].append(msg.text)
                waiter[0].set()
        elif isinstance(msg, Log):
            bus.emit(Kind.WORKER_LOG, self.path, pid=self.pid, detail=msg.message, code=msg.level)
        elif isinstance(msg, Error):
            bus.emit(Kind.WORKER_LOG, self.path, pid=self.pid, detail=msg.message, reason="error")
        elif isinstance(msg, Checkpoint):
            limit = self.spec.checkpoint_max_bytes if isinstance(self.spec, WorkerSpec) else 0
            self._host.checkpoints.put(self.path, msg.data, limit, pid=self.pid)
        elif isinstance(msg, Report):
            labels = ",".join(f"{k}={v}" for k, v in msg.labels.items()) if msg.labels else None
            bus.emit(
                Kind.WORKER_REPORT, self.path, pid=self.pid, reason=msg.name, value=msg.value, detail=labels
            )
            if self._host.on_report is not None:
                self._host.on_report(self.path, msg)
        elif isinstance(msg, Publish):
            self._publish(msg, bus)
        elif isinstance(msg, Lookup):
            entry = self._host.services.get(msg.name)
            reply = Located(id=msg.id, name=msg.name, address=entry[0] if entry else None)
            if self.channel is not None:
                self._host.tg.start_soon(self._send_quietly, self.channel, reply)
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


# -- spawning ------------------------------------------------------------------------------------


def _environment(spec: ProcessSpec) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", os.defpath)} if spec.clear_env else dict(os.environ)
    env.update(spec.env)
    return env


def _argv(spec: ProcessSpec) -> list[str]:
    if isinstance(spec, CommandSpec):
        return list(spec.command)
    python = spec.python or sys.executable
    if isinstance(spec, ZygoteSpec):
        preload = ",".join(spec.preload)
        return [
            python,
            "-m",
            "otp_agents.zygote",
            "--image",
            spec.image,
            "--preload",
            preload,
            "--idle",
            str(spec.idle),
        ]
    if spec.module is not None:
        return [python, "-m", "otp_agents.worker", spec.module, *spec.args]
    assert spec.script is not None
    return [python, spec.script, *spec.args]


# PR_SET_PDEATHSIG is set by util-linux's setpriv, exec'd in front of the child's program, when
# it is installed: a Python preexec_fn would force fork() instead of vfork() (about 1.7 ms more
# per spawn, see BENCHMARKS.md) and is unsafe once any thread exists. Without setpriv the
# preexec_fn is the fallback. Either way the orphan guard (guard.py) backs it up.
_SETPRIV = shutil.which("setpriv")


def _resolve(program: str, env: dict[str, str], cwd: str | None) -> None:
    """Refuse a program that cannot be executed, before spawning (a start failure, as in OTP)."""
    if "/" in program:
        path = program if os.path.isabs(program) or cwd is None else os.path.join(cwd, program)
        if not os.path.isfile(path):
            raise StartError(f"cannot execute {program!r}: No such file or directory")
        if not os.access(path, os.X_OK):
            raise StartError(f"cannot execute {program!r}: Permission denied")
    elif shutil.which(program, path=env.get("PATH", os.defpath)) is None:
        raise StartError(f"cannot execute {program!r}: not found on PATH")


def _popen(
    argv: list[str], spec: ProcessSpec, env: dict[str, str], pass_fds: tuple[int, ...]
) -> subprocess.Popen[bytes]:
    _resolve(argv[0], env, spec.cwd)
    hook: Callable[[], None] | None = None
    if _SETPRIV is not None:
        launch = [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]
    else:
        launch, hook = argv, linux.die_with_parent_hook()
    try:
        return subprocess.Popen(
            launch,
            env=env,
            cwd=spec.cwd,
            stdin=subprocess.DEVNULL,
            close_fds=True,
            pass_fds=pass_fds,
            process_group=0,
            preexec_fn=hook,
        )
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise StartError(
                f"the supervisor is out of file descriptors ({exc.strerror}); "
                "raise its limit (about 2 per protocol worker)"
            ) from None
        if exc.errno in (errno.EAGAIN, errno.ENOMEM) and exc.filename is None:
            raise StartError(
                f"cannot create a process ({exc.strerror}): the limit on processes is reached "
                "(pids.max of the cgroup, RLIMIT_NPROC, or kernel.pid_max) or memory is short"
            ) from None
        raise StartError(f"cannot execute {argv[0]!r}: {exc.strerror or exc}") from None
    except subprocess.SubprocessError as exc:
        raise StartError(f"cannot start {argv[0]!r}: {exc}") from None


async def spawn(
    path: str, spec: ProcessSpec, host: Host, on_exit: Callable[[ChildProcess], None]
) -> ChildProcess:
    """Start the child; return once it counts as started (spawned, or Ready for a worker).

    Raises :class:`StartError` if it cannot; nothing of it is left running then.
    """
    env = _environment(spec)
    argv = _argv(spec)
    signal_file: str | None = None
    dump_signal: int | None = None
    if isinstance(spec, WorkerSpec) or spec.settings.dump_signal is not None:
        signal_file = host.dumper.signal_file(path)
        env[ENV_DUMP_FILE] = signal_file
        dump_signal = (
            DUMP_SIGNAL
            if isinstance(spec, WorkerSpec)
            else linux.parse_signal(spec.settings.dump_signal or "")
        )
    if isinstance(spec, CommandSpec):
        proc = _track(path, spec, _popen(argv, spec, env, ()), host, on_exit)
        proc.signal_file, proc.dump_signal = signal_file, dump_signal
        proc.ready = True
        return proc

    ours, theirs = _channel_pair()
    forked: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    env[ENV_PATH] = path
    env[ENV_BACKEND] = spec.backend
    if isinstance(spec, ZygoteSpec):
        env[ENV_SUPERVISOR_PID] = str(os.getpid())
    host.forks_in_flight += 1  # a forked worker is our child before we track it: no orphan sweep
    try:
        if spec.zygote is not None and spec.module is not None:
            forked = await _fork(path, spec, spec.zygote, env, theirs.fileno(), host)
            if forked is None:
                # The zygote may still act on the request it was sent: give the cold start a
                # channel that no late fork can share.
                ours.close()
                theirs.close()
                ours, theirs = _channel_pair()
        if forked is None:
            env[ENV_FD] = str(theirs.fileno())
            popen = _popen(argv, spec, env, (theirs.fileno(),))
        started: subprocess.Popen[bytes] | int | None = popen if popen is not None else forked
        assert started is not None
        proc = _track(path, spec, started, host, on_exit)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
        host.forks_in_flight -= 1
        if forked is not None:
            host.after_reap()  # whatever the sweep left alone meanwhile
    if forked is not None:
        proc.forked_from = spec.zygote
    if isinstance(spec, ZygoteSpec):
        host.zygotes[spec.image] = path
    proc.signal_file, proc.dump_signal = signal_file, dump_signal
    try:
        channel = await Channel.from_socket(ours)
    except BaseException:
        ours.close()
        proc.kill()
        raise
    proc.channel = channel
    try:
        await _handshake(proc, channel, spec)
    except BaseException:
        proc.kill()
        with anyio.CancelScope(shield=True):
            await proc._wait_killed()
            await channel.aclose()
        raise
    proc.ready = True
    if proc.exit is not None:  # it said Ready and is already gone: the watcher left this to us
        await channel.aclose()
    proc.last_pong = time.monotonic()
    host.tg.start_soon(proc._read, channel, name=f"reader {path}")
    return proc


async def _fork(
    path: str, spec: WorkerSpec, image: str, env: dict[str, str], fd: int, host: Host
) -> int | None:
    """The pid of the worker forked by ``image``'s zygote, or None (after a ``zygote_fallback``
    event saying why) when it must be started cold."""
    assert spec.module is not None
    try:
        client = _zygote_client(image, host)
        request = ForkRequest(path=path, target=spec.module, args=list(spec.args), env=env, cwd=spec.cwd)
        pid = await client.fork(request, fd)
    except ZygoteUnavailable as exc:
        host.bus.emit(Kind.ZYGOTE_FALLBACK, path, reason=image, detail=str(exc))
        return None
    # Its own process group before we ever signal it (a spare also sets it; the first one wins).
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)
    return pid


def _zygote_client(image: str, host: Host) -> ZygoteClient:
    entry = host.services.get(SERVICE_PREFIX + image)
    zygote_path = host.zygotes.get(image)
    if entry is None or zygote_path is None:
        raise ZygoteUnavailable(f"the zygote for image {image!r} is not running")
    address, publisher, pid = entry
    if publisher != zygote_path:
        raise ZygoteUnavailable(f"{SERVICE_PREFIX + image} is published by {publisher}, not the zygote")
    client = host.zygote_clients.get(image)
    if client is None or client.address != address or client.pid != pid:
        if client is not None:
            client.close()
        client = host.zygote_clients[image] = ZygoteClient(address, pid)
    return client


def _channel_pair() -> tuple[socket.socket, socket.socket]:
    try:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise StartError(f"cannot create the worker channel: {exc.strerror or exc}") from None


def _track(
    path: str,
    spec: ProcessSpec,
    started: subprocess.Popen[bytes] | int,
    host: Host,
    on_exit: Callable[[ChildProcess], None],
) -> ChildProcess:
    popen = started if isinstance(started, subprocess.Popen) else None
    pid = started.pid if isinstance(started, subprocess.Popen) else started
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        # Without a pidfd we cannot watch it: do not leave it running untracked.
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        if popen is not None:
            popen.wait()
        else:  # forked by a zygote and adopted by us: reap it if it is already gone (never block)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        raise StartError(f"cannot watch the new process: {exc.strerror or exc}") from None
    proc = ChildProcess(path, spec, pid, popen, pidfd, host, on_exit)
    host.tg.start_soon(proc._watch, name=f"watch {path}")
    return proc


async def _handshake(proc: ChildProcess, channel: Channel, spec: WorkerSpec) -> None:
    problem: str | None = None
    ready = False

    async def converse() -> None:
        nonlocal problem, ready
        hello = await channel.receive()
        if not isinstance(hello, Hello):
            problem = f"expected hello, got {type(hello).__name__.lower()}"
            return
        common = sorted(set(hello.versions) & set(SUPPORTED_VERSIONS))
        if not common:
            await channel.send(
                Reject(reason=f"no common protocol version (we speak {list(SUPPORTED_VERSIONS)})")
            )
            problem = f"worker speaks protocol versions {hello.versions}, we speak {list(SUPPORTED_VERSIONS)}"
            return
        limit = spec.checkpoint_max_bytes
        checkpoint = await proc._host.checkpoints.get(proc.path, limit) if limit else None
        await channel.send(
            Welcome(version=common[-1], path=proc.path, checkpoint=checkpoint, checkpoint_max=limit)
        )
        if checkpoint is not None:
            proc._host.bus.emit(Kind.RESUMED, proc.path, pid=proc.pid, value=len(checkpoint))
        while True:
            msg = await channel.receive()
            if isinstance(msg, Ready):
                ready = True
                return
            if isinstance(msg, Bye):  # main() ended before ready(): wait for the exit status
                proc._handle(msg, proc._host.bus)
                with anyio.move_on_after(2.0):
                    await proc.exited.wait()
                problem = "exited before it was ready"
                return
            if isinstance(
                msg, Log | Error | Checkpoint | Report | Publish | Lookup
            ):  # any time after Welcome
                proc._handle(msg, proc._host.bus)
                continue
            problem = f"expected ready, got {type(msg).__name__.lower()}"
            return

    async with anyio.create_task_group() as tg:

        async def on_early_exit() -> None:
            await proc.exited.wait()
            # What it wrote before exiting (Ready, Bye, EOF) is already in our buffer: let
            # converse() read it; the grace only matters if a grandchild still holds its end.
            await anyio.sleep(0.2)
            tg.cancel_scope.cancel()

        tg.start_soon(on_early_exit)
        try:
            with anyio.fail_after(spec.start_timeout):
                await converse()
        except TimeoutError:
            problem = f"not ready within start_timeout ({spec.start_timeout}s)"
        except (ChannelClosed, anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            # EOF, or the watcher closed the channel because the process is gone, or a send
            # to a peer that already hung up: all mean the child ended before it was ready.
            with anyio.move_on_after(1.0):
                await proc.exited.wait()
            problem = "exited before it was ready"
        except FrameError as exc:
            problem = f"protocol error during start: {exc}"
        tg.cancel_scope.cancel()
    if ready and problem is None:
        return  # it said Ready: it started; an exit right after is a ChildDown, not a start failure
    if proc.exit is not None and problem in (None, "exited before it was ready"):
        problem = f"exited before it was ready ({proc.exit.status.describe()})"
    if problem is not None and proc.last_words:
        problem = f"{problem}: {proc.last_words}"
    if problem is not None:
        raise StartError(problem)
