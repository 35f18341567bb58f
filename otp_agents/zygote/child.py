"""The first steps of a worker forked by a zygote, in the new process: get adopted, shed the
zygote's state, become the worker the request names, and run it."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import random
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

import anyio

from otp_agents.wire.env import (
    DUMP_SIGNAL,
    ENV_FD,
    EXIT_NO_SUPERVISOR,
)
from otp_agents.wire.messages import (
    SUPPORTED_VERSIONS,
    Hello,
    Ready,
    Shutdown,
    Welcome,
)
from otp_agents.wire.zygote import ForkRequest


def exit_after(body: Callable[[], None]) -> NoReturn:
    """Run ``body`` in a forked process and leave through ``os._exit``: never back into the
    zygote's own frames."""
    code = 1
    try:
        body()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except BaseException:  # report it, then leave
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def run_worker(request: ForkRequest, fds: tuple[int, ...]) -> int:
    """Become the worker: ``fds`` is its channel, then (when the supervisor captures the output)
    the write ends of its stdout and stderr pipes."""
    from otp_agents.worker import loop as worker_lib
    from otp_agents.worker.entry import load

    drop_zygote_state()
    os.environ.clear()
    os.environ.update(request.env)
    fd = fds[0]
    if len(fds) == 3:  # its own stdout and stderr, read by the supervisor into its own log
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fds[1], 1)
        os.dup2(fds[2], 2)
        os.close(fds[1])
        os.close(fds[2])
    os.environ[ENV_FD] = str(fd)
    if request.cwd:
        os.chdir(request.cwd)
    sys.path[0] = os.getcwd()
    sys.argv = [request.target, *request.args]
    random.seed()  # fork already reseeds random; this covers a zygote that seeded it on purpose
    numpy = sys.modules.get("numpy")
    if numpy is not None:  # numpy's global generator is not reseeded by fork
        numpy.random.seed(int.from_bytes(os.urandom(4), "little"))
    try:
        main = load(request.target)
    except (ImportError, LookupError) as exc:  # as the cold path says it (worker_entry.py)
        sys.stderr.write(f"otp-agents worker: cannot load {request.target}: {exc}\n")
        return EXIT_NO_SUPERVISOR
    try:
        worker_lib.run(main, request.args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    return 0


def drop_zygote_state() -> None:
    """What the zygote set up for itself must not leak into a worker (idempotent)."""
    from otp_agents.worker import loop as worker_lib

    faulthandler.unregister(DUMP_SIGNAL)
    for kept in worker_lib._keep_open:
        kept.close()
    worker_lib._keep_open.clear()
    for handler in list(logging.root.handlers):
        logging.root.removeHandler(handler)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def warm_up() -> None:
    """Rehearse a worker's start once, against a stand-in supervisor on a socketpair: the whole
    path a real start takes (event loop, channel, handshake, Ready, Bye). In the zygote this fills
    lazy imports and caches in the shared, frozen heap; in a spare it makes the copies of the
    pages that path writes (reference counts of shared objects) while the spare is idle, not when
    it is needed (measured: a first event loop in a forked process takes 2.3 ms, 0.6 ms after)."""
    from otp_agents.wire.channel import Channel
    from otp_agents.wire.messages import Bye
    from otp_agents.worker import loop as worker_lib
    from otp_agents.worker.api import Worker

    ours, theirs = socket.socketpair()

    async def noop(worker: Worker) -> None:
        await worker.ready()

    async def stand_in() -> None:
        channel = await Channel.from_socket(ours)
        hello = await channel.receive()
        assert isinstance(hello, Hello)
        await channel.send(Welcome(version=max(SUPPORTED_VERSIONS), path="zygote/warm-up"))
        while not isinstance(await channel.receive(), Bye | Ready):
            pass
        await channel.send(Shutdown(timeout=1.0, reason="warm-up"))

    async def rehearse() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stand_in)
            with anyio.fail_after(5):
                await worker_lib._serve(noop, [])
            tg.cancel_scope.cancel()

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous = os.environ.get(ENV_FD)
    os.environ[ENV_FD] = str(theirs.detach())  # the worker library owns (and closes) it now
    try:
        anyio.run(rehearse, backend="asyncio")
    finally:
        if previous is None:
            os.environ.pop(ENV_FD, None)
        else:
            os.environ[ENV_FD] = previous
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        ours.close()
    if threading.active_count() != 1:  # the loop's default executor, had anything used it
        raise RuntimeError("rehearsing a worker start left a thread behind")
