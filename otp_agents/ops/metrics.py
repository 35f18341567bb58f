"""Prometheus metrics and health endpoints, served from the supervisor's own event loop.

``GET /metrics`` is the Prometheus text exposition (prometheus-client's registry and encoder);
``GET /healthz`` answers 200 while the event loop runs (liveness); ``GET /readyz`` answers 200 once
the tree has started and while it is not stopping (readiness). The HTTP server is a small anyio
listener on the loop itself, so scrapes read the tree's state without threads or locks.

Label cardinality stays bounded: children of a ``simple_one_for_one`` supervisor are labelled by
their template's path (``root/rooms/leaf``), not by instance (``root/rooms/leaf-4711``), and
worker reports feed metrics only for the fixed catalogue of names in :meth:`Metrics.on_report`
(any other name is an event, nothing more).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import socket
import time
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector

from otp_agents.events import Event, Kind
from otp_agents.ops.metrics_tree import TreeCollector
from otp_agents.redact import REDACTOR
from otp_agents.spec.model import Strategy
from otp_agents.tree.supervisor import Supervisor
from otp_agents.wire.messages import Report

if TYPE_CHECKING:
    from otp_agents.runtime.tree import Tree

log = logging.getLogger("otp_agents")

_DYNAMIC = re.compile(r"-\d+$")
_LABEL_CHARS = 32  # report label values are cut to this for metrics
_LABEL_SETS = 100  # distinct provider/kind pairs kept apart; later ones are counted as "other"


class Metrics:
    """Counters fed by the event bus; gauges read from the tree at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tree: Tree | None = None
        self._dynamic_parents: set[str] = set()
        self._dispatchers: set[str] = set()
        r = self.registry
        self.restarts = Counter(
            "otp_agents_restarts", "Child restarts, by child and reason.", ["path", "reason"], registry=r
        )
        self.exits = Counter(
            "otp_agents_child_exits",
            "Child exits the supervisor did not ask for.",
            ["path", "reason"],
            registry=r,
        )
        self.start_seconds = Histogram(
            "otp_agents_start_duration_seconds",
            "From spawn to started (spawned for commands, Ready for protocol workers).",
            ["path"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.rtt_seconds = Histogram(
            "otp_agents_ping_rtt_seconds",
            "Heartbeat round-trip time of protocol workers.",
            ["path"],
            buckets=(
                0.0001,
                0.00025,
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
            ),
            registry=r,
        )
        self.dumps = Counter("otp_agents_stack_dumps", "Stack dumps taken.", ["path", "reason"], registry=r)
        self.exhausted = Counter(
            "otp_agents_intensity_exhausted",
            "Times a supervisor reached its restart intensity and gave up.",
            ["supervisor"],
            registry=r,
        )
        self.health_kills = Counter(
            "otp_agents_health_kills", "Children killed for health reasons.", ["path", "reason"], registry=r
        )
        self.checkpoints = Counter(
            "otp_agents_checkpoints", "Checkpoints kept, by child.", ["path"], registry=r
        )
        self.checkpoints_dropped = Counter(
            "otp_agents_checkpoints_dropped",
            "Checkpoints refused (too_large, disabled) or unreadable on disk (bad_crc, ...).",
            ["path", "reason"],
            registry=r,
        )
        self.resumes = Counter(
            "otp_agents_resumes", "Starts handed a checkpoint to resume from.", ["path"], registry=r
        )
        # The catalogue of worker reports (see on_report).
        self.turn_latency = Histogram(
            "otp_agents_voice_turn_latency_seconds",
            "Voice agents: from the end of the user's speech to the start of the reply.",
            ["path"],
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
            registry=r,
        )
        self.provider_errors = Counter(
            "otp_agents_voice_provider_errors",
            "Voice agents: errors of their providers (STT, LLM, TTS), by provider and kind.",
            ["path", "provider", "kind"],
            registry=r,
        )
        self.dispatcher_connected = Gauge(
            "otp_agents_dispatcher_connected",
            "LiveKit dispatchers: 1 while registered with the server, else 0 (0 once it exits).",
            ["path"],
            registry=r,
        )
        self.dispatcher_load = Gauge(
            "otp_agents_dispatcher_load",
            "LiveKit dispatchers: running jobs / max_jobs (the load it reports to the server).",
            ["path"],
            registry=r,
        )
        self.turns = Counter(
            "otp_agents_voice_turns", "Voice agents: conversation turns.", ["path"], registry=r
        )
        self.agent_jobs = Counter(
            "otp_agents_agent_jobs",
            "LiveKit Agents jobs that ended, by pool and outcome (success, failed: the job, not "
            "its process; a process that died is a restart instead).",
            ["path", "outcome"],
            registry=r,
        )
        self.job_failures = Counter(
            "otp_agents_agent_job_failures",
            "LiveKit Agents jobs that failed (the job, not its process), by pool and why: "
            "provider (an STT/LLM/TTS error closed the session), entrypoint (the app raised), "
            "no_exit (the job ended without LiveKit's exit message), job_code, other.",
            ["path", "reason"],
            registry=r,
        )
        self.resume_gap = Histogram(
            "otp_agents_resume_gap_seconds",
            "Calls resumed after their process died: from the exit to the restarted process "
            "listening to the caller again with the call restored.",
            ["path"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=r,
        )
        self._down: dict[str, float] = {}  # path -> when it last died (wall clock), for the gap
        self._label_sets: set[tuple[str, str]] = set()
        ProcessCollector(registry=r)
        r.register(TreeCollector(lambda: self.tree, self.label))

    def attach(self, tree: Tree) -> None:
        self.tree = tree
        tree.bus.listen(self.on_event)

        def dynamic(sup: Supervisor) -> None:
            if sup.spec.strategy is Strategy.SIMPLE_ONE_FOR_ONE:
                self._dynamic_parents.add(sup.path)
            for slot in sup.slots.values():
                if isinstance(slot.instance, Supervisor):
                    dynamic(slot.instance)

        dynamic(tree.root)
        tree.host.on_rtt = self.observe_rtt
        tree.host.on_report = self.on_report

    def label(self, path: str) -> str:
        """A child's path as a bounded label: dynamic instances share their template's path."""
        parent, _, _ = path.rpartition("/")
        if parent in self._dynamic_parents:
            return _DYNAMIC.sub("", path)
        return path

    def on_event(self, event: Event) -> None:
        kind = event.kind
        if kind is Kind.SUPERVISOR_STARTED and event.detail == Strategy.SIMPLE_ONE_FOR_ONE.value:
            self._dynamic_parents.add(event.path)
        elif kind is Kind.CHILD_STARTED and event.value is not None:
            self.start_seconds.labels(self.label(event.path)).observe(event.value)
        elif kind is Kind.CHILD_EXITED:
            self.exits.labels(self.label(event.path), event.reason or "crash").inc()
            if not event.requested:
                self._down.pop(event.path, None)
                self._down[event.path] = event.ts
                if len(self._down) > _DOWN_KEPT:  # never resumed (a plain restart): bounded
                    del self._down[next(iter(self._down))]
        elif kind in (Kind.RESTARTING, Kind.RECYCLED) and event.cause is not None:
            self.restarts.labels(self.label(event.path), event.cause).inc()  # the rules' Cause
        elif kind is Kind.DUMP_TAKEN:
            self.dumps.labels(self.label(event.path), event.reason or "unknown").inc()
        elif kind is Kind.INTENSITY_EXCEEDED:
            self.exhausted.labels(self.label(event.path)).inc()
        elif kind is Kind.HEALTH_KILL:
            self.health_kills.labels(self.label(event.path), event.reason or "unknown").inc()
        elif kind is Kind.CHECKPOINT and event.value:  # value 0: cleared, not a checkpoint
            self.checkpoints.labels(self.label(event.path)).inc()
        elif kind is Kind.CHECKPOINT_DROPPED:
            self.checkpoints_dropped.labels(self.label(event.path), event.reason or "unknown").inc()
        elif kind is Kind.RESUMED:
            self.resumes.labels(self.label(event.path)).inc()
        if kind in (Kind.CHILD_EXITED, Kind.CHILD_TERMINATED) and event.path in self._dispatchers:
            self.dispatcher_connected.labels(self.label(event.path)).set(0.0)  # it cannot be connected

    def observe_rtt(self, path: str, rtt: float) -> None:
        self.rtt_seconds.labels(self.label(path)).observe(rtt)

    def on_report(self, path: str, report: Report) -> None:
        """A worker's measurement: known names feed their metric, others only the event."""
        value = report.value
        if not math.isfinite(value):
            return
        name = report.name
        if name == "voice_turn_latency_seconds" and value >= 0:
            self.turn_latency.labels(self.label(path)).observe(value)
        elif name == "dispatcher_connected":
            self._dispatchers.add(path)
            self.dispatcher_connected.labels(self.label(path)).set(1.0 if value else 0.0)
        elif name == "dispatcher_load" and 0 <= value <= 1:
            self.dispatcher_load.labels(self.label(path)).set(value)
        elif name == "agent_jobs_ended" and value >= 0:
            outcome = report.labels.get("outcome", "")
            self.agent_jobs.labels(self.label(path), outcome if outcome in _OUTCOMES else "other").inc(value)
        elif name == "agent_job_failed" and value >= 0:
            reason = report.labels.get("reason", "")
            self.job_failures.labels(self.label(path), reason if reason in _FAILURES else "other").inc(value)
        elif name == "resumed_listening":
            died = self._down.pop(path, None)
            if died is not None and 0 <= (gap := time.time() - died) < 3600:
                self.resume_gap.labels(self.label(path)).observe(gap)
        elif name == "voice_turns" and value >= 0:
            self.turns.labels(self.label(path)).inc(value)
        elif name == "voice_provider_errors" and value >= 0:
            provider = REDACTOR.scrub(report.labels.get("provider", ""))[:_LABEL_CHARS]
            kind = REDACTOR.scrub(report.labels.get("kind", ""))[:_LABEL_CHARS]
            if (provider, kind) not in self._label_sets:
                if len(self._label_sets) >= _LABEL_SETS:  # a worker inventing labels: bounded
                    provider, kind = "other", "other"
                else:
                    self._label_sets.add((provider, kind))
            self.provider_errors.labels(self.label(path), provider, kind).inc(value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


_OUTCOMES = ("success", "failed")
_FAILURES = ("provider", "entrypoint", "no_exit", "job_code")
_DOWN_KEPT = 4096


# -- HTTP ----------------------------------------------------------------------------------------


async def serve(metrics: Metrics, sock: socket.socket, ready: anyio.Event, stopping: anyio.Event) -> None:
    """Serve /metrics, /healthz and /readyz on ``sock``, a listening socket bound before the tree
    started (``preflight.bind_listener``)."""
    host, port = sock.getsockname()[:2]
    listener = await anyio.abc.SocketListener.from_socket(sock)
    log.info("metrics and health endpoints on http://%s:%d/metrics", host, port)
    async with listener:
        await listener.serve(lambda stream: _respond(stream, metrics, ready, stopping))


async def _respond(
    stream: anyio.abc.SocketStream, metrics: Metrics, ready: anyio.Event, stopping: anyio.Event
) -> None:
    async with stream:
        request = b""
        with anyio.move_on_after(5):
            while b"\r\n\r\n" not in request and len(request) < 8192:
                try:
                    request += await stream.receive(4096)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
        line = request.split(b"\r\n", 1)[0].decode("latin-1", "replace").split()
        method, target = (line[0], line[1]) if len(line) >= 2 else ("", "")
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
        elif path == "/metrics":
            status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, metrics.exposition()
        elif path == "/healthz":
            status, ctype, body = "200 OK", "text/plain", b"ok\n"
        elif path == "/readyz":
            ok = ready.is_set() and not stopping.is_set()
            status, ctype, body = (
                ("200 OK" if ok else "503 Service Unavailable"),
                "text/plain",
                (b"ready\n" if ok else b"not ready\n"),
            )
        else:
            status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await stream.send(head + (body if method != "HEAD" else b""))
