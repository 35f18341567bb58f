"""What the LiveKit dispatcher keeps: the reconnect backoff, each job's record, and what a
job's leaf is launched with (see :mod:`otp_agents.voice.dispatch`)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from livekit.protocol import agent as lk


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.25

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before reconnect attempt ``attempt`` (1-based): grows by ``factor`` up to
        ``cap``, then ± ``jitter`` so a fleet that lost its server does not return in step."""
        base = min(self.cap, self.initial * self.factor ** (attempt - 1))
        return max(0.0, base * (1 + (rng or random).uniform(-self.jitter, self.jitter)))


ASSIGNMENT_TIMEOUT = 10.0  # an accepted job not assigned by then gives its slot back (LiveKit: 7.5)
START_TIMEOUT = 300.0  # a job leaf's start, longest: beyond any job_start_timeout a pool sets
AGENT_NAME_ATTRIBUTE = "lk.agent.name"  # the participant attribute LiveKit's worker sets
REQUEST_TIMEOUT = 10.0  # the app's request handler must answer within this (else: unavailable)
JOB_FAILED = "job failed: "  # a leaf's last words when its job, not its process, failed


@dataclass(frozen=True)
class Rejected:
    """The app's request handler rejected the job; ``terminate``: the server should not offer it
    to another worker either."""

    terminate: bool = False


@dataclass(frozen=True)
class Launch:
    """What a job's leaf is started with: the job, its assignment, and how it was accepted
    (LiveKit's ``JobAcceptArguments``: identity, name, metadata, attributes)."""

    job: Any
    assignment: Any
    accepted: Any
    worker_id: str
    received_at: float


@dataclass
class JobRecord:
    id: str
    child: str | None = None
    status: int = lk.JS_PENDING
    failure: str | None = None  # how its child last ended, if badly
    settle: anyio.Event | None = None  # set when a restart follows an exit
    terminate_asked: bool = False  # the server ended it while it was still starting
    accepted: Any = None  # the request handler's answer
    launched: bool = False
    received_at: float = 0.0


FINISHED = (lk.JS_SUCCESS, lk.JS_FAILED, lk.JS_CANCELLED)


def forget_finished(jobs: dict[str, JobRecord], by_child: dict[str, JobRecord], keep: int = 256) -> None:
    """Finished jobs are kept (a repeated assignment must not start one again), but only the
    latest ``keep`` of them."""
    done = [j for j in jobs.values() if j.status in FINISHED]
    for old in done[: max(0, len(done) - keep)]:
        del jobs[old.id]
        if old.child is not None:
            by_child.pop(old.child, None)


async def app_load(load_fnc: Callable[[], float], log: Callable[[str], None]) -> float:
    """The app's ``load_fnc`` (its code may block: run on a thread), 0 to 1; a failure is full."""
    try:
        own = float(await anyio.to_thread.run_sync(load_fnc))
    except Exception as exc:  # the app's code: a failure means full, not a dead dispatcher
        log(f"the app's load_fnc raised {type(exc).__name__}: {exc}; taken as full")
        return 1.0
    return min(1.0, max(0.0, own)) if own == own else 1.0


def how_it_ended(row: dict[str, Any]) -> tuple[str, int]:
    """(how, the job's status) from a ``child_exited`` or ``start_failed`` event."""
    if row.get("kind") == "start_failed":
        return f"a failed restart ({row.get('detail', '')})", lk.JS_FAILED
    if row.get("code") == 0 and str(row.get("detail") or "").startswith(JOB_FAILED):
        return str(row["detail"]), lk.JS_FAILED
    if row.get("code") == 0:
        return "exit code 0", lk.JS_SUCCESS
    how = f"signal {row['signal']}" if row.get("signal") else f"exit code {row.get('code')}"
    return how, lk.JS_FAILED


def error_of(how: str) -> str:
    """What the server is told of a failed job."""
    return how if how.startswith(JOB_FAILED) else f"the agent ended with {how}"


def running_jobs(status: dict[str, Any] | None) -> list[tuple[str, str, list[str]]]:
    """(job id, child path, args) of the children a jobs' supervisor's status shows running,
    found by the ``--job ID`` they were started with."""
    found = []
    rows = list((status or {}).get("children", []))
    while rows:  # the supervisor's own row, then its children's
        row = rows.pop(0)
        rows.extend(row.get("children", []))
        args = [str(a) for a in row.get("args") or []]
        if "--job" in args[:-1] and row.get("status") in ("running", "starting", "restarting"):
            found.append((args[args.index("--job") + 1], str(row["path"]), args))
    return found


__all__ = [
    "JOB_FAILED",
    "REQUEST_TIMEOUT",
    "Backoff",
    "JobRecord",
    "Launch",
    "error_of",
    "forget_finished",
    "how_it_ended",
    "running_jobs",
]
