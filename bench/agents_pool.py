#!/usr/bin/env python3
"""One LiveKit Agents app, two ways to run its jobs, side by side in one run.

* **otp-agents app pool**: a tree child ``app = "bench/apps/held_agent.py"``, which expands to a
  zygote (imports the app and runs its prewarm once, forks ``idle`` spares ahead of need), a
  ``jobs`` simple_one_for_one supervisor (one leaf per job, forked from the zygote) and a
  dispatcher (registers with the LiveKit server, accepts jobs, starts their leaves).
* **LiveKit worker**: LiveKit Agents' own worker with its production defaults (a pool of idle
  job processes, ``num_idle_processes`` = CPU count, each forked from LiveKit's forkserver and
  running the app's prewarm before it is needed), hosted by ``workers/agents_host.py APP
  --server`` (``AgentServer.run()``, no ``--idle-processes``) as the one leaf of a tree.

Why: a voice call waits for its agent. What it waits for, from the server's assignment until the
app's code runs, and what each call costs in memory while it is held, decide how many calls a
machine serves and how a burst of calls is met.

Both take their jobs from ``tests/livekit_standin.py``: LiveKit's agent-worker protocol over a
WebSocket on loopback, **not** a LiveKit server (no rooms, no media). So the app,
``bench/apps/held_agent.py``, never connects to its room: first thing in its entrypoint it writes
``time.time()`` and its pid to ``$BENCH_MARKS_DIR/<job id>``, then holds the job (sleeps) until
the tree is stopped. Its prewarm loads the Silero VAD, as real apps do.

Measured, for each system, on a fresh tree per phase:

* **latency**, per job: from just before the availability request (``AvailabilityRequest``, the
  stand-in then sends the ``JobAssignment`` when the worker says it is available) to the
  entrypoint's mark (wall clock, one machine). (i) *sequential*: N jobs one at a time, each once
  the previous one runs and the tree is quiet again (so each finds a warm pool); (ii) *burst*: N
  jobs offered at once, more than LiveKit's idle pool (CPU count). A worker may answer "not
  available": LiveKit's own worker does so in a burst (it reserves a share of its load threshold
  per job not yet started). The stand-in then offers the job again after ``--retry`` seconds (a
  LiveKit server would try another worker; here there is one), and the latency counts from the
  first offer; the re-offers are reported.
* **memory**, PSS from ``/proc/PID/smaps_rollup`` (pages shared by k processes count 1/k in
  each, so a fork's PSS falls as more forks share its pages), per process by role: idle job
  processes (the zygote's spares; LiveKit's idle pool) once the tree has started and is quiet;
  active job processes (the pids in the marks) with N jobs held; and the whole tree (the
  ``otp-agents run`` process and every descendant) in both states.

Roles come from the tree's events (``child_started``: the zygote, the dispatcher, the job leaves,
the host leaf) and the process tree: the zygote's spares are adopted by the supervisor (a child
subreaper) and carry the zygote's command line; LiveKit's job processes are the children of its
forkserver, under the host leaf. "Quiet" means: the same processes, every idle job process
there, and under 20 % of one core of CPU between them (plus 2 % per held job), for three 0.5 s
windows in a row. For the pool, the JSON also splits each job's latency at its leaf's
``child_started`` event (the leaf said Ready to its supervisor).

    .venv/bin/python bench/agents_pool.py [--jobs N] [--quick] [--retry S] [--json PATH]

Every wait is bounded and fails with what it waited for (and the tree's stderr tail). Each tree
gets SIGTERM (then SIGKILL after a bound); afterwards any process seen in it that is still there
(same pid and start time) gets SIGKILL. Temp dirs are removed (``--keep`` keeps them).
Everything listens on and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from livekit.protocol import agent as lk
from livekit.protocol import models
from restart_latency import machine as base_machine
from restart_latency import start_time, summary_ms

from otp_agents.health.memory import precise_bytes, tree_pids

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the stand-in lives with the tests

from tests.livekit_standin import KEY, SECRET, StandIn, serving  # noqa: E402

APP = REPO / "bench" / "apps" / "held_agent.py"
POOL = "otp-agents app pool"
LIVEKIT = "LiveKit worker"
SYSTEMS = (POOL, LIVEKIT)
POOL_IDLE = 2  # the pool's spares (the tree's ``idle``)
LOAD_THRESHOLD = 0.7  # LiveKit's production default, which the pool's dispatcher takes from the app

# seconds; bounds for failures, never speed claims
START_BOUND = 90.0  # tree start until the worker registered with the stand-in
SETTLE_BOUND = 90.0  # until the tree is quiet (imports, prewarms of the idle processes)
JOB_BOUND = 120.0  # an offer until the worker took it; the offers until the entrypoints ran
STOP_BOUND = 60.0  # SIGTERM until the tree has exited (the held jobs are cancelled at the deadlines)
# Quiet: the same pids, every idle job process there, and under QUIET_CPU of one core (plus
# QUIET_CPU_PER_JOB per held job: LiveKit's worker pings its job processes and samples its load)
# for QUIET_WINDOWS windows of WINDOW seconds in a row. A job process starting (imports, the
# prewarm's VAD) uses a core.
WINDOW = 0.5
QUIET_CPU = 0.2
QUIET_CPU_PER_JOB = 0.02
QUIET_WINDOWS = 3
MIB = 1024 * 1024


# -- the trees ------------------------------------------------------------------------------------


def _s(value: str) -> str:
    return json.dumps(value)  # a TOML basic string


def tree_toml(system: str, stand_in: StandIn, marks: Path, max_jobs: int) -> str:
    env = (
        f"env = {{ LIVEKIT_URL = {_s(stand_in.url)}, LIVEKIT_API_KEY = {_s(KEY)}, "
        f"LIVEKIT_API_SECRET = {_s(SECRET)}, BENCH_MARKS_DIR = {_s(str(marks))} }}"
    )
    head = ['id = "root"', "intensity = 3", "period = 600", "", "[[children]]"]
    if system == POOL:
        body = [
            'id = "agents"',
            f"app = {_s(str(APP))}",
            f"max_jobs = {max_jobs}",
            f"idle = {POOL_IDLE}",
            "drain = 5",
            env,
        ]
    else:
        body = [
            'id = "agent"',
            'module = "workers.agents_host:main"',
            f"args = {json.dumps([str(APP), '--server'])}",
            "start_timeout = 60",
            "shutdown = 10",
            f"cwd = {_s(str(REPO))}",
            env,
        ]
    return "\n".join([*head, *body]) + "\n"


def pool_max_jobs(jobs: int) -> int:
    """The pool's dispatcher reports load = running jobs / max_jobs and takes a job while that is
    under the app's load threshold (0.7): enough room for every job of the benchmark."""
    return max(8, math.floor((jobs - 1) / LOAD_THRESHOLD) + 1)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


