#!/usr/bin/env python3
"""Crash -> restarted latency of a plain command child: otp-agents vs supervisord, side by side.

One neutral observer measures every manager the same way, from outside, through /proc:

1. find the manager's child whose cmdline is ``sleep 3600``;
2. take a monotonic timestamp and SIGKILL that child;
3. poll ``/proc/MANAGER/task/*/children`` (every ``POLL_INTERVAL``, bounded in time) until a new
   child of the manager has the cmdline ``sleep 3600`` (that is, it has been exec'd), and record
   the elapsed time.

Managers: the real ``otp-agents run`` CLI on ``--backend asyncio`` and ``--backend trio`` (one
``one_for_one`` supervisor, one ``command = ["sleep", "3600"]`` child), and ``supervisord -n``
with ``[program:x] command=sleep 3600``, ``autorestart=true``, ``startsecs=0``.

Also measured: each manager's idle CPU (utime+stime from /proc/PID/stat over a fixed window,
with 10 idle ``sleep`` children) and a "bare floor" (``subprocess.Popen(["sleep", "3600"])``
until the process is visible as ``sleep 3600``, from this process).

Usage::

    .venv/bin/python bench/restart_latency.py [--runs N] [--supervisord-runs M] [--quick] [--output FILE]

Every wait is bounded; only processes started here (or by the managers started here) are
signalled, by pid; temp dirs are removed. No network traffic.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from otp_agents.linux import child_pids, cpu_ticks, die_with_parent_hook, per_task_counters, stat_fields

SLEEP_ARGV = ["sleep", "3600"]
SLEEP_CMDLINE = b"sleep\x003600\x00"
POLL_INTERVAL = 0.0002  # seconds between /proc polls while waiting for the replacement
RESTART_TIMEOUT = 10.0  # a restart slower than this is reported as a failure, not a sample
START_TIMEOUT = 30.0  # manager start (incl. Python imports) until all its children are visible
STOP_TIMEOUT = 15.0
IDLE_CHILDREN = 10
CLK_TCK = os.sysconf("SC_CLK_TCK")
OTP_BACKENDS = ("asyncio", "trio")
SUPERVISORD = "supervisord"


# -- /proc -------------------------------------------------------------------------------------


def cmdline(pid: int) -> bytes:
    """The raw cmdline (empty for a zombie or a vanished process)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: identifies a process across pid reuse."""
    stat = stat_fields(pid)
    return int(stat[19]) if stat is not None else None


def sleep_children(manager: int) -> list[int]:
    return [c for c in child_pids(manager) if cmdline(c) == SLEEP_CMDLINE]


# -- managers ----------------------------------------------------------------------------------


def _venv_tool(name: str, module: str) -> list[str]:
    """The console script next to this interpreter, else ``python -m module``."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", module]


def otp_tree(children: int) -> str:
    lines = [
        'id = "root"',
        'strategy = "one_for_one"',
        "intensity = 1000000",  # never give up during the benchmark
        "period = 1",
    ]
    for i in range(children):
        lines += ["", "[[children]]", f'id = "x{i}"', f"command = {json.dumps(SLEEP_ARGV)}"]
    return "\n".join(lines) + "\n"


def supervisord_conf(tmp: Path, children: int) -> str:
    return f"""\
[supervisord]
nodaemon=true
silent=true
logfile={tmp}/supervisord.log
pidfile={tmp}/supervisord.pid
childlogdir={tmp}
loglevel=info

[program:x]
command={" ".join(SLEEP_ARGV)}
numprocs={children}
process_name=%(program_name)s_%(process_num)02d
autostart=true
autorestart=true
startsecs=0
startretries=1000000
stopsignal=TERM
stopwaitsecs=5
stdout_logfile=NONE
stderr_logfile=NONE
"""


