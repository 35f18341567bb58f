#!/usr/bin/env python3
"""The worker of ``bench/zygote_restart.py``: a Python process that imports ``livekit.rtc``.

The import at the top of this module is the point: it is what a voice worker pays on every cold
start (150 to 260 ms here), and what a zygote or a forkserver pays once. When the worker is up it
announces itself with one datagram, ``"<pid> <time.monotonic_ns()>"``, to a Unix datagram socket
the benchmark listens on (CLOCK_MONOTONIC is one clock for every process on the machine, so the
benchmark subtracts its own kill timestamp from it).

Three ways to run it, one per kind of manager:

* as an otp-agents protocol worker, ``module = "bench.lk_worker:main"`` (the socket is
  ``$BENCH_READY``): :func:`main` calls ``worker.ready()``, announces, and waits until it is
  asked to stop;
* as a plain script, ``python bench/lk_worker.py`` (supervisord, circus; socket ``$BENCH_READY``):
  announces, then sleeps until a signal ends it;
* as a forkserver manager, ``python bench/lk_worker.py --forkserver-manager SOCKET``: see
  :func:`forkserver_manager`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import livekit.rtc  # noqa: F401 - the import cost is what the benchmark measures

if TYPE_CHECKING:
    from otp_agents.worker import Worker

ENV_READY = "BENCH_READY"
PRELOAD = ["livekit.rtc", "bench.lk_worker"]
REPO = Path(__file__).resolve().parent.parent
CHILD_STOP_TIMEOUT = 5.0


def announce(path: str) -> None:
    """One datagram to the benchmark: this pid, and the monotonic time it is ready."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(f"{os.getpid()} {time.monotonic_ns()}".encode(), path)


def _sleep_forever() -> NoReturn:
    while True:
        signal.pause()


async def main(worker: Worker) -> None:
    """The otp-agents protocol worker: ready, announce, idle until stopped."""
    await worker.ready()
    announce(os.environ[ENV_READY])
    await worker.wait_stopping()


def forkserver_target(path: str) -> None:
    """What the forkserver's child runs (by reference, as ``bench.lk_worker.forkserver_target``)."""
    announce(path)
    _sleep_forever()


def forkserver_manager(path: str) -> int:
    """A one-process pool in the style of LiveKit Agents: forkserver, preloaded modules.

    ``multiprocessing.get_context("forkserver")`` with ``set_forkserver_preload(PRELOAD)``: the
    forkserver imports ``livekit.rtc`` and this module once; each :class:`Process` is forked from
    it. The manager waits on the process' sentinel and starts a replacement when it dies. LiveKit
    Agents itself does not restart a crashed job process (the job is gone); its pool only keeps
    ``num_idle_processes`` warm ones, topping them up on a 100 ms poll. This is the restart it
    would do if it had one, with the same machinery.

    SIGTERM: stop the current process (SIGTERM, then SIGKILL after a bound) and exit 0.
    """
    import importlib
    import multiprocessing
    import multiprocessing.connection

    # The forkserver and its children import this module by its package name, from the repo root
    # (spawn's preparation data hands them this sys.path); the target is pickled by that name.
    sys.path.insert(0, str(REPO))
    module = importlib.import_module("bench.lk_worker")
    target: Any = module.forkserver_target
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    proc: Any = None
    try:
        while True:
            proc = ctx.Process(target=target, args=(path,), name="lk-worker", daemon=True)
            proc.start()
            while not multiprocessing.connection.wait([proc.sentinel], timeout=1.0):
                pass
            proc.join(CHILD_STOP_TIMEOUT)
            proc.close()
            proc = None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if proc is not None:
            with contextlib.suppress(Exception):
                if proc.is_alive():
                    proc.terminate()
                    proc.join(CHILD_STOP_TIMEOUT)
                if proc.is_alive():
                    proc.kill()
                    proc.join(CHILD_STOP_TIMEOUT)


def livekit_initialize(_proc: Any) -> None:
    """LiveKit's process pool runs this in each new job process (its ``setup_fnc``/prewarm)."""
    announce(os.environ[ENV_READY])


async def _no_job(_ctx: Any) -> None:
    raise RuntimeError("the benchmark runs no job")


def livekit_pool(path: str) -> int:
    """LiveKit Agents' own executor: its ``ProcPool`` (``livekit.agents.ipc.proc_pool``) as its
    worker builds it, with the production settings: forkserver with the worker's preloads
    (``livekit.agents.ipc._preload``, ``_preload_freeze``), one idle process, its 10 s
    initialization bound. Each process announces itself from the pool's initialize function,
    once LiveKit's own start handshake with it is done. A killed idle process is replaced by the
    pool's own loop; this measures that replacement. SIGTERM closes the pool and exits 0."""
    import asyncio
    import importlib
    import multiprocessing

    from livekit.agents.ipc.proc_pool import ProcPool
    from livekit.agents.job import JobExecutorType

    os.environ[ENV_READY] = path
    sys.path.insert(0, str(REPO))
    module = importlib.import_module("bench.lk_worker")  # pickled by this name
    ctx = multiprocessing.get_context("forkserver")
    warmup = ["livekit.agents.ipc._preload", "livekit.agents.ipc._preload_freeze"]  # as its worker does
    ctx.set_forkserver_preload([*PRELOAD, *warmup])

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        loop.add_signal_handler(signal.SIGINT, stopping.set)
        pool = ProcPool(
            initialize_process_fnc=module.livekit_initialize,
            job_entrypoint_fnc=module._no_job,
            session_end_fnc=None,
            simulation_end_fnc=None,
            num_idle_processes=1,
            initialize_timeout=10.0,
            close_timeout=CHILD_STOP_TIMEOUT,
            session_end_timeout=CHILD_STOP_TIMEOUT,
            inference_executor=None,
            job_executor_type=JobExecutorType.PROCESS,
            mp_ctx=ctx,
            memory_warn_mb=500,
            memory_limit_mb=0,
            http_proxy=None,
            loop=loop,
        )
        await pool.start()
        await stopping.wait()
        await pool.aclose()

    asyncio.run(run())
    return 0


def _cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The livekit.rtc worker of bench/zygote_restart.py.")
    p.add_argument("--forkserver-manager", metavar="SOCKET", help="run a forkserver pool of one worker")
    p.add_argument("--livekit-pool", metavar="SOCKET", help="run LiveKit's own process pool (one idle)")
    args = p.parse_args(argv)
    if args.forkserver_manager:
        return forkserver_manager(args.forkserver_manager)
    if args.livekit_pool:
        return livekit_pool(args.livekit_pool)
    announce(os.environ[ENV_READY])
    _sleep_forever()


if __name__ == "__main__":
    sys.exit(_cli())
