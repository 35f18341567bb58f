"""Jobs from a LiveKit server: this node registers as an agent worker and runs each job it
accepts as a leaf under a simple_one_for_one supervisor. LiveKit's agent worker protocol
(protobuf ``WorkerMessage``/``ServerMessage`` over a WebSocket at ``<url>/agent``):

1. register and get a worker id;
2. answer each ``AvailabilityRequest``: refused while draining, at ``max_jobs`` or at
   ``load_threshold`` (running jobs / ``max_jobs``, or the app's own ``load_fnc``); else the
   app's request handler decides (``decide``), the slot held meanwhile and given back if no
   assignment follows;
3. on ``JobAssignment`` start a leaf with the control socket's ``start-child`` (as an operator's
   ``otp-agents start-child`` would) and report ``JS_RUNNING``, or ``JS_FAILED`` with why;
4. follow the jobs' children on the control socket's event stream: a crash is restarted by the
   jobs' supervisor and the job stays running; a child that ends for good is ``JS_SUCCESS``
   (exit 0, or terminated on request) or ``JS_FAILED`` with how it ended (a leaf whose *job*
   failed exits 0 with ``job failed: <why>`` as its last words); ``JobTermination`` terminates it;
5. report load every ``status_interval``; WebSocket pings find a dead connection;
6. when the connection drops, reconnect with capped, jittered exponential backoff and register
   again, claiming the jobs still running (they are the supervisor's children, not ours; a
   restarted dispatcher finds them in ``status``);
7. on drain, report draining so no job is assigned, let running jobs finish within the bound.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio
import anyio.abc
from google.protobuf.message import DecodeError
from livekit.protocol import agent as lk

import otp_agents.ops.control_client as control
from otp_agents.errors import NotRunning
from otp_agents.voice.dispatch_state import (
    AGENT_NAME_ATTRIBUTE,
    ASSIGNMENT_TIMEOUT,
    FINISHED,
    REQUEST_TIMEOUT,
    START_TIMEOUT,
    Backoff,
    JobRecord,
    Launch,
    Rejected,
    app_load,
    error_of,
    forget_finished,
    how_it_ended,
    running_jobs,
)

JOB_EVENTS = [
    "child_started",
    "child_exited",
    "child_terminated",
    "start_failed",
    "restarting",
    "restart_delayed",
    "supervisor_stopped",
]


@dataclass
class Dispatcher:
    url: str  # ws:// or wss:// base of the LiveKit server
    token: Callable[[], str]  # an access token with the agent grant
    control_socket: str
    jobs_supervisor: str  # path of the simple_one_for_one supervisor that runs the jobs
    job_args: Callable[[Launch], list[str]]  # argv of the job's leaf
    agent_name: str = ""
    max_jobs: int = 8
    load_threshold: float = 0.7
    status_interval: float = 2.5
    backoff: Backoff = field(default_factory=Backoff)
    restart_grace: float = 2.0  # an exit not followed by a restart within this is final
    log: Callable[[str], None] = lambda line: None
    decide: Callable[[Any], Awaitable[Any]] | None = None  # Job -> accept arguments, None: reject
    load_fnc: Callable[[], float] | None = None  # the app's own load (0..1); default: jobs/max_jobs
    job_memory: tuple[float | None, float | None] = (None, None)  # (warn, limit) MB per job
    on_end: Callable[[str], None] = lambda job_id: None  # a job ended for good
    adopted: Callable[[str, list[str]], None] = lambda job_id, args: None  # found running at start
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    draining: bool = False
    registrations: int = 0
    registered: bool = False  # registered on the current connection
    worker_id: str = ""
    _ws: aiohttp.ClientWebSocketResponse | None = None
    _by_child: dict[str, JobRecord] = field(default_factory=dict)
    _early: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _tg: anyio.abc.TaskGroup | None = None
    _app_load: float = 0.0

    @property
    def running(self) -> int:
        return sum(1 for j in self.jobs.values() if j.status in (lk.JS_PENDING, lk.JS_RUNNING))

    @property
    def load(self) -> float:
        """Running jobs against ``max_jobs``, or the app's own load when it has a ``load_fnc``."""
        jobs = min(1.0, self.running / self.max_jobs) if self.max_jobs else 1.0
        return jobs if self.load_fnc is None else max(self._app_load, 1.0 if jobs >= 1.0 else 0.0)

    async def refresh_load(self) -> None:
        """Run the app's ``load_fnc`` (its code may block: on a thread) and keep its answer."""
        if self.load_fnc is not None:
            self._app_load = await app_load(self.load_fnc, self.log)

    # -- the connection, kept up ---------------------------------------------------------------------

    async def run(self) -> None:
        """Stay registered until cancelled or drained; follow the jobs meanwhile."""
        async with anyio.create_task_group() as tg:
            self._tg = tg  # jobs outlive a connection: their tasks live here
            tg.start_soon(self._follow_jobs)
            await self._adopt_running()
            attempt = 0
            while not self.draining:
                registered = self.registrations
                try:
                    await self._session()
                except* (aiohttp.ClientError, OSError, TimeoutError, ConnectionError) as group:
                    exc = group.exceptions[0]
                    self.log(f"LiveKit connection failed: {type(exc).__name__}: {exc}")
                if self.draining:
                    break
                if self.registrations > registered:
                    attempt = 0  # it was up: start the backoff afresh
                attempt += 1
                delay = self.backoff.delay(attempt)
                self.log(f"reconnecting in {delay:.2f}s (attempt {attempt})")
                await anyio.sleep(delay)

    async def _adopt_running(self) -> None:
        """Calls already running under the jobs' supervisor (this dispatcher restarted): follow
        them again, claim them at registration, report how they end."""
        request = control.Request(op="status", path=self.jobs_supervisor)
        try:
            reply = await control.call(self.control_socket, request)
        except (OSError, TimeoutError, NotRunning) as exc:
            self.log(f"could not look for running jobs: {exc}")
            return
        assert self._tg is not None
        for job_id, path, args in running_jobs(reply.data if reply.ok else None):
            rec = self.jobs.setdefault(job_id, JobRecord(job_id))
            rec.child, rec.status, rec.launched = path, lk.JS_RUNNING, True
            self._by_child[path] = rec
            self.adopted(job_id, args)
            self.log(f"job {job_id}: still running in {path}; following it again")
            for early in self._early.pop(path, []):
                self._on_child_event(early, self._tg)

    async def _session(self) -> None:
        headers = {"Authorization": f"Bearer {self.token()}"}
        timeout = aiohttp.ClientTimeout(sock_connect=10)
        # heartbeat: aiohttp pings and drops a connection whose pong does not come (a half-open
        # TCP connection would otherwise look registered for ever).
        async with aiohttp.ClientSession(timeout=timeout) as http:
            with anyio.fail_after(15):
                ws = await http.ws_connect(f"{self.url.rstrip('/')}/agent", headers=headers, heartbeat=30)
            await self._serve_connection(ws)
        raise ConnectionError("the LiveKit server closed the connection")

    async def _serve_connection(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async with ws:
            self._ws = ws
            try:
                await self._send(
                    lk.WorkerMessage(
                        register=lk.RegisterWorkerRequest(
                            type=lk.JT_ROOM, agent_name=self.agent_name, version="otp-agents", ping_interval=0
                        )
                    )
                )
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._report_status)
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.BINARY:
                            try:
                                server_msg = lk.ServerMessage.FromString(msg.data)
                            except DecodeError as exc:  # one bad message, not a dead dispatcher
                                self.log(f"ignoring an unreadable message from the server: {exc}")
                                continue
                            await self._on_server(server_msg)
                        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR):
                            break
                    tg.cancel_scope.cancel()
            finally:
                self._ws = None
                self.registered = False

    async def _send(self, msg: lk.WorkerMessage) -> None:
        """Best effort: a message that cannot go out now is lost with its connection (the
        reader notices the drop and reconnects)."""
        ws = self._ws
        if ws is not None and not ws.closed:
            with anyio.move_on_after(5), contextlib.suppress(aiohttp.ClientError, ConnectionError, OSError):
                await ws.send_bytes(msg.SerializeToString())

    async def _report_status(self) -> None:
        seq = 0
        while True:
            seq += 1
            await self.refresh_load()
            await self._send(self._worker_status(seq))
            await anyio.sleep(self.status_interval)

    def _worker_status(self, seq: int = 0) -> lk.WorkerMessage:
        full = self.draining or self.running >= self.max_jobs or self.load >= self.load_threshold
        return lk.WorkerMessage(
            update_worker=lk.UpdateWorkerStatus(
                status=lk.WS_FULL if full else lk.WS_AVAILABLE,
                load=self.load,
                job_count=self.running,
                draining=self.draining,
                seq=seq,
            )
        )

    # -- what the server asks ------------------------------------------------------------------------

    async def _on_server(self, msg: lk.ServerMessage) -> None:
        tg = self._tg
        assert tg is not None
        which = msg.WhichOneof("message")
        if which == "register":
            self.registrations += 1
            self.registered = True
            self.worker_id = msg.register.worker_id
            self.log(f"registered as {self.worker_id}")
            running = [j.id for j in self.jobs.values() if j.launched and j.status not in FINISHED]
            if running:  # a new registration: claim the calls still running here, as LiveKit's worker does
                await self._send(lk.WorkerMessage(migrate_job=lk.MigrateJobRequest(job_ids=running)))
        elif which == "availability":
            tg.start_soon(self._answer, msg.availability.job)
        elif which == "assignment":
            rec = self.jobs.setdefault(msg.assignment.job.id, JobRecord(msg.assignment.job.id))
            if not rec.launched:  # a repeated assignment starts nothing new
                rec.launched = True
                tg.start_soon(self._start_job, msg.assignment)
        elif which == "termination":
            tg.start_soon(self._terminate_job, msg.termination.job_id)

    async def _answer(self, job: Any) -> None:
        known = self.jobs.get(job.id)
        available = (
            (known is None or not known.launched)
            and not self.draining
            and self.running - (known is not None) < self.max_jobs
            and self.load < self.load_threshold
        )
        if not available:
            await self._send(lk.WorkerMessage(availability=lk.AvailabilityResponse(job_id=job.id)))
            return
        # the slot is held from now: a burst of requests cannot all be accepted into it
        rec = self.jobs[job.id] = known or JobRecord(job.id, received_at=time.time())
        answer = lk.AvailabilityResponse(job_id=job.id)
        accepted = None
        if self.decide is not None:
            try:
                with anyio.fail_after(REQUEST_TIMEOUT):
                    accepted = await self.decide(job)
            except Exception as exc:  # the app's handler: its failure rejects this job only
                self.log(f"job {job.id}: the app's request handler raised {type(exc).__name__}: {exc}")
        if isinstance(accepted, Rejected) or (self.decide is not None and accepted is None):
            answer.terminate = bool(getattr(accepted, "terminate", False))
            if not rec.launched:
                self.jobs.pop(job.id, None)
        else:
            rec.accepted = accepted
            answer.available = True
            answer.participant_identity = getattr(accepted, "identity", "") or f"agent-{job.id}"
            answer.participant_name = getattr(accepted, "name", "") or "otp-agents voice agent"
            answer.participant_metadata = getattr(accepted, "metadata", "") or ""
            answer.participant_attributes[AGENT_NAME_ATTRIBUTE] = self.agent_name
            answer.participant_attributes.update(getattr(accepted, "attributes", None) or {})
            assert self._tg is not None
            self._tg.start_soon(self._expire, rec)
        await self._send(lk.WorkerMessage(availability=answer))

    async def _expire(self, rec: JobRecord) -> None:
        """Accepted, never assigned (the caller left, another worker got it): the slot is free."""
        await anyio.sleep(ASSIGNMENT_TIMEOUT)
        if not rec.launched and self.jobs.get(rec.id) is rec:
            del self.jobs[rec.id]
            self.log(f"job {rec.id}: accepted but never assigned; its slot is free again")

    async def _start_job(self, assignment: Any) -> None:
        job = assignment.job
        rec = self.jobs.setdefault(job.id, JobRecord(job.id, received_at=time.time()))
        launch = Launch(job, assignment, rec.accepted, self.worker_id, rec.received_at)
        try:
            args = self.job_args(launch)
        except Exception as exc:
            await self._status(rec, lk.JS_FAILED, f"could not start the agent: {exc}")
            return
        request = control.Request(
            op="start-child",
            path=self.jobs_supervisor,
            args=args,
            memory_warn_mb=self.job_memory[0],
            memory_limit_mb=self.job_memory[1],
        )
        try:
            with anyio.CancelScope(shield=True):  # the supervisor starts it anyway: learn its path
                reply = await control.call(self.control_socket, request, timeout=START_TIMEOUT)
        except (OSError, TimeoutError, NotRunning) as exc:
            await self._status(rec, lk.JS_FAILED, f"could not start the agent: {exc}")
            return
        if not reply.ok:
            await self._status(rec, lk.JS_FAILED, f"could not start the agent: {reply.message}")
            return
        rec.child = str(reply.data["path"])
        self._by_child[rec.child] = rec
        await self._status(rec, lk.JS_RUNNING)
        early = self._early.pop(rec.child, [])
        assert self._tg is not None
        for row in early:  # it ended before we knew its path
            self._on_child_event(row, self._tg)
        if rec.terminate_asked:
            await self._terminate_job(rec.id)

    async def _terminate_job(self, job_id: str) -> None:
        rec = self.jobs.get(job_id)
        if rec is not None and rec.child is None:
            rec.terminate_asked = True  # still starting: terminated once its path is known
        elif rec is not None and rec.child is not None:
            with contextlib.suppress(OSError, TimeoutError, NotRunning):
                await control.call(self.control_socket, control.Request(op="terminate", path=rec.child))

    async def _status(self, rec: JobRecord, status: int, error: str = "") -> None:
        if rec.status in FINISHED:
            return
        rec.status = status
        if status in FINISHED:
            forget_finished(self.jobs, self._by_child)
            with contextlib.suppress(Exception):
                self.on_end(rec.id)
        self.log(f"job {rec.id}: {lk.JobStatus.Name(status)}{': ' + error if error else ''}")
        update = lk.UpdateJobStatus(job_id=rec.id, status=status, error=error)  # type: ignore[arg-type]
        await self._send(lk.WorkerMessage(update_job=update))

    # -- what the jobs' children do ------------------------------------------------------------------

    async def _follow_jobs(self) -> None:
        req = control.Request(op="events", path=self.jobs_supervisor, kinds=JOB_EVENTS)
        async with anyio.create_task_group() as tg:
            async for reply in control.stream(self.control_socket, req):
                for row in reply.data or []:
                    self._on_child_event(row, tg)

    def _on_child_event(self, row: dict[str, Any], tg: anyio.abc.TaskGroup) -> None:
        kind, path = row.get("kind"), row.get("path", "")
        if kind == "supervisor_stopped" and path == self.jobs_supervisor:
            for rec in list(self._by_child.values()):
                reason = rec.failure or "the jobs' supervisor stopped"
                tg.start_soon(self._status, rec, lk.JS_FAILED, f"gave up: {reason}")
            return
        found = self._by_child.get(path)
        if found is None:
            if path.startswith(self.jobs_supervisor + "/") and len(self._early) < 256:
                self._early.setdefault(path, []).append(row)  # its start reply is still on its way
            return
        rec = found
        if kind in ("restarting", "child_started", "restart_delayed"):
            if rec.settle is not None:
                rec.settle.set()  # restarted (or will be): the call goes on from its checkpoint
        elif kind == "child_terminated":
            tg.start_soon(self._status, rec, lk.JS_SUCCESS)
        elif kind in ("child_exited", "start_failed"):
            # Final only if its supervisor does not restart it: a recycle exits 0 and comes
            # back, a crash of a transient call comes back, a failed restart is tried again.
            how, status = how_it_ended(row)
            rec.failure = how if status == lk.JS_FAILED else rec.failure
            rec.settle = anyio.Event()
            tg.start_soon(self._final_unless_restarted, rec, how, status)

    async def _final_unless_restarted(self, rec: JobRecord, how: str, status: int) -> None:
        settle = rec.settle
        assert settle is not None
        with anyio.move_on_after(self.restart_grace):
            await settle.wait()
            return
        await self._status(rec, status, "" if status == lk.JS_SUCCESS else error_of(how))

    # -- drain ---------------------------------------------------------------------------------------

    async def drain(self, bound: float) -> None:
        """Take no new jobs; wait up to ``bound`` seconds for the running ones to end."""
        self.draining = True
        await self._send(self._worker_status())
        with anyio.move_on_after(bound):
            while self.running:  # noqa: ASYNC110 - job ends arrive as control-socket events
                await anyio.sleep(0.1)
        with contextlib.suppress(Exception):
            if self._ws is not None:
                await self._ws.close()
