"""Running a worker: the process's event loop, the handshake with the supervisor, and the frames
the library answers by itself (pings from this loop, dump requests, drain and shutdown), the stop
signals and the shutdown deadline. ``run(main)`` is the entry point."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import anyio
from anyio.abc import TaskStatus

from otp_agents.wire.channel import Channel, ChannelClosed
from otp_agents.wire.env import (
    DUMP_SIGNAL,
    ENV_BACKEND,
    ENV_DUMP_FILE,
    ENV_FD,
    ENV_PATH,
    EXIT_CRASH,
    EXIT_NO_SUPERVISOR,
    EXIT_OK,
)
from otp_agents.wire.framing import FrameError, encode
from otp_agents.wire.messages import (
    MAX_DUMP_TEXT,
    SUPPORTED_VERSIONS,
    Bye,
    Drain,
    Dump,
    DumpRequest,
    Hello,
    Located,
    Ping,
    Pong,
    Reject,
    Shutdown,
    Welcome,
)
from otp_agents.worker.api import Main, Worker
from otp_agents.worker.stacks import render as render_stacks

log = logging.getLogger("otp_agents.worker")

# Part of the supervisor's shutdown timeout the worker keeps for its own orderly exit.
DEADLINE_MARGIN = 0.2
# How long after a stop signal the worker waits for the Shutdown frame that carries the deadline.
SIGNAL_FRAME_SKEW = 0.5
MAX_BYE_REASON = 2000  # characters of a stated exit reason that reach the supervisor


def run(main: Main, args: list[str] | None = None) -> None:
    """Run ``main`` as a protocol worker and exit the process with its outcome."""
    backend = os.environ.get(ENV_BACKEND, "asyncio")
    if ENV_FD not in os.environ:
        sys.stderr.write("otp-agents worker: no supervisor channel (OTP_AGENTS_FD is not set)\n")
        sys.exit(EXIT_NO_SUPERVISOR)
    # Hello goes out before the event loop starts, so the supervisor prepares its Welcome while
    # the loop comes up (the two overlap: about 0.5 ms of every start).
    try:
        os.write(int(os.environ[ENV_FD]), encode(Hello(versions=list(SUPPORTED_VERSIONS), pid=os.getpid())))
    except OSError as exc:
        sys.stderr.write(f"otp-agents worker: lost the supervisor channel: {exc}\n")
        sys.exit(EXIT_NO_SUPERVISOR)
    _register_signal_dump()
    code = anyio.run(_serve, main, list(sys.argv[1:] if args is None else args), False, backend=backend)
    sys.exit(code)


async def _serve(main: Main, args: list[str], send_hello: bool = True) -> int:
    sock = socket.socket(fileno=int(os.environ[ENV_FD]))
    sock.set_inheritable(False)  # our own subprocesses must not hold the supervisor's channel
    channel = await Channel.from_socket(sock)
    try:
        if send_hello:
            await channel.send(Hello(versions=list(SUPPORTED_VERSIONS), pid=os.getpid()))
        first = await channel.receive()
        if isinstance(first, Reject):
            sys.stderr.write(f"otp-agents worker: supervisor refused us: {first.reason}\n")
            return EXIT_NO_SUPERVISOR
        if not isinstance(first, Welcome):
            sys.stderr.write(f"otp-agents worker: expected welcome, got {type(first).__name__}\n")
            return EXIT_NO_SUPERVISOR
        worker = Worker(
            channel,
            first.path or os.environ.get(ENV_PATH, ""),
            args,
            resumed=first.checkpoint or None,
            checkpoint_max=first.checkpoint_max,
        )
        return await _supervised(main, worker, channel)
    except (ChannelClosed, FrameError, OSError) as exc:
        sys.stderr.write(f"otp-agents worker: lost the supervisor channel: {exc}\n")
        return EXIT_NO_SUPERVISOR
    finally:
        with anyio.CancelScope(shield=True):
            await channel.aclose()


async def _supervised(main: Main, worker: Worker, channel: Channel) -> int:
    code = EXIT_OK
    lag = _LoopLag()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_serve_channel, worker, channel, lag)
        tg.start_soon(lag.run)
        await tg.start(_serve_signals, worker)  # before main: a stop signal must never find SIG_DFL
        main_scope = anyio.CancelScope()
        tg.start_soon(_enforce_deadline, worker, main_scope)
        with main_scope:
            try:
                await main(worker)
            except SystemExit as exc:  # sys.exit(n) in main: exit with n, not as a crash
                code = exc.code if isinstance(exc.code, int) else EXIT_OK if exc.code is None else EXIT_CRASH
                if isinstance(exc.code, str):  # sys.exit("why"): say why, as Python itself does
                    sys.stderr.write(exc.code + "\n")
                    worker.exit_reason = worker.exit_reason or exc.code
            except Exception as exc:
                log.exception("worker %s crashed", worker.path)
                sys.stderr.flush()
                code = EXIT_CRASH
                worker.exit_reason = worker.exit_reason or f"crash: {type(exc).__name__}: {exc}"
        if main_scope.cancelled_caught:
            sys.stderr.write(f"otp-agents worker {worker.path}: main cancelled at the shutdown deadline\n")
        with anyio.move_on_after(0.5, shield=True):
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await channel.send(Bye(reason=_bye_reason(worker, code)))
        tg.cancel_scope.cancel()
    return code


def _bye_reason(worker: Worker, code: int) -> str:
    said = worker.exit_reason
    return said[:MAX_BYE_REASON] if said else ("normal" if code == EXIT_OK else "crash")


async def _serve_channel(worker: Worker, channel: Channel, lag: _LoopLag) -> None:
    """Answer pings and dump requests, take drain and shutdown requests: all from this loop,
    so a blocked loop shows up as missing pongs."""
    async with anyio.create_task_group() as tg:
        try:
            while True:
                msg = await channel.receive()
                if isinstance(msg, Ping) and worker.liveness is not None:
                    if not worker._probing:  # one probe at a time: a stuck one is the missing pong
                        worker._probing = True
                        tg.start_soon(_probed_pong, worker, channel, msg, lag)
                elif isinstance(msg, Ping):
                    await channel.send(Pong(seq=msg.seq, sent_ns=msg.sent_ns, loop_lag_ms=lag.take()))
                elif isinstance(msg, DumpRequest):
                    text = render_stacks()[:MAX_DUMP_TEXT]
                    await channel.send(Dump(id=msg.id, text=text))
                elif isinstance(msg, Drain):
                    worker.draining = True
                    worker.request_stop(f"drain: {msg.reason}")
                elif isinstance(msg, Shutdown):
                    worker.request_stop(msg.reason, msg.timeout or None)
                elif isinstance(msg, Located):
                    worker._located(msg)
        except (ChannelClosed, FrameError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            # The supervisor is gone (or spoke garbage): finish up. PR_SET_PDEATHSIG covers the case
            # where this loop cannot run at all.
            worker.request_stop("supervisor lost", 1.0)
        tg.cancel_scope.cancel()  # pending probes


async def _probed_pong(worker: Worker, channel: Channel, ping: Ping, lag: _LoopLag) -> None:
    assert worker.liveness is not None
    start = time.monotonic()
    try:
        await worker.liveness()
    except Exception:  # a broken probe is a missing pong (the supervisor's hang check), not a crash
        log.exception("%s: liveness probe failed", worker.path)
        return
    finally:
        worker._probing = False
    probe_ms = (time.monotonic() - start) * 1000
    pong = Pong(seq=ping.seq, sent_ns=ping.sent_ns, loop_lag_ms=round(max(lag.take(), probe_ms), 3))
    # A closed channel is noticed (and handled) by the receiving loop.
    with contextlib.suppress(ChannelClosed, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await channel.send(pong)


class _LoopLag:
    """How late the event loop wakes up: the largest overshoot of a short sleep since the last
    pong, in milliseconds."""

    # Each wake-up costs an idle worker about 0.1 ms of CPU: at 4 a second, 1,000 idle workers
    # took 40 % of a core between them (BENCHMARKS.md, "Zygote fleet"). Once a second, a stall
    # is measured in full when it covers a wake-up; one that starts and ends between two
    # wake-ups is missed here, but if a ping arrives during it, it shows in that ping's RTT.
    INTERVAL = 1.0

    def __init__(self) -> None:
        self.worst = 0.0

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return round(worst, 3)

    async def run(self) -> None:
        while True:
            start = time.monotonic()
            await anyio.sleep(self.INTERVAL)
            late = (time.monotonic() - start - self.INTERVAL) * 1000
            self.worst = max(self.worst, late)


def _register_signal_dump() -> None:
    """Let the supervisor get our stacks even when this loop is stuck or C code holds the GIL:
    faulthandler writes them from a C-level signal handler into the file the supervisor named."""
    path = os.environ.get(ENV_DUMP_FILE)
    if not path:
        return
    try:
        out = open(path, "ab", buffering=0)  # noqa: SIM115 - must stay open for the process' life
    except OSError as exc:
        sys.stderr.write(f"otp-agents worker: cannot open dump file {path}: {exc}\n")
        return
    faulthandler.register(DUMP_SIGNAL, file=out, all_threads=True, chain=False)
    _keep_open.append(out)


_keep_open: list[Any] = []


async def _serve_signals(
    worker: Worker, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        # What trio restores (and re-delivers still-pending signals to) when the receiver closes.
        signal.signal(sig, signal.SIG_IGN)
    task_status.started()
    try:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for sig in signals:
                worker.request_stop(signal.Signals(sig).name, worker.shutdown_timeout)
    finally:
        # asyncio restores SIG_DFL here and CPython's finalisation resets Python-level handlers;
        # the supervisor's stop signal often lands after main() returned: ignore it from now on.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


async def _enforce_deadline(worker: Worker, main_scope: anyio.CancelScope) -> None:
    await worker.wait_stopping()
    with anyio.move_on_after(SIGNAL_FRAME_SKEW):
        await worker._timeout_known.wait()
    timeout = worker.shutdown_timeout
    if not timeout:
        return
    started = time.monotonic()
    await anyio.sleep(max(0.0, timeout * (1 - DEADLINE_MARGIN)))
    log.warning(
        "%s: still busy %.2fs after the stop request; cancelling", worker.path, time.monotonic() - started
    )
    main_scope.cancel()