@dataclass
class Layout:
    """The tree's processes by role (pids)."""

    roles: dict[str, list[int]]

    def of(self, role: str) -> list[int]:
        return self.roles.get(role, [])


class Run:
    """One ``otp-agents run`` of one system's tree, against one stand-in."""

    def __init__(self, system: str, tmp: Path, stand_in: StandIn, max_jobs: int) -> None:
        self.system = system
        self.tmp = tmp
        self.stand_in = stand_in
        self.marks = tmp / "marks"
        self.marks.mkdir(parents=True)
        self.tree = tmp / "tree.toml"
        self.tree.write_text(tree_toml(system, stand_in, self.marks, max_jobs))
        self.events_file = tmp / "events.jsonl"
        self.log = tmp / "stderr.log"
        self.seen: dict[int, int | None] = {}  # every pid seen in the tree: its start time
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.leftovers: list[int] = []  # seen in the tree, still there after the stop: SIGKILLed

    def start(self) -> None:
        argv = [sys.executable, "-m", "otp_agents.cli", "run", str(self.tree)]
        argv += ["--state-dir", str(self.tmp / "state"), "--events", str(self.events_file)]
        self.started_at = time.time()
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=err, stderr=err)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self, what: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.system}: {what}: otp-agents exited ({self.proc.returncode}):\n{self.tail()}"
            )

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def events(self) -> list[dict[str, Any]]:
        try:
            lines = self.events_file.read_text().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def children_started(self) -> dict[str, int]:
        """Each child path's latest pid, from the events."""
        return {e["path"]: e["pid"] for e in self.events() if e["kind"] == "child_started" and "pid" in e}

    def pids(self) -> list[int]:
        pids = tree_pids(self.pid)
        for pid in pids:
            if pid not in self.seen:
                self.seen[pid] = start_time(pid)
        return pids

    def layout(self, marked: set[int]) -> Layout:
        pids = self.pids()
        started = self.children_started()
        roles: dict[str, list[int]] = {}

        def put(role: str, pid: int) -> None:
            roles.setdefault(role, []).append(pid)

        if self.system == POOL:
            zygote = started.get("root/agents/zygote")
            dispatcher = started.get("root/agents/dispatcher")
            leaves = {pid for path, pid in started.items() if path.startswith("root/agents/jobs/")}
            for pid in pids:
                cmd = _cmdline(pid)
                if "otp_agents.cli" in cmd:
                    put("supervisor (otp-agents run, orphan guard)", pid)
                elif pid == zygote:
                    put("pool parent (zygote)", pid)
                elif pid == dispatcher:
                    put("dispatcher", pid)
                elif pid in marked:
                    put("active job", pid)
                elif pid in leaves:
                    put("job leaf, no mark", pid)
                elif "otp_agents.zygote" in cmd:
                    put("idle job (spare)", pid)
                else:
                    put("other", pid)
        else:
            host = started.get("root/agent")
            forkservers = {
                pid for pid in pids if _ppid(pid) == host and "multiprocessing.forkserver" in _cmdline(pid)
            }
            for pid in pids:
                cmd = _cmdline(pid)
                if "otp_agents.cli" in cmd:
                    put("supervisor (otp-agents run, orphan guard)", pid)
                elif pid == host:
                    put("host leaf (LiveKit worker)", pid)
                elif pid in forkservers:
                    put("pool parent (forkserver)", pid)
                elif "multiprocessing.resource_tracker" in cmd:
                    put("resource tracker", pid)
                elif pid in marked:
                    put("active job", pid)
                elif _ppid(pid) in forkservers:
                    put("idle job", pid)
                else:
                    put("other", pid)
        return Layout(roles)

    def idle_jobs(self, layout: Layout) -> list[int]:
        return layout.of("idle job (spare)") + layout.of("idle job")

    async def registered(self) -> float:
        """Until the worker registered with the stand-in; seconds since the start."""
        deadline = time.monotonic() + START_BOUND
        while not self.stand_in.of("register"):
            self.check_alive("waiting for the worker to register")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.system}: no registration with the stand-in in {START_BOUND:g}s:\n{self.tail()}"
                )
            await anyio.sleep(0.02)
        return time.time() - self.started_at

    async def settle(self, marked: set[int], expect: Callable[[Layout], str | None] | None = None) -> Layout:
        """Until the tree is quiet (and ``expect`` has nothing to say); its layout then."""
        deadline = time.monotonic() + SETTLE_BOUND
        quiet = 0
        last: tuple[list[int], float] | None = None
        why = "not yet sampled"
        while True:
            self.check_alive("waiting for the tree to settle")
            pids = sorted(self.pids())
            cpu = _cpu_seconds(pids)
            limit = (QUIET_CPU + QUIET_CPU_PER_JOB * len(marked)) * WINDOW
            if last is not None and last[0] == pids and cpu - last[1] < limit:
                layout = self.layout(marked)
                problem = expect(layout) if expect else None
                if problem is None:
                    quiet += 1
                    if quiet >= QUIET_WINDOWS:
                        return layout
                else:
                    quiet, why = 0, problem
            else:
                quiet = 0
                if last is not None:
                    why = f"{len(pids)} processes, {(cpu - last[1]) / WINDOW:.0%} of a core"
            last = (pids, cpu)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.system}: the tree did not settle in {SETTLE_BOUND:g}s ({why})")
            await anyio.sleep(WINDOW)

    def stop(self) -> float:
        """SIGTERM, wait (bounded), SIGKILL; then SIGKILL what is left of what we saw in the tree
        (same pid and start time). Seconds the stop took."""
        if self.proc is None:
            return 0.0
        t0 = time.monotonic()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.pids()
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_BOUND)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10)
        took = time.monotonic() - t0
        self.leftovers = [
            pid for pid, born in self.seen.items() if born is not None and start_time(pid) == born
        ]
        for pid in self.leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return took

    def problems(self) -> list[str]:
        """Error lines in the tree's stderr (LiveKit's and otp-agents')."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        keys = (" ERROR ", "ERROR ", "Traceback", "CRITICAL", "exception")
        return [line for line in text.splitlines() if any(k in line for k in keys)]


# -- jobs ----------------------------------------------------------------------------------------


@dataclass
class Offer:
    job: str
    first: float = 0.0  # time.time() just before the first availability request
    offers: int = 0
    assigned: float = 0.0
    mark: float = 0.0  # the entrypoint's time.time()
    pid: int = 0
    leaf_started: float = 0.0  # the pool: the ``child_started`` event of the job's leaf


async def _ask(stand_in: StandIn, job: str) -> None:
    req = lk.Job(id=job, type=lk.JT_ROOM, room=models.Room(name=f"room-{job}"))
    await stand_in._send(lk.ServerMessage(availability=lk.AvailabilityRequest(job=req)))


async def _assign(stand_in: StandIn, job: str) -> None:
    req = lk.Job(id=job, type=lk.JT_ROOM, room=models.Room(name=f"room-{job}"))
    await stand_in._send(lk.ServerMessage(assignment=lk.JobAssignment(job=req, url=stand_in.url, token="t")))


async def dispatch(stand_in: StandIn, jobs: list[str], retry: float) -> dict[str, Offer]:
    """Offer ``jobs`` at once (the stand-in's ``offer``, with its answers matched by job id, so
    that offers can overlap); assign each one its worker accepts; offer a refused one again
    after ``retry`` seconds."""
    offers = {job: Offer(job) for job in jobs}
    seen = len(stand_in.of("availability"))
    for job in jobs:
        offers[job].first = time.time()
        offers[job].offers = 1
        await _ask(stand_in, job)
    pending, again = set(jobs), dict[str, float]()
    deadline = time.monotonic() + JOB_BOUND
    while pending:
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"the worker took none of {sorted(pending)} within {JOB_BOUND:g}s")
        for job, at in list(again.items()):
            if at <= now:
                del again[job]
                offers[job].offers += 1
                await _ask(stand_in, job)
        wait = min([at - now for at in again.values()] + [deadline - now])
        answers: list[Any] = []
        with anyio.move_on_after(max(wait, 0.0)):
            answers = await stand_in.wait(lambda: stand_in.of("availability")[seen:], JOB_BOUND)  # noqa: B023
        seen += len(answers)
        for answer in answers:
            job = answer.job_id
            if job not in pending or job in again:
                continue
            if answer.available:
                await _assign(stand_in, job)
                offers[job].assigned = time.time()
                pending.discard(job)
            else:
                again[job] = time.monotonic() + retry
    return offers


async def entrypoints_ran(run: Run, offers: dict[str, Offer]) -> None:
    """Until every offered job's entrypoint wrote its mark."""
    deadline = time.monotonic() + JOB_BOUND
    waiting = set(offers)
    while waiting:
        for job in list(waiting):
            with contextlib.suppress(FileNotFoundError):
                when, pid = (run.marks / job).read_text().split()
                offers[job].mark, offers[job].pid = float(when), int(pid)
                waiting.discard(job)
        if not waiting:
            break
        run.check_alive(f"waiting for the entrypoints of {sorted(waiting)}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{run.system}: entrypoints of {sorted(waiting)} not run within {JOB_BOUND:g}s:\n{run.tail()}"
            )
        await anyio.sleep(0.005)