@dataclass
class Manager:
    """One supervisor under test, started as a subprocess in its own temp dir."""

    name: str  # "otp-agents/asyncio", "otp-agents/trio", "supervisord"
    children: int
    tmp: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    seen: dict[int, int | None] = field(default_factory=dict, init=False)  # sleep pid -> start time
    _log: BinaryIO | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{self.name.replace('/', '-')}-"))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def events_file(self) -> Path:
        return self.tmp / "events.jsonl"

    @property
    def log_file(self) -> Path:
        return self.tmp / "manager.log"

    def argv(self) -> list[str]:
        if self.name == SUPERVISORD:
            conf = self.tmp / "supervisord.conf"
            conf.write_text(supervisord_conf(self.tmp, self.children))
            return [*_venv_tool("supervisord", "supervisor.supervisord"), "-n", "-c", str(conf)]
        backend = self.name.split("/", 1)[1]
        tree = self.tmp / "tree.toml"
        tree.write_text(otp_tree(self.children))
        cli = _venv_tool("otp-agents", "otp_agents.cli")
        state = self.tmp / "state"  # its own: one supervisor per state dir
        return [
            *cli,
            "run",
            str(tree),
            "--backend",
            backend,
            "--events",
            str(self.events_file),
            "--state-dir",
            str(state),
        ]

    def start(self) -> None:
        argv = self.argv()
        self._log = open(self.log_file, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            cwd=self.tmp,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C meant for the benchmark reaches only the benchmark
        )
        self.wait_children(self.children, START_TIMEOUT)

    def wait_children(self, count: int, timeout: float) -> list[int]:
        """Wait until exactly ``count`` sleep children are running; return them."""
        deadline = time.monotonic() + timeout
        while True:
            kids = sleep_children(self.pid)
            if len(kids) == count:
                self.remember(kids)
                return kids
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {len(kids)} sleep children after {timeout}s, want {count}")
            time.sleep(0.005)

    def remember(self, pids: list[int]) -> None:
        for p in pids:
            if p not in self.seen:
                self.seen[p] = start_time(p)

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (both managers stop their children on it), bounded; SIGKILL if needed."""
        if self.proc is not None:
            stop_manager(self.proc, self.seen, lambda pid: cmdline(pid) == SLEEP_CMDLINE)
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def stop_manager(
    proc: subprocess.Popen[bytes],
    seen: dict[int, int | None],
    also: Callable[[int], bool] = lambda _pid: True,
) -> None:
    """SIGTERM the manager, wait (bounded), SIGKILL it if it is still there; then SIGKILL what
    it left behind: a process with the same pid *and* start time as one we saw (and ``also``),
    so a recycled pid is never touched."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    for pid, started_at in seen.items():
        if started_at is not None and start_time(pid) == started_at and also(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def started(managers: list[Manager]) -> Iterator[list[Manager]]:
    try:
        for m in managers:
            m.start()
        yield managers
    finally:
        for m in managers:
            m.stop()


# -- restart latency ---------------------------------------------------------------------------


@dataclass
class Sample:
    old_pid: int
    new_pid: int
    elapsed: float  # seconds, monotonic: SIGKILL sent -> replacement seen running `sleep 3600`
    wall_kill: float  # time.time() at the kill, to line up with the managers' own logs


def restart_once(m: Manager) -> Sample:
    """Kill the one sleep child; wait for its replacement. The observer is the same for all."""
    (old,) = m.wait_children(1, RESTART_TIMEOUT)
    t0 = time.monotonic()
    wall = time.time()
    os.kill(old, signal.SIGKILL)
    deadline = t0 + RESTART_TIMEOUT
    while True:
        for child in child_pids(m.pid):
            if child != old and cmdline(child) == SLEEP_CMDLINE:
                elapsed = time.monotonic() - t0
                m.remember([child])
                return Sample(old, child, elapsed, wall)
        if time.monotonic() > deadline:
            m.check_alive()
            raise RuntimeError(f"{m.name}: no replacement within {RESTART_TIMEOUT}s\n{m.log_tail()}")
        time.sleep(POLL_INTERVAL)


def measure_restarts(m: Manager, warmup: int, runs: int, log: Callable[[str], None]) -> list[Sample]:
    samples: list[Sample] = []
    for i in range(warmup + runs):
        # A short random pause: lets the manager finish the previous restart's bookkeeping and
        # avoids locking the kill to any periodic timer of the manager.
        time.sleep(random.uniform(0.02, 0.06))
        s = restart_once(m)
        if i >= warmup:
            samples.append(s)
    log(f"  {m.name}: {runs} restarts, median {statistics.median(x.elapsed for x in samples) * 1e3:.2f} ms")
    return samples


def summary_ms(values: list[float]) -> dict[str, Any]:
    ms = sorted(v * 1e3 for v in values)
    p90 = statistics.quantiles(ms, n=10, method="inclusive")[8] if len(ms) > 1 else ms[0]
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 4),
        "p90_ms": round(p90, 4),
        "min_ms": round(ms[0], 4),
        "max_ms": round(ms[-1], 4),
        "samples_ms": [round(v, 4) for v in ms],
    }


