"""One LiveKit Agents job in this process, through LiveKit's own job-process code.

LiveKit runs each job in a process of its pool. The child side (``ipc/job_proc_lazy_main``:
``_JobProc`` driven by ``_ProcClient``) reads an ``InitializeRequest`` (and runs the app's
prewarm), then a ``StartJobRequest`` (builds the room and the ``JobContext``, runs the
entrypoint), and ends the job on a ``ShutdownRequest``, or when the room goes, the app calls
``ctx.shutdown()`` or the entrypoint raises. The parent side (``SupervisedProc``) pings it,
watches its memory and kills it.

Here the leaf is that process. LiveKit's child side runs unchanged on a thread of its own, with
its own event loop (the *job loop*); :class:`JobRunner` is the parent end, on the worker's loop,
over a socketpair inside the process. What LiveKit's parent side would do is the supervisor's,
and more: heartbeats go *through the job loop* (a blocked job loop stops the pongs; a hang in C
with the GIL held stops everything), the memory breaker watches the process tree, a dump shows
every thread before a kill, and a job that ended is one that its supervisor restarts only if the
process failed.

The code driven here is private to LiveKit Agents, so one release is supported: any other is
refused with the version to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from otp_agents.errors import OtpAgentsError

if TYPE_CHECKING:
    from livekit.agents import AgentServer, JobContext, JobProcess
    from livekit.agents.job import RunningJobInfo

SUPPORTED_RELEASE = "1.8.9"  # the release whose job-process code this drives
CRASHED = "job crashed"  # LiveKit's shutdown reason when the entrypoint raised
NO_EXIT = "the job ended without LiveKit's exit message"
CODE_RAISED = "job process code raised"  # LiveKit's job-process code itself failed


Entry = Callable[["JobContext"], Awaitable[Any]]


class AgentsVersionError(OtpAgentsError):
    """The installed livekit-agents is not the release this drives."""


def check_release() -> None:
    from livekit.agents import __version__

    if __version__ != SUPPORTED_RELEASE:
        raise AgentsVersionError(
            f"livekit-agents {__version__} is installed; otp-agents runs jobs through the job "
            f"process of {SUPPORTED_RELEASE} only: pip install 'livekit-agents=={SUPPORTED_RELEASE}'"
        )


class NoEntrypoint(OtpAgentsError):
    """The app registers no entrypoint (no ``@server.rtc_session()``, no ``entrypoint_fnc``)."""


def entrypoint(server: AgentServer) -> Entry:
    fnc = server._entrypoint_fnc
    if fnc is None:
        raise NoEntrypoint("the app registers no entrypoint (@server.rtc_session() or entrypoint_fnc)")
    return fnc


@dataclass
class JobEnd:
    """How a job ended: LiveKit's reason (``room disconnected``, ``job crashed``, a reason the
    app gave ``ctx.shutdown``, or ours on a stop), and whether the job itself failed."""

    reason: str
    failed: bool
    started: bool  # the entrypoint was reached (prewarm passed)


class JobRunner:
    """Run ``info``'s job with ``server``'s entrypoint, in this process.

    ``userdata``: what a zygote's prewarm left (the job's ``ctx.proc.userdata`` starts as that,
    shared copy-on-write); ``None`` runs the app's prewarm here. ``entry`` wraps the app's
    entrypoint (console wiring); default: the entrypoint itself."""

    def __init__(
        self,
        server: AgentServer,
        info: RunningJobInfo,
        *,
        userdata: dict[str, Any] | None = None,
        entry: Entry | None = None,
        prewarm_timeout: float | None = None,
    ) -> None:
        self.server = server
        self.info = info
        self.userdata = userdata
        app_entry = entrypoint(server)
        self.entry: Entry = entry or app_entry
        self.prewarm_timeout = prewarm_timeout or float(server._initialize_process_timeout)
        self.loop: asyncio.AbstractEventLoop | None = None  # the job loop, while it runs
        self.reason = ""
        self.failed = False
        self._done = anyio.Event()
        self._thread_error: BaseException | None = None

    # -- the child side: LiveKit's own, on a thread ---------------------------------------------

    def _prewarm(self, proc: JobProcess) -> None:
        if self.userdata is not None:
            proc.userdata.update(self.userdata)
        elif self.server.setup_fnc is not None:
            self.server.setup_fnc(proc)

    def _child(self, cch: socket.socket, owner: asyncio.AbstractEventLoop) -> None:
        from livekit.agents import JobExecutorType
        from livekit.agents.ipc.job_proc_lazy_main import _JobProc
        from livekit.agents.ipc.proc_client import _ProcClient

        job = _JobProc(
            self._prewarm,
            self.entry,
            self.server._session_end_fnc,
            session_end_timeout=self.server._session_end_timeout,
            executor_type=JobExecutorType.PROCESS,
            user_arguments=None,
            simulation_end_fnc=getattr(self.server, "_simulation_end_fnc", None),
        )

        async def main(messages: Any) -> None:
            self.loop = asyncio.get_running_loop()
            await job.entrypoint(messages)

        try:
            client = _ProcClient(cch, None, job.initialize, main)
            client.initialize()
            client.run()
        except BaseException as exc:  # reported by run(); the thread just ends
            self._thread_error = exc
        finally:
            self.loop = None
            cch.close()
            with contextlib.suppress(RuntimeError):  # the worker's loop is gone
                owner.call_soon_threadsafe(self._done.set)

    # -- the parent side: here ------------------------------------------------------------------

    async def run(
        self, ready: Callable[[], Awaitable[None]], stopping: Callable[[], Awaitable[None]]
    ) -> JobEnd:
        """Prewarm (unless a zygote did), call ``ready``, run the job until it ends; once
        ``stopping`` returns, ask the job to end (LiveKit's own shutdown: the session closes,
        ``on_session_end`` and the shutdown callbacks run). Returns how it ended."""
        from livekit.agents.ipc import channel, proto
        from livekit.agents.utils.aio.duplex_unix import DuplexClosed, _AsyncDuplex

        pch, cch = socket.socketpair()
        cch.setblocking(True)
        thread = threading.Thread(
            target=self._child, args=(cch, asyncio.get_running_loop()), name="livekit-job", daemon=True
        )
        thread.start()
        duplex = await _AsyncDuplex.open(pch)
        started = False
        try:
            init = proto.InitializeRequest(
                asyncio_debug=False,
                ping_interval=0,  # no self-check in the job: the supervisor's heartbeat covers it
                ping_timeout=0,
                high_ping_threshold=0,
                http_proxy=self.server._http_proxy or "",
            )
            await channel.asend_message(duplex, init)
            with anyio.fail_after(self.prewarm_timeout):
                answer = await channel.arecv_message(duplex, proto.IPC_MESSAGES)
            if not isinstance(answer, proto.InitializeResponse) or answer.error:
                error = getattr(answer, "error", "") or type(answer).__name__
                return JobEnd(f"prewarm failed: {error}", failed=True, started=False)
            await ready()
            start = proto.StartJobRequest()
            start.running_job = self.info
            await channel.asend_message(duplex, start)
            started = True
            async with anyio.create_task_group() as tg:

                async def ask_to_end() -> None:
                    await stopping()
                    self.reason = self.reason or "stopped by its supervisor"
                    with contextlib.suppress(DuplexClosed, OSError):
                        await channel.asend_message(duplex, proto.ShutdownRequest(reason=self.reason))

                tg.start_soon(ask_to_end)
                await self._read(duplex, channel, proto, DuplexClosed)
                tg.cancel_scope.cancel()
        except TimeoutError:
            return JobEnd(f"prewarm took over {self.prewarm_timeout:.0f}s", failed=True, started=False)
        except DuplexClosed:
            pass
        finally:
            with contextlib.suppress(Exception):
                await duplex.aclose()
            with anyio.CancelScope(shield=True):
                await self._done.wait()
        if self._thread_error is not None and not started:
            error = self._thread_error
            return JobEnd(f"prewarm failed: {type(error).__name__}: {error}", failed=True, started=False)
        if self._thread_error is not None:
            self.failed = True
            self.reason = f"{CODE_RAISED} {type(self._thread_error).__name__}: {self._thread_error}"
        if started and not self.reason:  # LiveKit always says why a job ends; it did not
            self.failed, self.reason = True, NO_EXIT
        return JobEnd(self.reason, failed=self.failed or self.reason == CRASHED, started=started)

    async def _read(self, duplex: Any, channel: Any, proto: Any, closed: type[Exception]) -> None:
        from otp_agents.voice.agents_inference import RUNNERS

        async def infer(request: Any) -> None:
            data, error = await RUNNERS.run(request.method, request.data)
            answer = proto.InferenceResponse(request_id=request.request_id, data=data, error=error or "")
            with contextlib.suppress(closed, OSError):
                await channel.asend_message(duplex, answer)

        async with anyio.create_task_group() as tg:
            while True:
                try:
                    message = await channel.arecv_message(duplex, proto.IPC_MESSAGES)
                except closed:
                    tg.cancel_scope.cancel()
                    return
                if isinstance(message, proto.Exiting):
                    self.reason = message.reason or self.reason
                elif isinstance(message, proto.InferenceRequest):
                    tg.start_soon(infer, message)  # the job's executor, served here (agents_inference)


__all__ = [
    "CODE_RAISED",
    "CRASHED",
    "NO_EXIT",
    "SUPPORTED_RELEASE",
    "AgentsVersionError",
    "JobEnd",
    "JobRunner",
    "NoEntrypoint",
    "check_release",
    "entrypoint",
]
