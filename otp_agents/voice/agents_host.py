"""Host an unmodified LiveKit Agents app (an ``AgentServer`` with an ``entrypoint(ctx)``) as a
supervised leaf.

The agent file is imported as it is; nothing in it knows about otp-agents. The leaf is a protocol
worker, so it gets what LiveKit's own process layer lacks: restarts by OTP rules, heartbeats,
the memory breaker, and a stack dump before any kill. Two ways to run the app:

- **console**: the LiveKit Agents console transport (length-prefixed ``AgentSessionMessage``
  protobufs over TCP, :mod:`otp_agents.voice.agents_console` is the far end), one session per
  leaf, run as one job through LiveKit's own job-process code (:mod:`~.agents_job`), its loop on
  a thread of this process. Offline: no LiveKit server needed.
- **server**: the app registers with the LiveKit server named by ``LIVEKIT_URL``,
  ``LIVEKIT_API_KEY`` and ``LIVEKIT_API_SECRET`` and takes jobs from it, as ``start`` would.

In console mode the heartbeat goes through the job's own event loop (see
:attr:`otp_agents.worker.Worker.liveness`): a session loop stuck in a blocking call stops the
pongs, so the supervisor dumps every thread's stack and replaces the leaf.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import anyio

from otp_agents.voice.agents_job import JobEnd, JobRunner, entrypoint
from otp_agents.voice.agents_jobs import JobWatch
from otp_agents.voice.agents_worker_jobs import fake_console_jobs, prepare, use_console
from otp_agents.worker import Worker

if TYPE_CHECKING:
    from livekit.agents import AgentServer
    from livekit.agents.job import RunningJobInfo

    from otp_agents.voice.agents_offline import Offline

ENV_VARS = ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")
EXIT_PEER_UNREACHABLE = 3
EXIT_JOBS_FAILING = 1
_PROBE_SLICE = 0.5


async def through_loop(loop: asyncio.AbstractEventLoop | None) -> None:
    """Return once ``loop`` has run a callback: a liveness probe for a loop in another thread.
    Waits for as long as that loop is stuck; returns at once when it is gone."""
    if loop is None or loop.is_closed():
        return
    done = anyio.Event()
    here = asyncio.get_running_loop()

    def touched() -> None:
        with contextlib.suppress(RuntimeError):  # this loop closed meanwhile
            here.call_soon_threadsafe(done.set)

    try:
        loop.call_soon_threadsafe(touched)
    except RuntimeError:  # closed between the check and the call
        return
    while not done.is_set() and not loop.is_closed():
        with anyio.move_on_after(_PROBE_SLICE):
            await done.wait()


def _transport_class() -> type[Any]:
    from livekit.agents.voice.remote_session import TcpSessionTransport

    class WatchedTransport(TcpSessionTransport):
        """The console transport (on the job loop), telling the host (on the worker's loop) when
        it connects and when the peer leaves."""

        def __init__(self, host: str, port: int, console: Console) -> None:
            super().__init__(host, port)
            self._console = console

        async def start(self) -> None:
            try:
                await super().start()
            except OSError as exc:
                self._console.error = f"{self._host}:{self._port}: {exc.strerror or exc}"
                self._console.tell(self._console.ended)
                raise
            self._console.tell(self._console.connected)

        async def __anext__(self) -> Any:
            try:
                return await super().__anext__()
            except StopAsyncIteration:
                self._console.tell(self._console.ended)
                raise

    return WatchedTransport


class Console:
    """LiveKit Agents' console I/O for one job, set up on the job's own loop (its audio objects
    belong to the loop and the process that use them), watched from the worker's loop."""

    def __init__(self, server: AgentServer, address: str) -> None:
        self.server = server
        self.host, _, port = address.rpartition(":")
        self.port = int(port)
        self.connected = anyio.Event()
        self.ended = anyio.Event()
        self.error: str | None = None
        self._owner = asyncio.get_running_loop()

    def tell(self, event: anyio.Event) -> None:
        with contextlib.suppress(RuntimeError):  # the worker's loop is gone
            self._owner.call_soon_threadsafe(event.set)

    async def entry(self, ctx: Any) -> None:
        """The job's entrypoint: wire the console, then run the app's own."""
        use_console(_transport_class()(self.host, self.port, self))
        await entrypoint(self.server)(ctx)


def console_job(server: AgentServer) -> RunningJobInfo:
    """The job a console session runs: a fake job (a mock room), as LiveKit's console has it."""
    from livekit.agents.job import JobAcceptArguments, RunningJobInfo
    from livekit.agents.utils import shortuuid
    from livekit.protocol import agent, models

    room = models.Room(sid=shortuuid("SRM_"), name="console-room")
    return RunningJobInfo(
        accept_arguments=JobAcceptArguments(identity="console", name="", metadata=""),
        job=agent.Job(id=shortuuid("mock-job-"), room=room, type=agent.JobType.JT_ROOM),
        url="",
        token="",
        worker_id="console",
        fake_job=True,
    )


async def run_console(
    worker: Worker,
    server: AgentServer,
    address: str,
    app_file: str,
    *,
    userdata: dict[str, Any] | None = None,
) -> int:
    """One console session against the peer at ``host:port``, as one job through LiveKit's own
    job-process code (:mod:`otp_agents.voice.agents_job`); returns the exit code. An entrypoint
    that raises ends the leaf at once, with the exception as its exit reason."""
    console = Console(server, address)
    runner = JobRunner(server, console_job(server), userdata=userdata, entry=console.entry)
    worker.liveness = lambda: through_loop(runner.loop)
    stop = anyio.Event()
    job_over = anyio.Event()
    ends: list[JobEnd] = []

    async def job() -> None:
        try:
            ends.append(await runner.run(_nothing, stop.wait))
        finally:
            job_over.set()

    with watching(app_file, limit=1) as watch:
        async with anyio.create_task_group() as tg:
            tg.start_soon(job)
            with anyio.move_on_after(30):  # the session connects right after the job starts
                await first_of(
                    console.connected.wait,
                    console.ended.wait,
                    worker.wait_stopping,
                    watch.given_up.wait,
                    job_over.wait,
                )
            code = 0
            if watch.given_up.is_set():
                code = EXIT_JOBS_FAILING
            elif console.error or not console.connected.is_set():
                end = ends[0] if ends else None
                problem = end.reason if end and not end.started else None
                await _say(worker, problem or f"console peer unreachable at {console.error or address}")
                code = EXIT_JOBS_FAILING if problem else EXIT_PEER_UNREACHABLE
            else:
                await worker.ready()
                await first_of(console.ended.wait, worker.wait_stopping, watch.given_up.wait, job_over.wait)
            stop.set()  # the job ends as LiveKit ends one: session closed, callbacks run
            await job_over.wait()
        if watch.given_up.is_set():
            return await _give_up(worker, watch)
    return code


async def _nothing() -> None:
    return None


async def run_server(
    worker: Worker,
    server: AgentServer,
    app_file: str,
    *,
    max_failures: int = 3,
    idle_processes: int | None = None,
    offline: Offline | None = None,
) -> int:
    """Register with the LiveKit server from the environment and take its jobs until stopped.

    Every failed job is reported to the supervisor with its exception; ``max_failures`` in a row
    (no job ending well in between) end the leaf with exit code 1, so a broken app never looks
    healthy: its supervisor restarts it, and gives up by its intensity. LiveKit's own job
    processes get the offline providers and a stand-in's console audio too (see
    :mod:`~.agents_worker_jobs`)."""
    missing = [v for v in ENV_VARS if not os.environ.get(v)]
    if missing:
        await _say(worker, f"server mode needs {', '.join(missing)} in the environment")
        return 2
    options: dict[str, Any] = {
        "ws_url": os.environ["LIVEKIT_URL"],
        "api_key": os.environ["LIVEKIT_API_KEY"],
        "api_secret": os.environ["LIVEKIT_API_SECRET"],
    }
    if idle_processes is not None:
        options["num_idle_processes"] = idle_processes
    server.update_options(**options)
    _ephemeral_health_port(server)
    prepare(server, offline)
    registered = anyio.Event()
    loop = asyncio.get_running_loop()
    server.on("worker_registered", lambda *_: loop.call_soon(registered.set))
    with watching(app_file, limit=max_failures) as watch:

        def started() -> None:
            watch.watch_pool(server._proc_pool)
            fake_console_jobs(server._proc_pool)

        server.once("worker_started", started)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_relay, worker, watch)
            code = await _serve_jobs(worker, server, watch, registered)
            tg.cancel_scope.cancel()
    if watch.given_up.is_set():
        return await _give_up(worker, watch)
    return code


