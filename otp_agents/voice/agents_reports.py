"""A hosted job's measurements, as worker reports (the supervisor's metrics catalogue): the same
names the project's own voice leaves send, so one dashboard covers both.

From the app's session (LiveKit's events, on the job's loop):

- ``voice_turn_latency_seconds`` and ``voice_turns``: each reply's end-to-end latency, from the
  end of the caller's speech to the start of the reply, as LiveKit measures it
  (``ChatMessage.metrics["e2e_latency"]``);
- ``resumed_listening``: a resumed call's session is listening to the caller again, with the call
  restored; the supervisor times it from the old process's death (the resume gap).

The leaf itself reports how a job ended (``agent_jobs_ended``, ``agent_job_failed`` with why).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import anyio

from otp_agents.voice.agents_job import CODE_RAISED, CRASHED, NO_EXIT
from otp_agents.worker import Worker

log = logging.getLogger("otp_agents.reports")

Post = Callable[..., None]  # post(name, value, **labels), from any thread


class Reports:
    """Worker reports posted from the job's thread, sent in order from the worker's loop."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._loop = asyncio.get_running_loop()
        self._queue: list[tuple[str, float, dict[str, str]]] = []
        self._wake = anyio.Event()

    def post(self, name: str, value: float, **labels: str) -> None:
        self._loop.call_soon_threadsafe(self._put, (name, value, labels))

    def _put(self, item: tuple[str, float, dict[str, str]]) -> None:
        if len(self._queue) < 10_000:  # a stalled channel must not grow this without bound
            self._queue.append(item)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            await self.flush()

    async def flush(self) -> None:
        while self._queue:
            name, value, labels = self._queue.pop(0)
            await self.worker.report(name, value, **labels)


class SessionMetrics:
    """Follows each session the app starts in this process (hooks on ``AgentSession.start``)."""

    def __init__(self, post: Post, resumed: Callable[[], bool]) -> None:
        self.post = post
        self.resumed = resumed

    def install(self) -> None:
        from livekit.agents import AgentSession

        start = AgentSession.start
        metrics = self

        async def measured_start(session: Any, *args: Any, **kwargs: Any) -> Any:
            result = await start(session, *args, **kwargs)
            metrics._follow(session)
            return result

        session_class: Any = AgentSession
        session_class.start = measured_start

    def _follow(self, session: Any) -> None:
        waiting = self.resumed()  # for the first moment it listens again

        def listening() -> None:
            nonlocal waiting
            if waiting:
                waiting = False
                self.post("resumed_listening", 1.0)

        def state(event: Any) -> None:
            if str(getattr(event, "new_state", "")) == "listening":
                listening()

        def item(event: Any) -> None:
            message = getattr(event, "item", None)
            if getattr(message, "role", None) != "assistant":
                return
            latency = (getattr(message, "metrics", None) or {}).get("e2e_latency")
            if isinstance(latency, int | float) and latency >= 0:
                self.post("voice_turn_latency_seconds", float(latency))
            self.post("voice_turns", 1.0)

        session.on("agent_state_changed", state)
        session.on("conversation_item_added", item)
        if getattr(session, "agent_state", None) == "listening":
            listening()


def failure_reason(provider_error: str | None, reason: str) -> str:
    """A failed job's reason, from a bounded set (a metric label)."""
    if provider_error:
        return "provider"
    if reason == CRASHED:
        return "entrypoint"
    if reason == NO_EXIT:
        return "no_exit"
    if reason.startswith(CODE_RAISED):
        return "job_code"
    return "other"


__all__ = ["Post", "Reports", "SessionMetrics", "failure_reason"]
