"""One LiveKit Agents job as one supervised leaf.

The dispatcher (:mod:`otp_agents.voice.dispatch`) accepted the job and wrote its ticket; the
leaf, forked from the app's zygote (:mod:`~.agents_zygote`: app loaded, prewarm run), runs it
through LiveKit's own job-process code (:class:`~.agents_job.JobRunner`) and says how it
ended. How it ends decides what its supervisor does (the pool's jobs are ``transient``):

- **the job ended** (the room closed, the app called ``ctx.shutdown()``): exit 0, not restarted;
- **the job failed** (its entrypoint raised, or its session closed on provider errors: an
  outage, a bad key): exit 0 as well, with ``job failed: <why>`` as its last words. Restarting
  would only fail again, and a provider outage across many calls must not spend the pool's
  restart intensity and take healthy calls down with it. The dispatcher reports it failed to the
  server, with the error;
- **the process failed** (killed, crashed, hung, leaking): an abnormal exit, so its supervisor
  restarts it and the job runs again from its ticket.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, NoReturn

import anyio

from otp_agents.voice.agents_host import Console, first_of, through_loop, watching
from otp_agents.voice.agents_job import CRASHED, JobRunner, entrypoint
from otp_agents.voice.agents_privacy import NEVER_KEPT
from otp_agents.voice.agents_reports import Reports, SessionMetrics, failure_reason
from otp_agents.voice.agents_resume import Resume
from otp_agents.voice.agents_state import decode
from otp_agents.voice.agents_ticket import Ticket
from otp_agents.voice.agents_worker_jobs import CONSOLE_KEY, metadata_console
from otp_agents.voice.agents_zygote import Prepared
from otp_agents.wire.env import ENV_APP_NEVER_KEPT
from otp_agents.worker import Worker

if TYPE_CHECKING:
    from livekit.agents import JobContext

FAILED = "job failed: "  # the leaf's last words when the job (not the process) failed
_SESSION_POLL = 0.25
HANDOVER_WAIT = 60.0  # a recycle waits this long at most for a turn boundary


class ProviderWatch:
    """Ends the job when its session closes on an unrecoverable provider error (LiveKit closes
    the session and leaves the job running, silent, until the room empties)."""

    def __init__(self) -> None:
        self.error: str | None = None
        self.provider = ""
        self.kind = ""

    def wrap(self, inner: Any) -> Any:
        async def entry(ctx: JobContext) -> None:
            task = asyncio.get_running_loop().create_task(self._attach(ctx), name="otp-agents-provider-watch")

            async def cancel(*_: Any) -> None:
                task.cancel()

            ctx.add_shutdown_callback(cancel)
            await inner(ctx)

        return entry

    async def _attach(self, ctx: JobContext) -> None:
        # LiveKit says nothing when a job's session starts: look until it has one
        while (session := ctx._primary_agent_session) is None:  # noqa: ASYNC110
            await asyncio.sleep(_SESSION_POLL)

        def closed(event: Any) -> None:
            error = getattr(event, "error", None)
            if error is None or str(getattr(event, "reason", "")).split(".")[-1].lower() != "error":
                return
            cause = getattr(error, "error", error)
            self.provider = str(getattr(error, "label", "") or "")
            self.kind = str(getattr(error, "type", "") or "")
            self.error = f"{self.provider or self.kind}: {type(cause).__name__}: {cause}"
            ctx.shutdown(reason=f"provider failure ({self.error})")

        session.on("close", closed)


async def _until_stop(
    worker: Worker, console: Console | None, runner: JobRunner, resume: Resume | None, what: str
) -> None:
    """Until the supervisor stops the leaf or, offline, the caller hangs up. A drain (a memory or
    lifetime recycle) hands the call over instead: it never returns."""
    if console is None:
        await worker.wait_stopping()
    else:
        await first_of(console.ended.wait, worker.wait_stopping)
        if console.ended.is_set():
            runner.reason = "the caller hung up"
            return
    if worker.draining and resume is not None and runner.loop is not None:
        await _hand_over(worker, runner.loop, resume, what)


async def _hand_over(worker: Worker, loop: asyncio.AbstractEventLoop, resume: Resume, what: str) -> NoReturn:
    """Leave the call at a turn boundary, its checkpoint delivered, without ending the job (no
    session close, no shutdown callbacks: the app's call goes on). The supervisor started the
    recycle, so it starts the leaf again, and the new process resumes the call."""
    waited = asyncio.run_coroutine_threadsafe(resume.at_turn_boundary(), loop)
    with anyio.move_on_after(HANDOVER_WAIT):  # a caller who never pauses: hand over anyway
        sent = await asyncio.wrap_future(waited)
        if sent is not None:
            await asyncio.wrap_future(sent)
    await worker.report("agent_handovers", 1)
    await worker.log(f"{what}: recycled; the call is handed over to the next process at a turn boundary")
    os._exit(0)


def describe(ticket: Ticket) -> str:
    job = ticket.protocol_job()
    caller = job.participant.identity or "-"
    return f"job {job.id} room {job.room.name} agent {ticket.identity} caller {caller}"


def log_with_job(ticket: Ticket) -> None:
    """Every line the app and LiveKit log names the call: operators grep by room or job id."""
    job = ticket.protocol_job()
    fmt = f"%(levelname)s job={job.id} room={job.room.name} %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr, force=True)


def console_address(ticket: Ticket) -> str | None:
    """A stand-in's job carries its console peer (offline audio) in its metadata."""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return metadata_console(ticket.protocol_job().metadata)
    return None


async def run_job(worker: Worker, app: Prepared, ticket: Ticket, *, forked: bool) -> int:
    """Run the ticket's job to its end; returns the leaf's exit code (see the module doc)."""
    what = describe(ticket)
    watch = ProviderWatch()
    address = console_address(ticket)
    console = Console(app.server, address) if address else None
    inner = console.entry if console else entrypoint(app.server)
    info = ticket.running_info()
    if address:
        info.fake_job = True  # no room on a server: LiveKit's mock room, audio over the console
    runner = JobRunner(app.server, info, userdata=app.userdata, entry=watch.wrap(inner))
    worker.liveness = lambda: through_loop(runner.loop)
    await worker.log(f"{what}: starting ({'forked from the app zygote' if forked else 'cold'})")
    reports = Reports(worker)
    async with _checkpointing(worker) as resume, anyio.create_task_group() as tg:
        tg.start_soon(reports.run)
        SessionMetrics(reports.post, lambda: resume is not None and resume.resumed).install()
        with watching(app.image.app, limit=sys.maxsize) as raised:  # the entrypoint's exception, if any
            end = await runner.run(worker.ready, lambda: _until_stop(worker, console, runner, resume, what))
        await reports.flush()
        tg.cancel_scope.cancel()
    if resume is not None and resume.checkpoints:
        await worker.report("agent_checkpoint_max_seconds", resume.cost_max)  # an event, not a metric
    if resume is not None and resume.resumed:
        await worker.report("agent_resumes", 1)
        await worker.log(f"{what}: resumed from its checkpoint; {resume.skipped} replies not spoken again")
    if not end.started:  # prewarm or job setup failed: the process is not fit to run jobs
        worker.exit_reason = f"{what}: {end.reason}"
        await worker.log(worker.exit_reason, logging.ERROR)
        return 1
    failure = watch.error or (end.reason if end.failed else None)
    if end.reason == CRASHED and raised.recent:
        failure = raised.recent[-1].what
    if watch.error:
        await worker.report("voice_provider_errors", 1, provider=watch.provider[:60], kind=watch.kind[:60])
    if failure:
        await worker.report("agent_job_failed", 1, reason=failure_reason(watch.error, end.reason))
        worker.exit_reason = f"{FAILED}{failure}"
        await worker.log(f"{what}: failed: {failure}", logging.ERROR)
    else:
        worker.exit_reason = f"job ended: {end.reason}"
        await worker.log(f"{what}: ended ({end.reason})")
    await worker.report("agent_jobs_ended", 1, outcome="failed" if failure else "success")
    if worker.checkpoint_max:
        await worker.clear_checkpoint()  # the call is over: nothing of it is kept
    return 0


@contextlib.asynccontextmanager
async def _checkpointing(worker: Worker) -> AsyncIterator[Resume | None]:
    """Checkpoint the job's session as it goes; resume it from the last one when this leaf is a
    restart (:mod:`~.agents_resume`). Off when the supervisor keeps no checkpoints."""
    if not worker.checkpoint_max:
        yield None
        return
    state = None
    if worker.resumed:
        try:
            state = decode(worker.resumed)
        except ValueError as exc:
            await worker.log(f"the checkpoint cannot be read, the call starts afresh: {exc}", logging.WARNING)
    owner = asyncio.get_running_loop()
    latest: list[tuple[bytes, list[concurrent.futures.Future[None]]]] = []
    wake = anyio.Event()

    def put(data: bytes, done: concurrent.futures.Future[None]) -> None:  # on the worker's loop
        waiting = latest.pop()[1] if latest else []
        latest.append((data, [*waiting, done]))  # only the newest goes; it holds the older ones
        wake.set()

    def send(data: bytes) -> concurrent.futures.Future[None]:  # on the job's loop
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        owner.call_soon_threadsafe(put, data, done)
        return done

    async def deliver() -> None:
        while latest:
            data, waiting = latest.pop()
            await worker.checkpoint(data)
            for done in waiting:
                done.set_result(None)

    more = tuple(n for n in os.environ.get(ENV_APP_NEVER_KEPT, "").split(",") if n)
    resume = Resume(state, send, limit=worker.checkpoint_max, never=NEVER_KEPT + more)
    resume.install()

    async def pump() -> None:
        nonlocal wake
        while True:
            await wake.wait()
            wake = anyio.Event()
            await deliver()

    async with anyio.create_task_group() as tg:
        tg.start_soon(pump)
        try:
            yield resume
        finally:
            await deliver()  # the last one goes out before the job's end is told
            tg.cancel_scope.cancel()


__all__ = ["CONSOLE_KEY", "FAILED", "ProviderWatch", "console_address", "describe", "log_with_job", "run_job"]