async def _serve_jobs(worker: Worker, server: AgentServer, watch: JobWatch, registered: anyio.Event) -> int:
    async with _running(server, devmode=False, unregistered=False) as crashed:
        await first_of(registered.wait, crashed.wait, worker.wait_stopping, watch.given_up.wait)
        if crashed.is_set() or watch.given_up.is_set():
            watch.closing = True
            return 1
        if registered.is_set():
            await worker.ready()
            await first_of(crashed.wait, worker.wait_stopping, watch.given_up.wait)
        watch.closing = True
        if worker.draining and not watch.given_up.is_set():  # finish the running calls, take no new ones
            started = time.monotonic()
            timeout = worker.shutdown_timeout
            with contextlib.suppress(asyncio.TimeoutError):
                await server.drain(int(timeout) if timeout else None)
            await worker.log(f"drained in {time.monotonic() - started:.1f}s")
        return 1 if crashed.is_set() else 0


def _ephemeral_health_port(server: AgentServer) -> None:
    """LiveKit's worker serves its own health check on port 8081 unless the app chose one: left
    at that, a second hosted app on the machine could not start. The supervisor is the health
    check here, so an app that did not choose a port gets any free one."""
    from livekit.agents.worker import ServerEnvOption

    if isinstance(getattr(server, "_port", None), ServerEnvOption):
        server._port = 0


