#!/usr/bin/env python3
"""What the health monitors cost and how fast they see a hang.

Three measurements:

a. **Hang detection latency.** A ``workers.chaos:steady`` protocol worker runs under an in-process
   tree (``otp_agents.runtime.running``) with ``health = {ping_interval = I, ping_timeout = T}``.
   At a random moment the benchmark SIGSTOPs it (an exact fault time on the monotonic clock)
   and records, on the same clock, when the supervisor emitted ``hang``, ``health_kill`` and
   the replacement's ``child_started``. Each sample is checked against ``T + I``, the bound
   for a heartbeat that checks the silence once per interval. The current heartbeat wakes at
   exactly ``last_pong + T``, so the latency should fall between ``T - I`` and ``T``.
b. **Cost of one memory sample.** ``otp_agents.memory.sample(pid, metric, floor)`` timed with
   ``time.perf_counter_ns`` for a Python protocol worker (``workers/raw_worker.py``) and for a
   plain ``sleep``, for each metric, below the floor (``/proc/PID/statm`` only) and above it
   (``/proc/PID/smaps_rollup``); then full sweeps over 1,000 live ``sleep`` processes.
c. **Supervisor CPU with a fleet of protocol workers** at the default intervals (ping every
   2.5 s, memory sample every 1 s): the real CLI, ``otp-agents run tree.toml --state-dir DIR``,
   with N ``script = "workers/raw_worker.py"`` children and ``memory_warn_mb = 10000`` on the
   root (every child is sampled, nothing triggers). CPU of the supervisor process from
   ``/proc/PID/stat`` and ``schedstat`` over a fixed window once all N have started and the
   fleet has settled. A few of the N children are *probe* workers (the same protocol, written
   to a temp dir by this script) that log when each ping arrives: the send stamps show how late
   the supervisor's heartbeat timers fire. By default the fleet runs four times: both monitors
   on asyncio and on trio, then heartbeats only and memory only on asyncio (``--fleets``).
   A floor is measured too: the CPU cost of one task that only sleeps and wakes.

Usage::

    .venv/bin/python bench/health_overhead.py [--quick] [--output FILE] [--workers N] [--fleets ...]

Every wait is bounded; only processes started here (or by the supervisor started here) are
signalled, by pid; temp dirs are removed. No network traffic (socketpairs only).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import itertools
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec

from otp_agents.events import Event, EventBus, Kind
from otp_agents.health import dump, memory
from otp_agents.linux import cpu_ticks, per_task_counters, stat_fields
from otp_agents.runtime.tree import running
from otp_agents.spec.load import from_dict
from otp_agents.spec.model import HEALTH_DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
RAW_WORKER = ROOT / "workers" / "raw_worker.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024
GIB = 1024 * MIB
SETPRIV = shutil.which("setpriv")

# (a) hang detection: (ping_interval, ping_timeout, runs, quick runs); runs == 0 skips in --quick
HANG_SETTINGS: list[tuple[float, float, int, int]] = [
    (0.5, 2.0, 30, 4),
    (1.0, 2.5, 20, 3),
    (HEALTH_DEFAULTS.ping_interval, HEALTH_DEFAULTS.ping_timeout, 10, 0),
]
HANG_SLACK = 30.0  # a hang not reported within T + I + this many seconds fails the benchmark
RESTART_WAIT = 60.0

# (c) fleet
FLEET_START_PER_WORKER = 1.0  # seconds: bound on the whole start is 60 s + N * this
FLEET_STOP_PER_WORKER = 0.1
MEMORY_WARN_MB = 10_000  # far above any worker: every child is sampled, nothing triggers
NEVER = 86_400  # a ping interval (and timeout) that turns heartbeats off for the window
PROBES_MAX = 10
SLICES = 6  # the CPU window is also reported in this many equal slices
# What the root's ``health`` table turns on, per fleet variant.
FLEET_VARIANTS: dict[str, dict[str, float]] = {
    "both": {"memory_warn_mb": MEMORY_WARN_MB},  # default intervals: ping 2.5 s, memory 1 s
    "heartbeats": {},  # no memory level: nothing is sampled
    "memory": {"memory_warn_mb": MEMORY_WARN_MB, "ping_interval": NEVER, "ping_timeout": NEVER},
    # both monitors, and the workers are library workers (workers.chaos:steady, anyio) forked by
    # a zygote instead of raw_worker.py scripts started as fresh interpreters
    "zygote": {"memory_warn_mb": MEMORY_WARN_MB},
    # the zygote fleet with the root's start_concurrency = 8 (not OTP's one-after-another start)
    "zygote8": {"memory_warn_mb": MEMORY_WARN_MB},
}
START_CONCURRENCY = {"zygote8": 8}
FULL_FLEETS = "asyncio:both,trio:both,asyncio:heartbeats,asyncio:memory"
QUICK_FLEETS = "asyncio:both"
WAKE_RATES = (10, 400, 1000)  # 400/s: 1000 heartbeats every 2.5 s; 1000/s: 1000 samplers every 1 s


# -- small helpers -------------------------------------------------------------------------------


def summary(values: list[float], unit: str, digits: int = 3) -> dict[str, Any]:
    """n, median, p90, min, max (and the samples) of ``values``, already in ``unit``."""
    v = sorted(values)
    if not v:
        return {"n": 0}
    p90 = statistics.quantiles(v, n=10, method="inclusive")[8] if len(v) > 1 else v[0]
    return {
        "n": len(v),
        f"median_{unit}": round(statistics.median(v), digits),
        f"p90_{unit}": round(p90, digits),
        f"min_{unit}": round(v[0], digits),
        f"max_{unit}": round(v[-1], digits),
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> float:
    return os.getloadavg()[0]


def meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * 1024
    return out


def _task_ns(tasks: dict[int, tuple[int, int]]) -> int:
    return sum(ns for ns, _ in tasks.values())


def machine_busy_ticks() -> int:
    """Non-idle CPU time of the whole machine (all CPUs) from /proc/stat, in clock ticks."""
    with open("/proc/stat", "rb") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def pdeathsig(argv: list[str]) -> list[str]:
    """``argv`` with setpriv's death signal in front: nothing outlives a killed benchmark."""
    return [SETPRIV, "--pdeathsig", "KILL", "--", *argv] if SETPRIV else argv