# -- memory --------------------------------------------------------------------------------------


def memory(run: Run, layout: Layout) -> dict[str, Any]:
    """PSS (and USS) per process by role, and the whole tree's PSS."""
    roles: dict[str, list[dict[str, float | int]]] = {}
    total = 0.0
    for role, pids in layout.roles.items():
        for pid in pids:
            pss = precise_bytes(pid, "pss") / MIB
            uss = precise_bytes(pid, "uss") / MIB
            total += pss
            roles.setdefault(role, []).append(
                {"pid": pid, "pss_mib": round(pss, 1), "uss_mib": round(uss, 1)}
            )
    return {
        "roles": roles,
        "total_pss_mib": round(total, 1),
        "processes": sum(len(p) for p in layout.roles.values()),
    }


def role_pss(mem: dict[str, Any], role_prefix: str) -> list[float]:
    return [
        float(p["pss_mib"])
        for role, procs in mem["roles"].items()
        if role.startswith(role_prefix)
        for p in procs
    ]


# -- the phases ----------------------------------------------------------------------------------


@dataclass
class Phase:
    system: str
    kind: str  # "sequential" | "burst"
    registered_s: float = 0.0
    settled_s: float = 0.0
    offers: list[Offer] = field(default_factory=list)
    idle: dict[str, Any] = field(default_factory=dict)
    active: dict[str, Any] = field(default_factory=dict)
    stop_s: float = 0.0
    leftovers: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def latencies(self) -> list[float]:
        return [o.mark - o.first for o in self.offers]

    def summary(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "kind": self.kind,
            "registered_s": round(self.registered_s, 3),
            "settled_s": round(self.settled_s, 3),
            "latency": summary_ms(self.latencies()) if self.offers else None,
            "jobs": [
                {
                    "job": o.job,
                    "latency_ms": round((o.mark - o.first) * 1e3, 2),
                    "assigned_ms": round((o.assigned - o.first) * 1e3, 2),
                    "offers": o.offers,
                    "pid": o.pid,
                    "leaf_started_ms": round((o.leaf_started - o.first) * 1e3, 2) if o.leaf_started else None,
                }
                for o in self.offers
            ],
            "refused_offers": sum(o.offers - 1 for o in self.offers),
            "idle_memory": self.idle,
            "active_memory": self.active,
            "stop_s": round(self.stop_s, 2),
            "leftover_pids_killed": self.leftovers,
            "stderr_problems": self.problems[:20],
            "stderr_problem_count": len(self.problems),
        }