def otp_breakdown(m: Manager, samples: list[Sample]) -> dict[str, Any]:
    """Split each restart using otp-agents' own event timestamps (wall clock, same machine).

    ``detect``: SIGKILL sent -> ``child_exited`` emitted (exit noticed via pidfd, group killed,
    reaped, mailbox). ``respawn``: ``child_exited`` -> ``child_started`` (restart decision and
    Popen up to the exec'd child).
    """
    exited: dict[int, float] = {}
    begun: dict[int, float] = {}
    try:
        lines = m.events_file.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        with contextlib.suppress(ValueError):
            ev = json.loads(line)
            if ev.get("kind") == "child_exited":
                exited[ev["pid"]] = ev["ts"]
            elif ev.get("kind") == "child_started":
                begun[ev["pid"]] = ev["ts"]
    return _breakdown(samples, exited, begun)


_SUPD_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ (.*)$")


def supervisord_breakdown(m: Manager, samples: list[Sample]) -> dict[str, Any]:
    """The same split from supervisord's log (millisecond timestamps, local time)."""
    try:
        lines = (m.tmp / "supervisord.log").read_text(errors="replace").splitlines()
    except OSError:
        return {}
    begun: dict[int, float] = {}
    exit_times: list[float] = []
    for line in lines:
        match = _SUPD_TS.match(line)
        if not match:
            continue
        ts = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1e3
        text = match.group(3)
        spawned = re.match(r"spawned: '[^']+' with pid (\d+)", text)
        if spawned:
            begun[int(spawned.group(1))] = ts
        elif text.startswith("exited: "):
            exit_times.append(ts)
    # supervisord's exit line names no pid: take the first exit logged at or after the kill.
    exited: dict[int, float] = {}
    for s in samples:
        after = [t for t in exit_times if t >= s.wall_kill - 0.002]
        if after:
            exited[s.old_pid] = after[0]
    return _breakdown(samples, exited, begun)


def _breakdown(samples: list[Sample], exited: dict[int, float], begun: dict[int, float]) -> dict[str, Any]:
    detect = [exited[s.old_pid] - s.wall_kill for s in samples if s.old_pid in exited]
    respawn = [
        begun[s.new_pid] - exited[s.old_pid] for s in samples if s.old_pid in exited and s.new_pid in begun
    ]
    out: dict[str, Any] = {}
    if detect:
        out["detect_median_ms"] = round(statistics.median(detect) * 1e3, 3)
    if respawn:
        out["respawn_median_ms"] = round(statistics.median(respawn) * 1e3, 3)
    return out


# -- idle CPU ----------------------------------------------------------------------------------