# -- a protocol worker driven by hand ------------------------------------------------------------


class RawWorker:
    """``workers/raw_worker.py`` spawned by this process, handshake done by hand (Ready)."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ, OTP_AGENTS_FD=str(theirs.fileno()))
        try:
            self.proc = subprocess.Popen(
                pdeathsig([sys.executable, str(RAW_WORKER)]),
                env=env,
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        self.sock = ours
        self.pid = self.proc.pid
        self._buf = b""
        try:
            ours.settimeout(15.0)
            hello = self._receive()
            if hello.get("type") != "hello":
                raise RuntimeError(f"raw worker said {hello!r} instead of hello")
            self._send({"type": "welcome", "version": 1, "path": "bench/raw"})
            if self._receive().get("type") != "ready":
                raise RuntimeError("raw worker did not say ready")
        except BaseException:
            self.close()
            raise

    def _send(self, msg: dict[str, object]) -> None:
        body = msgspec.msgpack.encode(msg)
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def _receive(self) -> dict[str, Any]:
        while True:
            if len(self._buf) >= 4:
                (size,) = struct.unpack(">I", self._buf[:4])
                if len(self._buf) >= 4 + size:
                    body, self._buf = self._buf[4 : 4 + size], self._buf[4 + size :]
                    msg = msgspec.msgpack.decode(body)
                    if not isinstance(msg, dict):
                        raise RuntimeError("raw worker sent a frame that is not a map")
                    return msg
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("raw worker closed the socket")
            self._buf += chunk

    def close(self) -> None:
        kill_pid(self.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.sock.close()


# -- (a) hang detection latency ------------------------------------------------------------------


class _Timeline:
    """Every event of an in-process tree with the monotonic time it was emitted."""

    def __init__(self, bus: EventBus) -> None:
        self.items: list[tuple[float, Event]] = []
        self._changed = anyio.Event()
        bus.listen(self._on)

    def _on(self, event: Event) -> None:
        self.items.append((time.monotonic(), event))
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def wait(self, pred: Callable[[Event], bool], start: int, limit: float) -> tuple[int, float, Event]:
        """The first event from ``start`` on that matches (index after it, time, event); bounded."""
        with anyio.fail_after(limit):
            i = start
            while True:
                changed = self._changed
                while i < len(self.items):
                    t, e = self.items[i]
                    i += 1
                    if pred(e):
                        return i, t, e
                await changed.wait()


def _match(
    kind: Kind, path: str, pid: int | None = None, other_than: int | None = None
) -> Callable[[Event], bool]:
    return lambda e: (
        e.kind is kind
        and e.path == path
        and (pid is None or e.pid == pid)
        and (other_than is None or e.pid != other_than)
    )


async def _hang_child(
    timeline: _Timeline,
    path: str,
    interval: float,
    ping_timeout: float,
    runs: int,
    rng: random.Random,
    out: list[dict[str, float]],
) -> None:
    _, _, started = await timeline.wait(_match(Kind.CHILD_STARTED, path), 0, RESTART_WAIT)
    for _ in range(runs):
        pid = started.pid
        assert pid is not None
        # A random moment relative to the heartbeat's phase, once the worker has had pings.
        await anyio.sleep(rng.uniform(interval, 2 * interval))
        mark = len(timeline.items)
        t_fault = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        bound = ping_timeout + interval + HANG_SLACK
        _, t_hang, hang = await timeline.wait(_match(Kind.HANG, path, pid=pid), mark, bound)
        _, t_kill, _ = await timeline.wait(_match(Kind.HEALTH_KILL, path, pid=pid), mark, RESTART_WAIT)
        _, t_start, started = await timeline.wait(
            _match(Kind.CHILD_STARTED, path, other_than=pid), mark, RESTART_WAIT
        )
        out.append(
            {
                "latency_s": t_hang - t_fault,
                "silent_s": float(hang.value or 0.0),
                "hang_to_kill_s": t_kill - t_hang,
                "fault_to_started_s": t_start - t_fault,
            }
        )


async def _hang_all(settings: list[tuple[float, float, int]], state_dir: Path, seed: int) -> dict[str, Any]:
    bus = EventBus()
    timeline = _Timeline(bus)
    children = [
        {
            "id": f"w{i}",
            "module": "workers.chaos:steady",
            "cwd": str(ROOT),
            "shutdown": 2,
            "health": {"ping_interval": interval, "ping_timeout": timeout},
        }
        for i, (interval, timeout, _runs) in enumerate(settings)
    ]
    spec = from_dict({"id": "root", "intensity": 1_000_000, "period": 1, "children": children})
    results: dict[str, list[dict[str, float]]] = {}
    rng = random.Random(seed)
    async with running(spec, bus=bus, state_dir=state_dir), anyio.create_task_group() as tg:
        for i, (interval, timeout, runs) in enumerate(settings):
            out = results.setdefault(f"{interval:g}/{timeout:g}", [])
            tg.start_soon(_hang_child, timeline, f"root/w{i}", interval, timeout, runs, rng, out)
    dumps = list((state_dir / "dumps").glob("*.txt"))
    routes = Counter(e.detail for _, e in timeline.items if e.kind is Kind.DUMP_TAKEN)
    return {"samples": results, "dump_files": len(dumps), "dump_routes": dict(routes)}


def measure_hangs(settings: list[tuple[float, float, int]], seed: int) -> dict[str, Any]:
    """All settings at once, one child each, in one in-process tree (asyncio)."""
    state_dir = Path(tempfile.mkdtemp(prefix="bench-health-hang-"))
    try:
        raw = anyio.run(_hang_all, settings, state_dir, seed, backend="asyncio")
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    out: dict[str, Any] = {
        "dump_routes": raw["dump_routes"],
        "pyspy": dump._PYSPY,  # the third dump route, tried after channel and signal time out
        "settings": {},
    }
    for interval, timeout, _runs in settings:
        samples = raw["samples"][f"{interval:g}/{timeout:g}"]
        lat = [s["latency_s"] for s in samples]
        bound = timeout + interval
        out["settings"][f"{interval:g}/{timeout:g}"] = {
            "ping_interval_s": interval,
            "ping_timeout_s": timeout,
            "bound_s": bound,
            "n": len(samples),
            "latency_s": summary(lat, "s"),
            "latency_minus_timeout_s": summary([v - timeout for v in lat], "s"),
            "latency_over_timeout": summary([v / timeout for v in lat], "x"),
            "silent_at_hang_s": summary([s["silent_s"] for s in samples], "s"),
            "hang_to_kill_s": summary([s["hang_to_kill_s"] for s in samples], "s"),
            "fault_to_started_s": summary([s["fault_to_started_s"] for s in samples], "s"),
            "within_bound": sum(1 for v in lat if v <= bound),
            "samples": [{k: round(v, 4) for k, v in s.items()} for s in samples],
        }
    return out


# -- (b) memory sampling cost --------------------------------------------------------------------


def _time_us(fn: Callable[[], object], reps: int, warmup: int = 50) -> list[float]:
    for _ in range(warmup):
        fn()
    out: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(reps):
        t0 = clock()
        fn()
        out.append((clock() - t0) / 1000)
    return out


@contextlib.contextmanager
def sleepers(count: int) -> Iterator[list[int]]:
    """``count`` live ``sleep 3600`` processes (children of this process), killed afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            procs.append(
                subprocess.Popen(
                    pdeathsig(["sleep", "3600"]), stdin=subprocess.DEVNULL, close_fds=True, process_group=0
                )
            )
        deadline = time.monotonic() + 30 + count * 0.05
        for p in procs:  # wait until each has exec'd sleep (setpriv is gone from its cmdline)
            while cmdline(p.pid) != b"sleep\x003600\x00":
                if time.monotonic() > deadline or p.poll() is not None:
                    raise RuntimeError(f"sleep {p.pid} did not start")
                time.sleep(0.001)
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            kill_pid(p.pid)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)