def expect_idle(run: Run) -> Callable[[Layout], str | None]:
    want = POOL_IDLE if run.system == POOL else livekit_idle_default()

    def check(layout: Layout) -> str | None:
        have = len(run.idle_jobs(layout))
        return None if have >= want else f"{have} of {want} idle job processes"

    return check


def livekit_idle_default() -> int:
    """LiveKit's production ``num_idle_processes``: its CPU monitor's count, rounded up."""
    from livekit.agents.utils.hw import get_cpu_monitor

    return math.ceil(get_cpu_monitor().cpu_count())


async def run_phase(
    system: str, kind: str, jobs: int, max_jobs: int, retry: float, keep: bool, log: Callable[[str], None]
) -> Phase:
    phase = Phase(system, kind)
    tmp = Path(tempfile.mkdtemp(prefix=f"agents-pool-{'pool' if system == POOL else 'lk'}-{kind}-"))
    run: Run | None = None
    try:
        async with serving() as stand_in:
            run = Run(system, tmp, stand_in, max_jobs)
            try:
                run.start()
                phase.registered_s = await run.registered()
                layout = await run.settle(set(), expect_idle(run))
                phase.settled_s = time.time() - run.started_at
                phase.idle = memory(run, layout)
                log(
                    f"  {system}, {kind}: registered {phase.registered_s:.2f}s, quiet {phase.settled_s:.2f}s "
                    f"after start; {len(run.idle_jobs(layout))} idle job processes"
                )
                names = [f"{kind}-{i + 1}" for i in range(jobs)]
                marked: set[int] = set()
                if kind == "sequential":
                    for i, name in enumerate(names):
                        if i:
                            await run.settle(marked, expect_idle(run))
                        offers = await dispatch(stand_in, [name], retry)
                        await entrypoints_ran(run, offers)
                        phase.offers.append(offers[name])
                        marked.add(offers[name].pid)
                        log(f"    {name}: {(offers[name].mark - offers[name].first) * 1e3:.1f} ms")
                else:
                    offers = await dispatch(stand_in, names, retry)
                    await entrypoints_ran(run, offers)
                    phase.offers = [offers[n] for n in names]
                    marked = {o.pid for o in phase.offers}
                    lat = ", ".join(f"{(o.mark - o.first) * 1e3:.0f}" for o in phase.offers)
                    log(f"    burst of {jobs}: {lat} ms; offers {sum(o.offers for o in phase.offers)}")
                layout = await run.settle(marked, expect_idle(run))
                phase.active = memory(run, layout)
                started = {
                    e["pid"]: e["ts"] for e in run.events() if e["kind"] == "child_started" and "pid" in e
                }
                for o in phase.offers:
                    o.leaf_started = started.get(o.pid, 0.0)
                if len(layout.of("active job")) != jobs:
                    raise RuntimeError(
                        f"{system}: {len(layout.of('active job'))} active job processes for {jobs} jobs: "
                        f"{layout.roles}"
                    )
            finally:
                phase.stop_s = run.stop()
                phase.leftovers = run.leftovers
                phase.problems = run.problems()
                log(f"  {system}, {kind}: stopped in {phase.stop_s:.1f}s")
    finally:
        if keep:
            log(f"  kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return phase


# -- report --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info = base_machine()
    for pkg in ("livekit", "livekit-agents", "livekit-plugins-silero"):
        try:
            info["packages"][pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info["packages"][pkg] = "not installed"
    info["affinity"] = len(os.sched_getaffinity(0))
    info["livekit_idle_default"] = livekit_idle_default()
    return info


def _lat(p: Phase) -> str:
    s = summary_ms(p.latencies())
    return f"{s['median_ms']:.1f} / {s['p90_ms']:.1f} / {s['max_ms']:.1f}"


def _to_leaf(p: Phase) -> str:
    """The pool: offer -> the job leaf's Ready (its ``child_started`` event), median."""
    values = [(o.leaf_started - o.first) * 1e3 for o in p.offers if o.leaf_started]
    return f"{statistics.median(values):.1f}" if values else "-"


def _mib(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    values = sorted(values)
    mid = (
        values[len(values) // 2]
        if len(values) % 2
        else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    )
    return f"{mid:.1f} (n={len(values)}, {values[0]:.1f}-{values[-1]:.1f})"


def table(results: dict[str, Any], phases: dict[tuple[str, str], Phase], jobs: int, burst: int) -> str:
    cols = [POOL, LIVEKIT]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fn: Callable[[str], str]) -> None:
        rows.append((label, [fn(s) for s in cols]))

    seq = {s: phases.get((s, "sequential")) for s in cols}
    bur = {s: phases.get((s, "burst")) for s in cols}

    def when(d: dict[str, Phase | None], fn: Callable[[Phase], str]) -> Callable[[str], str]:
        def cell(system: str) -> str:
            p = d[system]
            return fn(p) if p is not None else "failed"

        return cell

    row("start -> registered (s)", when(seq, lambda p: f"{p.registered_s:.2f}"))
    row("start -> idle pool warm, quiet (s)", when(seq, lambda p: f"{p.settled_s:.2f}"))
    row(f"sequential, {jobs} jobs: median / p90 / max (ms)", when(seq, _lat))
    row("  of which offer -> job leaf Ready, median (ms)", when(seq, _to_leaf))
    row(f"burst of {burst}: median / p90 / max (ms)", when(bur, _lat))
    row("  of which offer -> job leaf Ready, median (ms)", when(bur, _to_leaf))
    row(
        f"burst of {burst}: refused offers (re-offered)",
        when(bur, lambda p: str(sum(o.offers - 1 for o in p.offers))),
    )
    row("PSS idle job process (MiB)", when(seq, lambda p: _mib(role_pss(p.idle, "idle job"))))
    row(
        f"PSS active job process, {jobs} held (MiB)",
        when(seq, lambda p: _mib(role_pss(p.active, "active job"))),
    )
    row(
        "PSS pool parent: zygote / forkserver (MiB)",
        when(seq, lambda p: _mib(role_pss(p.idle, "pool parent"))),
    )
    row(
        "PSS dispatcher / host leaf (MiB)",
        when(seq, lambda p: _mib(role_pss(p.idle, "dispatcher") + role_pss(p.idle, "host leaf"))),
    )
    row("PSS otp-agents run + guard (MiB)", when(seq, lambda p: _mib(role_pss(p.idle, "supervisor"))))
    row(
        "tree PSS, idle (MiB, processes)",
        when(seq, lambda p: f"{p.idle['total_pss_mib']:.1f} ({p.idle['processes']})"),
    )
    row(
        f"tree PSS, {jobs} active, sequential run (MiB, processes)",
        when(seq, lambda p: f"{p.active['total_pss_mib']:.1f} ({p.active['processes']})"),
    )
    row(
        f"tree PSS, {burst} active, burst run (MiB, processes)",
        when(bur, lambda p: f"{p.active['total_pss_mib']:.1f} ({p.active['processes']})"),
    )
    width = max(len(label) for label, _ in rows)
    cw = [max(len(c), *(len(v[i]) for _, v in rows)) for i, c in enumerate(cols)]
    out = [f"{'':<{width}}  " + "  ".join(f"{c:>{cw[i]}}" for i, c in enumerate(cols))]
    out.append("-" * len(out[0]))
    for label, values in rows:
        out.append(f"{label:<{width}}  " + "  ".join(f"{v:>{cw[i]}}" for i, v in enumerate(values)))
    m = results["machine"]
    pk = m["packages"]
    out += [
        "",
        f"Machine: {m['cpu']}, {m['nproc']} cores ({m['affinity']} usable), {m['mem_gib']} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}; livekit-agents {pk['livekit-agents']}, "
        f"livekit {pk['livekit']}, otp-agents {pk['otp-agents']}.",
        f"Pool: idle={POOL_IDLE} spares, max_jobs={results['config']['pool_max_jobs']}. LiveKit worker: "
        f"num_idle_processes={m['livekit_idle_default']} (its production default, CPU count); "
        f"a refused offer is offered again after {results['config']['retry_s']:g} s.",
        "Latency: availability request -> the app's entrypoint running (wall clock). "
        f"App: {APP.relative_to(REPO)}.",
        f"Command: {results['command']}  ({results['elapsed_s']:.0f} s; load average "
        f"{results['loadavg_before'][0]:.2f} before, {results['loadavg_after'][0]:.2f} after)",
    ]
    for key, p in sorted(phases.items()):
        if p.problems:
            out.append(
                f"stderr of {key[0]}, {key[1]}: {len(p.problems)} error lines, first: {p.problems[0][:200]}"
            )
        if p.leftovers:
            out.append(f"{key[0]}, {key[1]}: SIGKILLed leftovers {p.leftovers}")
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--jobs", type=int, default=6, help="jobs per phase (default 6)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 sequential jobs, a burst of 3")
    p.add_argument("--retry", type=float, default=0.25, help="seconds before a refused offer is made again")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs (trees, events, stderr logs)")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.retry <= 0:
        p.error("--jobs must be at least 1 and --retry positive")
    args.sequential, args.burst = (2, 3) if args.quick else (args.jobs, args.jobs)
    args.max_jobs = pool_max_jobs(max(args.sequential, args.burst))
    return args


async def amain(
    args: argparse.Namespace, results: dict[str, Any], log: Callable[[str], None]
) -> dict[tuple[str, str], Phase]:
    phases: dict[tuple[str, str], Phase] = {}
    for kind, jobs in (("sequential", args.sequential), ("burst", args.burst)):
        for system in SYSTEMS:
            log(f"{system}: {kind}, {jobs} jobs")
            try:
                phases[(system, kind)] = await run_phase(
                    system, kind, jobs, args.max_jobs, args.retry, args.keep, log
                )
            except Exception as exc:  # reported; the other phases still run
                log(f"  {system}, {kind}: FAILED: {exc}")
                results["failures"].append(f"{system}, {kind}: {exc}")
    return phases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results: dict[str, Any] = {
        "machine": machine(),
        "loadavg_before": os.getloadavg(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join([sys.executable, *sys.argv]),
        "config": {
            "sequential_jobs": args.sequential,
            "burst_jobs": args.burst,
            "retry_s": args.retry,
            "pool_idle": POOL_IDLE,
            "pool_max_jobs": args.max_jobs,
            "app": str(APP),
        },
        "failures": [],
    }
    phases = asyncio.run(amain(args, results, log))
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    results["loadavg_after"] = os.getloadavg()
    results["phases"] = [p.summary() for p in phases.values()]
    print(table(results, phases, args.sequential, args.burst))
    for failure in results["failures"]:
        print(f"FAILED: {failure.splitlines()[0]}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
