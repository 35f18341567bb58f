"""Starting a child process: a plain command, a protocol worker (spawned cold, or forked by its
image's zygote) or a zygote, up to the point where it counts as started."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Protocol

import anyio

from otp_agents import linux
from otp_agents.errors import StartError
from otp_agents.events import Kind
from otp_agents.proc.handle import ChildProcess, ProcHost
from otp_agents.proc.output import Output, Pipes
from otp_agents.proc.session import handshake
from otp_agents.proc.zygote_client import ZygoteClient, ZygoteUnavailable
from otp_agents.spec.model import CommandSpec, ProcessSpec, WorkerSpec, ZygoteSpec
from otp_agents.wire.channel import Channel
from otp_agents.wire.env import (
    DUMP_SIGNAL,
    ENV_BACKEND,
    ENV_DUMP_FILE,
    ENV_FD,
    ENV_PATH,
    ENV_SUPERVISOR_PID,
    SERVICE_PREFIX,
)
from otp_agents.wire.zygote import ForkRequest


class SpawnHost(ProcHost, Protocol):
    """What starting a process needs beyond what a running one does."""

    # Services workers offer each other: name -> (address, publisher path, pid).
    services: dict[str, tuple[str, str, int]]
    zygotes: dict[str, str]  # image -> the path of its zygote child
    zygote_clients: dict[str, ZygoteClient]  # image -> our connection to its zygote
    forks_in_flight: int  # zygote forks not yet tracked: the orphan sweep waits for them

    def signal_file(self, path: str) -> str:
        """Where a child's faulthandler writes when it gets its dump signal."""
        raise NotImplementedError

    async def checkpoint(self, path: str, limit: int) -> bytes | None:
        """The last checkpoint kept for ``path`` (handed back in the Welcome)."""


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
    argv: list[str], spec: ProcessSpec, env: dict[str, str], pass_fds: tuple[int, ...], pipes: Pipes
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
            stdout=pipes.out_w,
            stderr=pipes.err_w,
            close_fds=True,
            pass_fds=pass_fds,
            process_group=0,
            preexec_fn=hook,
        )
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise _out_of_fds(exc) from None
        if exc.errno in (errno.EAGAIN, errno.ENOMEM) and exc.filename is None:
            raise StartError(
                f"cannot create a process ({exc.strerror}): the limit on processes is reached "
                "(pids.max of the cgroup, RLIMIT_NPROC, or kernel.pid_max) or memory is short"
            ) from None
        raise StartError(f"cannot execute {argv[0]!r}: {exc.strerror or exc}") from None
    except subprocess.SubprocessError as exc:
        raise StartError(f"cannot start {argv[0]!r}: {exc}") from None


async def spawn(
    path: str, spec: ProcessSpec, host: SpawnHost, on_exit: Callable[[ChildProcess], None]
) -> ChildProcess:
    """Start the child; return once it counts as started (spawned, or Ready for a worker).

    Raises :class:`StartError` if it cannot; nothing of it is left running then.
    """
    env = _environment(spec)
    argv = _argv(spec)
    signal_file: str | None = None
    dump_signal: int | None = None
    if isinstance(spec, WorkerSpec) or spec.settings.dump_signal is not None:
        signal_file = host.signal_file(path)
        env[ENV_DUMP_FILE] = signal_file
        dump_signal = (
            DUMP_SIGNAL
            if isinstance(spec, WorkerSpec)
            else linux.parse_signal(spec.settings.dump_signal or "")
        )
    pipes = _pipes()
    if isinstance(spec, CommandSpec):
        try:
            proc = _track(path, spec, _popen(argv, spec, env, (), pipes), host, on_exit)
        except BaseException:
            pipes.close()
            raise
        _capture(proc, pipes, host)
        proc.signal_file, proc.dump_signal = signal_file, dump_signal
        proc.ready = True
        return proc

    try:
        ours, theirs = _channel_pair()
    except BaseException:
        pipes.close()
        raise
    forked: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    env[ENV_PATH] = path
    env[ENV_BACKEND] = spec.backend
    if isinstance(spec, ZygoteSpec):
        env[ENV_SUPERVISOR_PID] = str(os.getpid())
    host.forks_in_flight += 1  # a forked worker is our child before we track it: no orphan sweep
    try:
        if spec.zygote is not None and spec.module is not None:
            forked = await _fork(path, spec, spec.zygote, env, (theirs.fileno(), *pipes.child_fds), host)
            if forked is None:
                # The zygote may still act on the request it was sent: give the cold start a
                # channel that no late fork can share.
                ours.close()
                theirs.close()
                ours, theirs = _channel_pair()
        if forked is None:
            env[ENV_FD] = str(theirs.fileno())
            popen = _popen(argv, spec, env, (theirs.fileno(),), pipes)
        started: subprocess.Popen[bytes] | int | None = popen if popen is not None else forked
        assert started is not None
        proc = _track(path, spec, started, host, on_exit)
    except BaseException:
        ours.close()
        pipes.close()
        raise
    finally:
        theirs.close()
        host.forks_in_flight -= 1
        if forked is not None:
            host.after_reap()  # whatever the sweep left alone meanwhile
    _capture(proc, pipes, host)
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
        await handshake(proc, channel, spec, host)
    except BaseException:
        proc.kill()
        with anyio.CancelScope(shield=True):
            await proc.wait_killed()
            await channel.aclose()
        raise
    proc.ready = True
    if proc.exit is not None:  # it said Ready and is already gone: the watcher left this to us
        await channel.aclose()
    proc.last_pong = time.monotonic()
    host.tg.start_soon(proc._read, channel, name=f"reader {path}")
    return proc


async def _fork(
    path: str, spec: WorkerSpec, image: str, env: dict[str, str], fds: tuple[int, ...], host: SpawnHost
) -> int | None:
    """The pid of the worker forked by ``image``'s zygote, or None (after a ``zygote_fallback``
    event saying why) when it must be started cold."""
    assert spec.module is not None
    try:
        client = _zygote_client(image, host)
        request = ForkRequest(path=path, target=spec.module, args=list(spec.args), env=env, cwd=spec.cwd)
        pid = await client.fork(request, fds)
    except ZygoteUnavailable as exc:
        host.bus.emit(Kind.ZYGOTE_FALLBACK, path, reason=image, detail=str(exc))
        return None
    # Its own process group before we ever signal it (a spare also sets it; the first one wins).
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)
    return pid


def _zygote_client(image: str, host: SpawnHost) -> ZygoteClient:
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


def _out_of_fds(exc: OSError) -> StartError:
    return StartError(
        f"the supervisor is out of file descriptors ({exc.strerror}); raise its limit (about 4 per child)"
    )


def _pipes() -> Pipes:
    try:
        return Pipes()
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise _out_of_fds(exc) from None
        raise StartError(f"cannot create the pipes for the child's output: {exc.strerror or exc}") from None


def _capture(proc: ChildProcess, pipes: Pipes, host: SpawnHost) -> None:
    """The child has its ends of the pipes: read ours until it (and what it left) is gone."""
    pipes.parent_side()

    async def sink(stream: str, line: str) -> None:
        await host.on_output(proc, stream, line)

    proc.output = Output(pipes, sink)
    host.tg.start_soon(proc.output.run, name=f"output {proc.path}")


def _channel_pair() -> tuple[socket.socket, socket.socket]:
    try:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise _out_of_fds(exc) from None
        raise StartError(f"cannot create the worker channel: {exc.strerror or exc}") from None


def _track(
    path: str,
    spec: ProcessSpec,
    started: subprocess.Popen[bytes] | int,
    host: SpawnHost,
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