def measure_sampling(raw: RawWorker, reps: int, sweep_children: int, sweeps: int) -> dict[str, Any]:
    out: dict[str, Any] = {"reps": reps, "one_process": [], "parts": [], "sweep": {}}
    with sleepers(1) as (sleep_pid,):
        targets = {"python worker (raw_worker.py)": raw.pid, "sleep": sleep_pid}
        for name, pid in targets.items():
            if memory.tree_pids(pid) != [pid]:
                raise RuntimeError(f"{name} {pid} has children; the per-process numbers assume none")
            for metric in ("rss", "pss", "uss"):
                paths = [("below floor", math.inf)] + ([("above floor", 0.0)] if metric != "rss" else [])
                for label, floor in paths:
                    mb, precise = memory.sample(pid, metric, floor)
                    if precise != (metric == "rss" or floor == 0.0):
                        raise RuntimeError("memory.sample took an unexpected path")
                    us = _time_us(functools.partial(memory.sample, pid, metric, floor), reps)
                    out["one_process"].append(
                        {
                            "target": name,
                            "metric": metric,
                            "floor": label,
                            "reads": "statm" if metric == "rss" or floor == math.inf else "+ smaps_rollup",
                            "mb": round(mb, 2),
                            **summary(us, "us", 2),
                        }
                    )
            parts: dict[str, Callable[[], object]] = {
                "tree_pids (task dirs + children files)": functools.partial(memory.tree_pids, pid),
                "rss_bytes (statm)": functools.partial(memory.rss_bytes, pid),
                "precise_bytes pss (smaps_rollup)": functools.partial(memory.precise_bytes, pid, "pss"),
                "precise_bytes uss (smaps_rollup)": functools.partial(memory.precise_bytes, pid, "uss"),
            }
            with open(f"/proc/{pid}/maps", "rb") as f:
                mappings = sum(1 for _ in f)
            for part, fn in parts.items():
                us = _time_us(fn, reps)
                out["parts"].append(
                    {"target": name, "mappings": mappings, "part": part, **summary(us, "us", 2)}
                )
    variants = [
        ("pss, below floor (statm only)", "pss", math.inf),
        ("pss, above floor (+ smaps_rollup)", "pss", 0.0),
        ("uss, above floor (+ smaps_rollup)", "uss", 0.0),
        ("rss (statm only)", "rss", 0.0),
    ]
    with sleepers(sweep_children) as pids:
        times: dict[str, list[float]] = {v[0]: [] for v in variants}
        for p in pids[:5]:  # warm up
            memory.sample(p, "pss", 0.0)
        for _ in range(sweeps):  # variants interleaved, so drift hits them alike
            for label, metric, floor in variants:
                t0 = time.perf_counter_ns()
                for p in pids:
                    memory.sample(p, metric, floor)
                times[label].append((time.perf_counter_ns() - t0) / 1e6)
        for label, _metric, _floor in variants:
            ms = times[label]
            s = summary(ms, "ms", 2)
            s["us_per_child_median"] = round(statistics.median(ms) * 1000 / len(pids), 2)
            # the sampler runs every memory_interval (default 1 s) over every watched child
            s["core_percent_at_1s_interval"] = round(statistics.median(ms) / 10, 2)
            out["sweep"][label] = s
        out["sweep_children"] = len(pids)
        out["sweeps"] = sweeps
    return out


# -- (c) a fleet under the real CLI --------------------------------------------------------------

