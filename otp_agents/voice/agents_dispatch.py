"""A LiveKit Agents app's own worker options, applied by the dispatcher that takes its jobs.

LiveKit's worker reads these from the app's ``AgentServer``; the dispatcher
(:mod:`otp_agents.voice.dispatch`) does the same, and the tree may override some of them
(its word wins; the dispatcher logs which it did):

- ``agent_name`` (``@server.rtc_session(agent_name=...)``): explicit dispatch by name;
- the request handler (``on_request``): accept or reject each job, and as which participant
  (identity, name, metadata, attributes), through LiveKit's own ``JobRequest``;
- ``load_fnc`` and ``load_threshold``: when the node says it is full;
- ``job_memory_warn_mb`` / ``job_memory_limit_mb``: each job leaf's memory bounds, applied by
  the supervisor's memory breaker (the job's whole process tree, a dump before the kill) where
  the tree's health table sets none;
- ``drain_timeout``: reported; the bound that holds is the tree's (the dispatcher's
  ``shutdown``), which systemd's and Kubernetes' stop timeouts are checked against.

Each accepted job gets a ticket (:mod:`~.agents_ticket`) that its leaf reads.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otp_agents.voice import agents_ticket
from otp_agents.voice.dispatch_state import Launch, Rejected

if TYPE_CHECKING:
    from livekit.agents import AgentServer


@dataclass
class AppOptions:
    agent_name: str
    load_threshold: float
    load_fnc: Callable[[], float] | None
    job_memory: tuple[float | None, float | None]  # (warn, limit) MB; None: no bound
    drain_timeout: float
    decide: Callable[[Any], Awaitable[Any]] | None
    said: list[str] = field(default_factory=list)  # what is in force, and from where


def app_options(
    server: AgentServer,
    *,
    agent_name: str | None = None,
    load_threshold: float | None = None,
    max_jobs: int = 8,
) -> AppOptions:
    """The app's options, with the tree's overrides (None: not overridden)."""
    from livekit.agents.worker import ServerEnvOption

    said: list[str] = []

    def pick(name: str, app_value: Any, tree_value: Any) -> Any:
        if tree_value is not None:
            note = f" (the app's {app_value!r} overridden)" if app_value not in (None, "") else ""
            said.append(f"{name}={tree_value!r} from the tree{note}")
            return tree_value
        said.append(f"{name}={app_value!r} from the app")
        return app_value

    name = pick("agent_name", server._agent_name, agent_name)
    load = _load_fnc(server)
    app_threshold = server._load_threshold
    if isinstance(app_threshold, ServerEnvOption):  # the app left LiveKit's default
        # LiveKit's 0.7 is of its CPU load; without a load_fnc the load here is jobs / max_jobs,
        # and the node is full at max_jobs
        app_threshold = app_threshold.prod_default if load else 1.0
    threshold = pick("load_threshold", float(app_threshold), load_threshold)
    said.append(
        f"load: the app's load_fnc ({getattr(server._load_fnc, '__name__', '?')})"
        if load
        else f"load: running jobs / max_jobs={max_jobs} (the app has no load_fnc)"
    )
    warn = float(server._job_memory_warn_mb) or None
    limit = float(server._job_memory_limit_mb) or None
    said.append(
        f"per job memory: warn {warn or '-'} MB, limit {limit or '-'} MB from the app (the tree's wins)"
    )
    said.append(
        f"the app's drain_timeout={server._drain_timeout}s; the tree's dispatcher shutdown bounds the drain"
    )
    request = server._request_fnc
    said.append(
        f"requests: the app's handler ({getattr(request, '__name__', '?')})"
        if request
        else "requests: accept all"
    )
    return AppOptions(
        agent_name=name,
        load_threshold=threshold,
        load_fnc=load,
        job_memory=(warn, limit),
        drain_timeout=float(server._drain_timeout),
        decide=_decider(request) if request is not None else None,
        said=said,
    )


def _load_fnc(server: AgentServer) -> Callable[[], float] | None:
    fnc = server._load_fnc
    if fnc is None:
        return None
    if len(inspect.signature(fnc).parameters) == 0:
        return fnc  # type: ignore[return-value]
    return lambda: fnc(server)  # type: ignore[call-arg]


def _decider(request_fnc: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[Any]]:
    """The app's handler, given LiveKit's own ``JobRequest``: returns the accept arguments, or
    :class:`Rejected` (None when it answered neither: a reject)."""

    async def decide(job: Any) -> Any:
        from livekit.agents.job import JobRequest

        answer: list[Any] = []

        async def on_accept(arguments: Any) -> None:
            answer.append(arguments)

        async def on_reject(terminate: bool) -> None:
            answer.append(Rejected(terminate))

        await request_fnc(JobRequest(job=job, on_reject=on_reject, on_accept=on_accept))
        return answer[0] if answer else None

    return decide


def ticket_args(folder: Path, url: str) -> Callable[[Launch], list[str]]:
    """The leaf's arguments for a launch: its ticket, written here, and what names the call."""

    def args(launch: Launch) -> list[str]:
        job = launch.job
        accepted = launch.accepted
        if accepted is None:  # assigned without our availability answer (a reconnect)
            from livekit.agents.job import JobAcceptArguments

            accepted = JobAcceptArguments(name="", identity=f"agent-{job.id}", metadata="")
        ticket = agents_ticket.Ticket.of(
            job,
            url=launch.assignment.url or url,
            token=launch.assignment.token,
            worker_id=launch.worker_id,
            accept=accepted,
            received_at=launch.received_at or time.time(),
        )
        path = agents_ticket.write(folder, job.id, ticket)
        caller = job.participant.identity or "-"
        return ["--ticket", str(path), "--job", job.id, "--room", job.room.name, "--caller", caller]

    return args


class Tickets:
    """Where the jobs' tickets are, so each is deleted once its job has ended for good (its leaf
    will not start again), including the tickets of jobs a previous dispatcher started."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._elsewhere: dict[str, Path] = {}

    def adopted(self, job_id: str, args: list[str]) -> None:
        if "--ticket" in args[:-1]:
            self._elsewhere[job_id] = Path(args[args.index("--ticket") + 1])

    def forget(self, job_id: str) -> None:
        path = self._elsewhere.pop(job_id, None) or agents_ticket.path_for(self.folder, job_id)
        path.unlink(missing_ok=True)


__all__ = ["AppOptions", "Tickets", "app_options", "ticket_args"]