@contextlib.contextmanager
def watching(app_file: str, limit: int) -> Iterator[JobWatch]:
    watch = JobWatch(app_file, limit)
    logger = logging.getLogger("livekit.agents")
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        watch.close()


async def _relay(worker: Worker, watch: JobWatch) -> None:
    """Each failed job, in the supervisor's event stream as it happens."""
    async for line in watch.reports():
        with contextlib.suppress(Exception):
            await worker.log(f"agents host: {line}", logging.ERROR)


async def _give_up(worker: Worker, watch: JobWatch) -> int:
    reason = watch.reason or "the app's jobs keep failing"
    await _say(worker, reason)
    worker.exit_reason = reason
    return EXIT_JOBS_FAILING


@contextlib.asynccontextmanager
async def _running(server: AgentServer, **run_args: bool) -> AsyncIterator[anyio.Event]:
    """Run ``server.run`` in the background; yields an event set if it ends by itself."""
    ended = anyio.Event()
    started = anyio.Event()
    loop = asyncio.get_running_loop()
    server.once("worker_started", lambda: loop.call_soon(started.set))

    async def run() -> None:
        try:
            await functools.partial(server.run, **run_args)()
        finally:
            ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await first_of(started.wait, ended.wait)
        try:
            yield ended
        finally:
            with anyio.CancelScope(shield=True):
                await server.aclose()
            tg.cancel_scope.cancel()


async def _say(worker: Worker, problem: str) -> None:
    """Why the leaf is giving up: in the supervisor's event stream and on stderr."""
    await worker.log(f"agents host: {problem}", logging.ERROR)
    sys.stderr.write(f"agents host: {problem}\n")


async def first_of(*waits: Any) -> None:
    """Return once any of ``waits`` (async callables) has returned; the others are cancelled."""
    async with anyio.create_task_group() as tg:

        async def one(wait: Any) -> None:
            await wait()
            tg.cancel_scope.cancel()

        for wait in waits:
            tg.start_soon(one, wait)