PROBE_WORKER = '''\
"""Probe: a raw protocol worker that logs, for each ping, its seq, its send stamp and when it
arrived (both CLOCK_MONOTONIC, which is system-wide). Written by bench/health_overhead.py."""
import os, socket, struct, sys, time
import msgspec

out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
sock = socket.socket(fileno=int(os.environ["OTP_AGENTS_FD"]))
buf = b""

def send(msg):
    body = msgspec.msgpack.encode(msg)
    sock.sendall(struct.pack(">I", len(body)) + body)

def receive():
    global buf
    while True:
        if len(buf) >= 4:
            (size,) = struct.unpack(">I", buf[:4])
            if len(buf) >= 4 + size:
                body, buf = buf[4 : 4 + size], buf[4 + size :]
                return msgspec.msgpack.decode(body)
        chunk = sock.recv(65536)
        if not chunk:
            sys.exit(0)
        buf += chunk

send({"type": "hello", "versions": [1], "pid": os.getpid()})
if receive().get("type") != "welcome":
    sys.exit(70)
send({"type": "ready"})
while True:
    msg = receive()
    kind = msg.get("type")
    if kind == "ping":
        now = time.monotonic_ns()
        send({"type": "pong", "seq": msg["seq"], "sent_ns": msg["sent_ns"]})
        os.write(out, b"%d %d %d\\n" % (msg["seq"], msg["sent_ns"], now))
    elif kind in ("shutdown", "drain"):
        send({"type": "bye"})
        sys.exit(0)
'''