def measure_idle(managers: list[Manager], window: float, settle: float) -> dict[str, dict[str, Any]]:
    """All managers idle at once, each with its children; CPU over the same window."""
    time.sleep(settle)
    t0 = time.monotonic()
    ticks0 = {m.name: cpu_ticks(m.pid) for m in managers}
    tasks0 = {m.name: per_task_counters(m.pid) for m in managers}
    time.sleep(window)
    elapsed = time.monotonic() - t0
    out: dict[str, dict[str, Any]] = {}
    for m in managers:
        m.check_alive()
        ticks = cpu_ticks(m.pid) - ticks0[m.name]
        before, after = tasks0[m.name], per_task_counters(m.pid)
        # Threads alive at the end: their growth (new threads: all of it). Threads that ended
        # within the window are missed, so this finer number is a lower bound.
        ns = sum(v[0] - before.get(t, (0, 0))[0] for t, v in after.items())
        switches = sum(v[1] - before.get(t, (0, 0))[1] for t, v in after.items())
        out[m.name] = {
            "children": len(sleep_children(m.pid)),
            "window_s": round(elapsed, 3),
            "cpu_ticks": ticks,
            "cpu_percent": round(ticks / CLK_TCK / elapsed * 100, 3),
            "cpu_percent_schedstat": round(ns / 1e9 / elapsed * 100, 4),
            "context_switches_per_s": round(switches / elapsed, 2),
            "threads": len(after),
        }
    return out


# -- the bare floor ----------------------------------------------------------------------------


def measure_floor(runs: int) -> dict[str, dict[str, Any]]:
    """``Popen(["sleep", "3600"])`` from this process until it is visible as ``sleep 3600``.

    ``popen_otp_options`` is what otp-agents does for a command child: its own process group,
    stdin from /dev/null, and ``setpriv --pdeathsig KILL`` exec'd in front of the program.
    ``popen_preexec`` is otp-agents' fallback when setpriv is missing: a ``preexec_fn`` that sets
    PR_SET_PDEATHSIG (which makes CPython fork() instead of vfork()).
    """
    variants: dict[str, Callable[[], subprocess.Popen[bytes]]] = {
        "popen_plain": lambda: subprocess.Popen(SLEEP_ARGV),
    }
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        variants["popen_otp_options"] = lambda: subprocess.Popen(
            [setpriv, "--pdeathsig", "KILL", "--", *SLEEP_ARGV],
            stdin=subprocess.DEVNULL,
            close_fds=True,
            process_group=0,
        )
    variants["popen_preexec"] = lambda: subprocess.Popen(
        SLEEP_ARGV,
        stdin=subprocess.DEVNULL,
        close_fds=True,
        process_group=0,
        preexec_fn=die_with_parent_hook(),
    )
    out: dict[str, dict[str, Any]] = {}
    for name, make in variants.items():
        times: list[float] = []
        for i in range(runs + 2):  # two warm-up spawns
            t0 = time.monotonic()
            proc = make()
            try:
                deadline = t0 + RESTART_TIMEOUT
                while cmdline(proc.pid) != SLEEP_CMDLINE:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"floor: sleep {proc.pid} not visible")
                    time.sleep(POLL_INTERVAL)
                elapsed = time.monotonic() - t0
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
            if i >= 2:
                times.append(elapsed)
        out[name] = summary_ms(times)
    return out


# -- machine -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
                break
    versions: dict[str, str] = {}
    for pkg in ("otp-agents", "supervisor", "anyio", "trio", "msgspec"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
    }


