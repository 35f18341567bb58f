"""What the LiveKit dispatcher keeps: the reconnect backoff, each job's record, and what a
job's leaf is launched with (see :mod:`otp_agents.voice.dispatch`)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import anyio
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


REQUEST_TIMEOUT = 10.0  # the app's request handler must answer within this (else: unavailable)
JOB_FAILED = "job failed: "  # a leaf's last words when its job, not its process, failed


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
    "forget_finished",
    "running_jobs",
]