def fleet_tree(
    n: int,
    probes: int,
    probe_script: Path,
    probe_dir: Path,
    health: dict[str, float],
    zygote: bool = False,
    start_concurrency: int = 1,
) -> tuple[str, list[str]]:
    """TOML for n protocol workers, ``probes`` of them probes spread evenly; and the probe ids.
    With ``zygote``, a zygote child comes first and the other workers are forked by it."""
    every = max(1, n // probes) if probes else 0
    lines = ['id = "root"', 'strategy = "one_for_one"', "intensity = 1000000", "period = 1"]
    if start_concurrency > 1:
        lines.append(f"start_concurrency = {start_concurrency}")
    if health:
        lines.append("health = { " + ", ".join(f"{k} = {v:g}" for k, v in health.items()) + " }")
    if zygote:
        lines += [
            "",
            "[[children]]",
            'id = "zygote"',
            'image = "fleet"',
            'preload = ["workers.chaos"]',
            "idle = 4",
        ]
        lines.append(f"cwd = {json.dumps(str(ROOT))}")
    probe_ids: list[str] = []
    for i in range(n):
        cid = f"w{i:05d}"
        lines += ["", "[[children]]", f'id = "{cid}"']
        if every and i % every == every // 2 and len(probe_ids) < probes:
            probe_ids.append(cid)
            lines += [
                f"script = {json.dumps(str(probe_script))}",
                f"args = [{json.dumps(str(probe_dir / (cid + '.txt')))}]",
            ]
        elif zygote:
            lines += ['module = "workers.chaos:steady"', 'zygote = "fleet"', f"cwd = {json.dumps(str(ROOT))}"]
        else:
            lines.append(f"script = {json.dumps(str(RAW_WORKER))}")
    return "\n".join(lines) + "\n", probe_ids


def read_events(path: Path) -> list[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except OSError:
        return []
    out: list[dict[str, Any]] = []
    for line in data.split(b"\n"):
        if line:
            with contextlib.suppress(msgspec.DecodeError):
                out.append(msgspec.json.decode(line))
    return out


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def fd_budget(n: int) -> dict[str, Any]:
    """The supervisor holds a pidfd and a socket per protocol worker: about 2 fds each."""
    need = 2 * n + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out: dict[str, Any] = {"needed_estimate": need, "soft_before": soft, "hard": hard, "raised": False}
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        out["raised"] = True
    out["soft"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return out


def memory_budget(n: int, worker_uss: int) -> dict[str, Any]:
    """Refuse a fleet that would not fit in MemAvailable (with a margin)."""
    available = meminfo().get("MemAvailable", 0)
    per_worker = worker_uss + 256 * 1024  # plus the supervisor's side of each child, generously
    need = int(n * per_worker * 1.25) + GIB
    out = {
        "worker_uss_mib": round(worker_uss / MIB, 2),
        "estimate_gib": round(need / GIB, 2),
        "available_gib": round(available / GIB, 2),
    }
    if need > available:
        raise SystemExit(
            f"health_overhead: a fleet of {n} workers needs about {need / GIB:.1f} GiB "
            f"({n} x {per_worker / MIB:.1f} MiB measured for one raw worker, +25 %, +1 GiB), "
            f"but only {available / GIB:.1f} GiB is available. Use --workers with a smaller N."
        )
    return out


def _worker_ticks(pids: list[int]) -> int:
    total = 0
    for p in pids:
        fields = stat_fields(p)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total


def _probe_stats(probe_dir: Path, interval: float, t0_ns: int, t1_ns: int) -> dict[str, Any]:
    """Pings that reached a probe within the window.

    ``late``: the heartbeat sends ping k at ``start + k * interval``, so ``sent_ns - seq * interval``
    is constant but for how late the supervisor's timer fired; taken relative to the smallest
    value over the probe's whole life (its least late ping). ``gap``: time between consecutive
    pings' send stamps minus the interval. ``delivery``: send stamp to the probe's read.
    """
    step = int(interval * 1e9)
    late_ms: list[float] = []
    gap_ms: list[float] = []
    delivery_ms: list[float] = []
    for f in sorted(probe_dir.glob("*.txt")):
        rows: list[tuple[int, int, int]] = []
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
        if not rows:
            continue
        base = min(sent - seq * step for seq, sent, _ in rows)
        rows = sorted(r for r in rows if t0_ns <= r[2] <= t1_ns)
        delivery_ms += [(recv - sent) / 1e6 for _seq, sent, recv in rows]
        late_ms += [(sent - seq * step - base) / 1e6 for seq, sent, _ in rows]
        for (s1, sent1, _), (s2, sent2, _) in itertools.pairwise(rows):
            if s2 == s1 + 1:
                gap_ms.append((sent2 - sent1 - step) / 1e6)
    return {
        "pings": len(delivery_ms),
        "heartbeat_late_ms": summary(late_ms, "ms"),
        "heartbeat_gap_minus_interval_ms": summary(gap_ms, "ms"),
        "ping_delivery_ms": summary(delivery_ms, "ms"),
    }


def run_fleet(
    n: int, backend: str, variant: str, window: float, settle: float, probes: int, fds: dict[str, Any]
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-health-fleet-{backend}-{variant}-"))
    probe_dir = tmp / "probes"
    probe_dir.mkdir()
    probe_script = tmp / "probe_worker.py"
    probe_script.write_text(PROBE_WORKER)
    zygote = variant.startswith("zygote")
    text, probe_ids = fleet_tree(
        n, probes, probe_script, probe_dir, FLEET_VARIANTS[variant], zygote, START_CONCURRENCY.get(variant, 1)
    )
    tree = tmp / "tree.toml"
    tree.write_text(text)
    events_file = tmp / "events.jsonl"
    err_file = tmp / "stderr.log"
    cli = Path(sys.executable).parent / "otp-agents"
    argv = [str(cli)] if cli.exists() else [sys.executable, "-m", "otp_agents.cli"]
    argv += [
        "run",
        str(tree),
        "--backend",
        backend,
        "--state-dir",
        str(tmp / "state"),
        "--events",
        str(events_file),
    ]
    result: dict[str, Any] = {
        "backend": backend,
        "variant": variant,
        "health": FLEET_VARIANTS[variant],
        "workers": n,
        "probes": len(probe_ids),
        "command": "otp-agents " + " ".join(argv[1:]).replace(str(tmp), "TMP"),
        "rlimit_nofile": fds,
        "code": code_version(),  # the CLI imports the runtime afresh: note which one it ran
        "mem_available_before_gib": round(meminfo()["MemAvailable"] / GIB, 2),
        "loadavg_before": loadavg(),
    }
    worker_pids: list[int] = []
    proc: subprocess.Popen[bytes] | None = None
    err = open(err_file, "wb")  # noqa: SIM115 - closed in finally
    try:
        t_launch_wall = time.time()
        t_launch = time.monotonic()
        proc = subprocess.Popen(
            argv,
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = t_launch + 60 + n * FLEET_START_PER_WORKER
        started: dict[str, dict[str, Any]] = {}
        events: list[dict[str, Any]] = []
        while len(started) < n:
            if proc.poll() is not None:
                result["error"] = f"otp-agents exited with code {proc.returncode} while starting"
                break
            if time.monotonic() > deadline:
                result["error"] = (
                    f"only {len(started)} of {n} workers started within {deadline - t_launch:.0f}s"
                )
                break
            time.sleep(0.25)
            events = read_events(events_file)
            started = {
                e["path"]: e for e in events if e["kind"] == "child_started" and e["path"] != "root/zygote"
            }
        worker_pids = [int(e["pid"]) for e in started.values()]
        result["started"] = len(started)
        if "error" in result:
            failed = [e for e in events if e["kind"] in ("start_failed", "supervisor_stopped")]
            result["failure_events"] = failed[-5:]
            result["stderr_tail"] = _tail(err_file)
            return result
        t_all = time.monotonic()
        sup_started = next(e["ts"] for e in events if e["kind"] == "supervisor_started")
        starts = sorted(e["ts"] for e in started.values())
        result["start"] = {
            "launch_to_root_started_s": round(sup_started - t_launch_wall, 3),
            "all_started_s": round(starts[-1] - sup_started, 3),
            "per_worker_ms": summary([(b - a) * 1e3 for a, b in itertools.pairwise(starts)], "ms", 2),
            "seen_by_benchmark_s": round(t_all - t_launch, 3),
        }
        time.sleep(settle)
        if proc.poll() is not None:
            result["error"] = f"otp-agents exited with code {proc.returncode} while settling"
            result["stderr_tail"] = _tail(err_file)
            return result
        pid = proc.pid
        w0_wall, w0_ns = time.time(), time.monotonic_ns()
        t0 = time.monotonic()
        ticks0, tasks0, wticks0 = cpu_ticks(pid), per_task_counters(pid), _worker_ticks(worker_pids)
        busy0, self0 = machine_busy_ticks(), sum(os.times()[:2])
        slices: list[float] = []  # % of one core in each of SLICES equal parts of the window
        mark_t, mark_ns = t0, _task_ns(tasks0)
        for k in range(1, SLICES + 1):
            time.sleep(max(0.0, t0 + window * k / SLICES - time.monotonic()))
            now_t, now_ns = time.monotonic(), _task_ns(per_task_counters(pid))
            slices.append((now_ns - mark_ns) / 1e9 / (now_t - mark_t) * 100)
            mark_t, mark_ns = now_t, now_ns
        ticks1, tasks1, wticks1 = cpu_ticks(pid), per_task_counters(pid), _worker_ticks(worker_pids)
        busy1, self1 = machine_busy_ticks(), sum(os.times()[:2])
        elapsed = time.monotonic() - t0
        w1_wall, w1_ns = time.time(), time.monotonic_ns()
        ns = sum(v[0] - tasks0.get(t, (0, 0))[0] for t, v in tasks1.items())
        switches = sum(v[1] - tasks0.get(t, (0, 0))[1] for t, v in tasks1.items())
        with open(f"/proc/{pid}/status", "rb") as f:
            rss_kib = next(int(line.split()[1]) for line in f if line.startswith(b"VmRSS:"))
        fd_count = len(os.listdir(f"/proc/{pid}/fd"))
        window_events = [e for e in read_events(events_file) if w0_wall <= e["ts"] <= w1_wall]
        ticks = ticks1 - ticks0
        result["cpu"] = {
            "window_s": round(elapsed, 3),
            "cpu_ticks": ticks,
            "cpu_percent": round(ticks / CLK_TCK / elapsed * 100, 3),
            "cpu_percent_schedstat": round(ns / 1e9 / elapsed * 100, 3),
            "context_switches_per_s": round(switches / elapsed, 1),
            "threads": len(tasks1),
            "cpu_percent_slices": [round(v, 2) for v in slices],
            "workers_cpu_percent_total": round((wticks1 - wticks0) / CLK_TCK / elapsed * 100, 3),
            # everything else on the machine (% of one core; 2 cores = 200): the neighbours' share
            "others_cpu_percent": round(
                ((busy1 - busy0) - ticks - (wticks1 - wticks0)) / CLK_TCK / elapsed * 100
                - (self1 - self0) / elapsed * 100,
                2,
            ),
            "supervisor_rss_mib": round(rss_kib / 1024, 1),
            "supervisor_open_fds": fd_count,
            "loadavg_end": loadavg(),
            "events_in_window": dict(Counter(e["kind"] for e in window_events)),
        }
        result["mem_available_running_gib"] = round(meminfo()["MemAvailable"] / GIB, 2)
        result["worker_memory"] = _worker_memory(
            [int(e["pid"]) for path, e in started.items() if path.rsplit("/", 1)[-1] not in probe_ids]
        )
        result["forked"] = sum(1 for e in started.values() if (e.get("detail") or "").startswith("forked"))
        result["heartbeat"] = _probe_stats(probe_dir, HEALTH_DEFAULTS.ping_interval, w0_ns, w1_ns)
        result["rtt"] = _rtt_snapshots(tmp / "state", snapshots=3, apart=HEALTH_DEFAULTS.ping_interval)
        # orderly stop: SIGTERM, reverse start order
        t_stop = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        try:
            code = proc.wait(30 + n * FLEET_STOP_PER_WORKER)
            result["stop"] = {"seconds": round(time.monotonic() - t_stop, 3), "exit_code": code}
        except subprocess.TimeoutExpired:
            result["stop"] = {"seconds": None, "exit_code": None, "error": "did not stop in time"}
        exited = Counter(e["kind"] for e in read_events(events_file) if e["kind"] in ("child_exited", "hang"))
        result["unexpected_exits_total"] = dict(exited)
        return result
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # a second one would kill every child at once
            try:
                proc.wait(30 + n * FLEET_STOP_PER_WORKER)
            except subprocess.TimeoutExpired:
                kill_pid(proc.pid)  # its guard and PR_SET_PDEATHSIG end the workers
                proc.wait(10)
        err.close()
        for wp in worker_pids:  # anything left (there should be nothing): only our workers, by pid
            line = cmdline(wp)
            if b"raw_worker.py" in line or b"probe_worker.py" in line or b"otp_agents.zygote" in line:
                kill_pid(wp)
        result.setdefault("stderr_tail_on_exit", _tail(err_file, 3))
        shutil.rmtree(tmp, ignore_errors=True)


def _rtt_snapshots(state_dir: Path, snapshots: int, apart: float) -> dict[str, Any]:
    """The supervisor's own last ping round trip of every child, from ``otp-agents status
    --json``, taken ``snapshots`` times ``apart`` seconds apart (after the CPU window, so the
    status requests do not count in it)."""
    rtts: list[float] = []
    for k in range(snapshots):
        if k:
            time.sleep(apart)
        done = subprocess.run(
            [sys.executable, "-m", "otp_agents.cli", "status", "--json", "--state-dir", str(state_dir)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            return {"error": done.stderr.decode(errors="replace")[-500:]}
        todo = [json.loads(done.stdout).get("data") or {}]  # the reply: {"ok": ..., "data": tree}
        while todo:
            node = todo.pop()
            for child in node.get("children", []):
                if child.get("rtt_ms") is not None:
                    rtts.append(float(child["rtt_ms"]))
                if "children" in child:
                    todo.append(child)
    v = sorted(rtts)
    if not v:
        return {"n": 0}
    q = statistics.quantiles(v, n=100, method="inclusive") if len(v) > 1 else [v[0]] * 99
    return {
        "n": len(v),
        "p50_ms": round(statistics.median(v), 3),
        "p90_ms": round(q[89], 3),
        "p99_ms": round(q[98], 3),
        "max_ms": round(v[-1], 3),
    }


def _worker_memory(pids: list[int], sample: int = 20) -> dict[str, Any]:
    """USS and PSS of up to ``sample`` workers spread over the fleet (smaps_rollup), in MiB."""
    chosen = pids[:: max(1, len(pids) // sample)][:sample]
    uss, pss = [], []
    for pid in chosen:
        with contextlib.suppress(OSError):
            uss.append(memory.precise_bytes(pid, "uss") / MIB)
            pss.append(memory.precise_bytes(pid, "pss") / MIB)
    return {"sampled": len(uss), "uss_mib": summary(uss, "MiB", 2), "pss_mib": summary(pss, "MiB", 2)}


async def _wake_loop(rate: float, seconds: float) -> tuple[int, float]:
    wakes = 0
    end = time.monotonic() + seconds
    cpu0 = time.process_time()
    while time.monotonic() < end:
        await anyio.sleep(1 / rate)
        wakes += 1
    return wakes, time.process_time() - cpu0


def measure_wake_floor(backends: list[str], seconds: float) -> dict[str, Any]:
    """One task doing nothing but ``anyio.sleep(1 / rate)``: the CPU cost of a wake-up alone."""
    out: dict[str, Any] = {}
    for backend in backends:
        for rate in WAKE_RATES:
            wakes, cpu = anyio.run(_wake_loop, rate, seconds, backend=backend)
            out[f"{backend} {rate}/s"] = {
                "backend": backend,
                "asked_per_s": rate,
                "wakes_per_s": round(wakes / seconds, 1),
                "us_cpu_per_wake": round(cpu / wakes * 1e6, 1),
                "core_percent": round(cpu / seconds * 100, 2),
            }
    return out


# -- machine and report --------------------------------------------------------------------------


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def code_version() -> dict[str, Any]:
    """The commit measured, the tree of the code that runs (the runtime and the workers), and
    whether that code had uncommitted changes."""
    try:
        commit = _git("rev-parse", "HEAD")
        runtime = _git("rev-parse", "HEAD:otp_agents", "HEAD:workers").replace("\n", " ")
        dirty = _git("status", "--porcelain", "--", "otp_agents", "workers")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "runtime_tree": None, "dirty": None}
    return {"commit": commit, "runtime_tree": runtime, "dirty": bool(dirty)}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    for pkg in ("otp-agents", "anyio", "trio", "msgspec"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(meminfo().get("MemTotal", 0) / GIB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
    }


def _f(value: Any, fmt: str = ".2f") -> str:
    return "" if value is None else format(value, fmt)


def markdown(results: dict[str, Any]) -> str:
    code = results.get("code") or {}
    commit = (code.get("commit") or "unknown")[:7]
    out: list[str] = [
        f"otp-agents at commit {commit}{' with local changes' if code.get('dirty') else ''}",
        "",
    ]
    hang = results.get("hang_detection")
    if hang:
        out += [
            "### Hang detection (SIGSTOP -> `hang` event)",
            "",
            "| ping_interval / ping_timeout | n | latency median s | p90 s | max s | latency - timeout "
            "median / p90 / max s | latency / timeout median / p90 / max | within timeout + interval "
            "| SIGSTOP -> replacement started, median s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in hang["settings"].items():
            lat, over, ratio = r["latency_s"], r["latency_minus_timeout_s"], r["latency_over_timeout"]
            out.append(
                f"| {name} s | {r['n']} | {lat['median_s']:.3f} | {lat['p90_s']:.3f} | {lat['max_s']:.3f} "
                f"| {over['median_s']:+.3f} / {over['p90_s']:+.3f} / {over['max_s']:+.3f} "
                f"| {ratio['median_x']:.3f} / {ratio['p90_x']:.3f} / {ratio['max_x']:.3f} "
                f"| {r['within_bound']}/{r['n']} (<= {r['bound_s']:g} s) "
                f"| {r['fault_to_started_s']['median_s']:.3f} |"
            )
        routes = ", ".join(f"{k}: {v}" for k, v in hang["dump_routes"].items())
        out += ["", f"Stack dump routes taken before the kills: {routes or 'none'}.", ""]
    sampling = results.get("memory_sampling")
    if sampling:
        out += [
            f"### One memory sample (`memory.sample`, {sampling['reps']} calls each)",
            "",
            "| target | metric | floor | reads | median us | p90 us | min us |",
            "|---|---|---|---|---:|---:|---:|",
        ]
        for r in sampling["one_process"]:
            out.append(
                f"| {r['target']} | {r['metric']} | {r['floor']} | {r['reads']} | {r['median_us']:.2f} "
                f"| {r['p90_us']:.2f} | {r['min_us']:.2f} |"
            )
        out += ["", "| target | mappings | part | median us | p90 us |", "|---|---:|---|---:|---:|"]
        for r in sampling["parts"]:
            out.append(
                f"| {r['target']} | {r['mappings']} | {r['part']} | {r['median_us']:.2f} "
                f"| {r['p90_us']:.2f} |"
            )
        out += [
            "",
            f"### Full sweep over {sampling['sweep_children']} live `sleep` processes "
            f"({sampling['sweeps']} sweeps each)",
            "",
            "| variant | median ms/sweep | p90 ms | min ms | us per child | % of one core at 1 sweep/s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label, r in sampling["sweep"].items():
            out.append(
                f"| {label} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['min_ms']:.2f} "
                f"| {r['us_per_child_median']:.2f} | {r['core_percent_at_1s_interval']:.2f} |"
            )
        out.append("")
    fleet = results.get("fleet")
    if fleet:
        out += [
            "### Supervisor CPU with a fleet of protocol workers (default intervals)",
            "",
            "| backend | monitors on | workers | all started s | per worker ms | window s | CPU ticks "
            "| % of one core (stat) | % of one core (schedstat) | slices min-max % | context switches/s "
            "| supervisor RSS MiB | workers' CPU % (sum) | others' CPU % | events in window |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in fleet:
            if "error" in r:
                out.append(
                    f"| {r['backend']} | {r['variant']} | {r['workers']} | failed: {r['error']} "
                    "| | | | | | | | | | | |"
                )
                continue
            c, s = r["cpu"], r["start"]
            ev = ", ".join(f"{k}: {v}" for k, v in c["events_in_window"].items()) or "none"
            out.append(
                f"| {r['backend']} | {r['variant']} | {r['workers']} | {s['all_started_s']:.1f} "
                f"| {s['per_worker_ms']['median_ms']:.1f} | {c['window_s']:.1f} | {c['cpu_ticks']} "
                f"| {c['cpu_percent']:.2f} | {c['cpu_percent_schedstat']:.2f} "
                f"| {min(c['cpu_percent_slices']):.1f}-{max(c['cpu_percent_slices']):.1f} "
                f"| {c['context_switches_per_s']:.0f} | {c['supervisor_rss_mib']:.0f} "
                f"| {c['workers_cpu_percent_total']:.2f} | {c['others_cpu_percent']:.2f} | {ev} |"
            )
        out += [
            "",
            "| backend | monitors on | probe pings | ping sent late vs schedule, median / p90 / max ms "
            "| ping delivery (send stamp -> probe read), median / p90 / max ms | stop s |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in fleet:
            if "error" in r:
                continue
            hb = r["heartbeat"]
            late, dl = hb["heartbeat_late_ms"], hb["ping_delivery_ms"]
            out.append(
                f"| {r['backend']} | {r['variant']} | {hb['pings']} "
                f"| {_f(late.get('median_ms'))} / {_f(late.get('p90_ms'))} / {_f(late.get('max_ms'))} "
                f"| {_f(dl.get('median_ms'))} / {_f(dl.get('p90_ms'))} / {_f(dl.get('max_ms'))} "
                f"| {_f(r['stop'].get('seconds'), '.1f')} |"
            )
        out += [
            "",
            "| backend | monitors on | supervisor's ping RTT, all children, 3 snapshots: n | p50 ms "
            "| p90 ms | p99 ms | max ms |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in fleet:
            rtt = r.get("rtt")
            if "error" in r or not rtt or "p50_ms" not in rtt:
                continue
            out.append(
                f"| {r['backend']} | {r['variant']} | {rtt['n']} | {rtt['p50_ms']:.2f} | {rtt['p90_ms']:.2f} "
                f"| {rtt['p99_ms']:.2f} | {rtt['max_ms']:.2f} |"
            )
        out += [
            "",
            "| backend | monitors on | workers forked by a zygote | worker USS median / max MiB "
            "| worker PSS median / max MiB |",
            "|---|---|---:|---:|---:|",
        ]
        for r in fleet:
            if "error" in r or "worker_memory" not in r:
                continue
            uss, pss = r["worker_memory"]["uss_mib"], r["worker_memory"]["pss_mib"]
            out.append(
                f"| {r['backend']} | {r['variant']} | {r['forked']} "
                f"| {_f(uss.get('median_MiB'))} / {_f(uss.get('max_MiB'))} "
                f"| {_f(pss.get('median_MiB'))} / {_f(pss.get('max_MiB'))} |"
            )
    wake = results.get("wake_floor")
    if wake:
        out += [
            "",
            "### Floor: one task that only sleeps and wakes (`anyio.sleep(1 / rate)`)",
            "",
            "| backend | asked wakes/s | got wakes/s | CPU us per wake | % of one core |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in wake.values():
            out.append(
                f"| {r['backend']} | {r['asked_per_s']} | {r['wakes_per_s']:.0f} "
                f"| {r['us_cpu_per_wake']:.1f} | {r['core_percent']:.2f} |"
            )
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="CI-sized run (about a minute)")
    p.add_argument("--output", help="also write the results as JSON to this file")
    p.add_argument("--workers", type=int, default=None, help="fleet size (default 1000; --quick 100)")
    p.add_argument(
        "--fleets",
        default=None,
        help=f"comma-separated BACKEND:MONITORS fleet runs, MONITORS one of {', '.join(FLEET_VARIANTS)} "
        f"(default {FULL_FLEETS}; --quick {QUICK_FLEETS})",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the random fault moments")
    p.add_argument("--fleet-only", action="store_true", help="only the fleet runs (skip a and b)")
    args = p.parse_args(argv)
    quick = args.quick
    args.workers = args.workers if args.workers is not None else (100 if quick else 1000)
    if args.workers < 10:
        p.error("--workers must be at least 10")
    args.fleets = [
        tuple(f.split(":", 1)) for f in (args.fleets or (QUICK_FLEETS if quick else FULL_FLEETS)).split(",")
    ]
    for fleet in args.fleets:
        if len(fleet) != 2 or fleet[0] not in ("asyncio", "trio") or fleet[1] not in FLEET_VARIANTS:
            p.error(f"--fleets: expected asyncio|trio:{'|'.join(FLEET_VARIANTS)}, got {':'.join(fleet)}")
    args.wake_backends = ["asyncio"] if quick else ["asyncio", "trio"]
    args.wake_seconds = 1.0 if quick else 3.0
    args.hang = [(i, t, q if quick else r) for i, t, r, q in HANG_SETTINGS if (q if quick else r) > 0]
    args.sample_reps = 300 if quick else 3000
    args.sweep_children = 100 if quick else 1000
    args.sweeps = 5 if quick else 30
    args.window = 5.0 if quick else 30.0
    args.settle = 3.0 if quick else 10.0
    args.probes = min(PROBES_MAX, max(2, args.workers // 100))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, Any] = {
        "machine": machine(),
        "code": code_version(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "loadavg_at_start": loadavg(),
        "config": {
            "quick": args.quick,
            "workers": args.workers,
            "fleets": [f"{b}:{v}" for b, v in args.fleets],
            "hang_settings": [{"ping_interval": i, "ping_timeout": t, "runs": r} for i, t, r in args.hang],
            "sample_reps": args.sample_reps,
            "sweep_children": args.sweep_children,
            "sweeps": args.sweeps,
            "fleet_window_s": args.window,
            "fleet_settle_s": args.settle,
            "fleet_probes": args.probes,
            "seed": args.seed,
        },
    }
    # Before anything long: will the fleet fit? (one raw worker's own memory, measured)
    raw = RawWorker()
    try:
        uss = memory.precise_bytes(raw.pid, "uss")
        results["fleet_memory_check"] = memory_budget(args.workers, uss)
        if not args.fleet_only:
            log(
                f"memory sampling cost ({args.sample_reps} calls per cell, sweeps over {args.sweep_children})"
            )
            results["memory_sampling"] = measure_sampling(
                raw, args.sample_reps, args.sweep_children, args.sweeps
            )
    finally:
        raw.close()
    if not args.fleet_only:
        plan = ", ".join(f"{i:g}/{t:g} s x{r}" for i, t, r in args.hang)
        log(f"hang detection ({plan}; the settings run side by side, one child each)")
        results["hang_detection"] = measure_hangs(args.hang, args.seed)
        log("wake-up floor")
        results["wake_floor"] = measure_wake_floor(args.wake_backends, args.wake_seconds)
    fds = fd_budget(args.workers)
    results["fleet"] = []
    for backend, variant in args.fleets:
        log(f"fleet: {args.workers} protocol workers on {backend}, monitors: {variant}")
        r = run_fleet(args.workers, backend, variant, args.window, args.settle, args.probes, fds)
        results["fleet"].append(r)
    results["code_at_end"] = code_version()
    # Other commits (docs, tests) do not matter; a change to the runtime or workers does.
    runs = [results["code"], *(r["code"] for r in results["fleet"]), results["code_at_end"]]
    if len({(c["runtime_tree"], c["dirty"]) for c in runs}) > 1 or any(c["dirty"] for c in runs):
        log("warning: the runtime or workers changed (or had local changes) while the benchmark ran")
    print(markdown(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any("error" in r for r in results["fleet"]) else 0


if __name__ == "__main__":
    sys.exit(main())
