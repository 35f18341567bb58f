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


__all__ = ["JOB_FAILED", "REQUEST_TIMEOUT", "Backoff", "JobRecord", "Launch"]