# -- report ------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    lat = results["restart_latency"]
    out = [
        "### Crash -> restarted latency (SIGKILL to replacement running `sleep 3600`)",
        "",
        "| manager | n | median ms | p90 ms | min ms | max ms | detect ms | respawn ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in lat.items():
        b = r.get("breakdown", {})
        out.append(
            f"| {name} | {r['n']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['min_ms']:.2f} "
            f"| {r['max_ms']:.2f} | {_opt(b.get('detect_median_ms'))} | {_opt(b.get('respawn_median_ms'))} |"
        )
    for name, r in results["floor"].items():
        out.append(
            f"| floor: {name} | {r['n']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['min_ms']:.2f} "
            f"| {r['max_ms']:.2f} | | |"
        )
    out += [
        "",
        "detect: SIGKILL -> the manager logged the exit; respawn: exit logged -> spawn logged "
        "(the managers' own timestamps; supervisord's are truncated to 1 ms). floor: Popen in the "
        "benchmark process, until the child is visible as `sleep 3600`.",
        "",
        "| ratio of medians | value |",
        "|---|---:|",
    ]
    for name, ratio in results["ratio_supervisord_over_otp"].items():
        out.append(f"| supervisord / {name} | {ratio:.1f}x |")
    out += [
        "",
        f"### Idle CPU ({IDLE_CHILDREN} idle `sleep` children, manager process only)",
        "",
        "| manager | window s | CPU ticks | % of one core (stat) | % of one core (schedstat) "
        "| context switches/s | threads |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["idle_cpu"].items():
        out.append(
            f"| {name} | {r['window_s']:.1f} | {r['cpu_ticks']} | {r['cpu_percent']:.2f} "
            f"| {r['cpu_percent_schedstat']:.3f} | {r['context_switches_per_s']:.1f} | {r['threads']} |"
        )
    return "\n".join(out)


def _opt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=None, help="restarts per otp-agents backend (default 50)")
    p.add_argument(
        "--supervisord-runs", type=int, default=None, help="restarts for supervisord (~1 s each; default 15)"
    )
    p.add_argument("--quick", action="store_true", help="CI-sized run (seconds, not a minute)")
    p.add_argument("--output", help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    quick = args.quick
    args.runs = args.runs if args.runs is not None else (10 if quick else 50)
    if args.supervisord_runs is None:
        args.supervisord_runs = 3 if quick else 15
    args.warmup = 2 if quick else 5
    args.supervisord_warmup = 1 if quick else 2
    args.idle_window = 3.0 if quick else 10.0
    args.idle_settle = 1.0 if quick else 2.0
    args.floor_runs = 10 if quick else 50
    if args.runs < 1 or args.supervisord_runs < 1:
        p.error("--runs and --supervisord-runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    names = [f"otp-agents/{b}" for b in OTP_BACKENDS] + [SUPERVISORD]
    managers: list[Manager] = []
    results: dict[str, Any] = {
        "machine": machine(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {
            "quick": args.quick,
            "runs": args.runs,
            "supervisord_runs": args.supervisord_runs,
            "warmup": args.warmup,
            "supervisord_warmup": args.supervisord_warmup,
            "poll_interval_ms": POLL_INTERVAL * 1e3,
            "idle_window_s": args.idle_window,
            "idle_children": IDLE_CHILDREN,
            "floor_runs": args.floor_runs,
        },
        "restart_latency": {},
    }
    try:
        log("restart latency (one child per manager, one manager at a time)")
        for name in names:
            m = Manager(name, children=1)
            managers.append(m)
            with started([m]):
                sup = name == SUPERVISORD
                samples = measure_restarts(
                    m,
                    args.supervisord_warmup if sup else args.warmup,
                    args.supervisord_runs if sup else args.runs,
                    log,
                )
            r = summary_ms([s.elapsed for s in samples])
            r["breakdown"] = supervisord_breakdown(m, samples) if sup else otp_breakdown(m, samples)
            results["restart_latency"][name] = r
        log("bare floor (Popen from the benchmark process)")
        results["floor"] = measure_floor(args.floor_runs)
        log(f"idle CPU ({IDLE_CHILDREN} children each, {args.idle_window:g}s window, managers side by side)")
        idle = [Manager(name, children=IDLE_CHILDREN) for name in names]
        managers.extend(idle)
        with started(idle):
            results["idle_cpu"] = measure_idle(idle, args.idle_window, args.idle_settle)
    finally:
        for m in managers:
            m.stop()
            m.cleanup()

    lat = results["restart_latency"]
    results["ratio_supervisord_over_otp"] = {
        name: round(lat[SUPERVISORD]["median_ms"] / lat[name]["median_ms"], 2) for name in names[:-1]
    }
    print(markdown(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
