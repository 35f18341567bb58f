#!/usr/bin/env python3
"""Crash -> replacement ready for a Python worker that imports ``livekit.rtc``, five managers.

Every manager runs the same worker, ``bench/lk_worker.py`` (``import livekit.rtc`` at the top),
and one neutral observer measures them all the same way, in one run:

1. the benchmark binds a Unix datagram socket; each worker, once up, sends it one datagram
   ``"<pid> <time.monotonic_ns()>"`` (CLOCK_MONOTONIC: one clock for every process here);
2. per sample: take the current worker's pid (from its datagram), a ``time.monotonic_ns()``
   timestamp, and SIGKILL that pid;
3. wait (bounded) for a datagram from a different pid; sample = its timestamp - the kill's.

So a sample is the whole gap a caller would see: the manager noticing the death, its restart
decision, the new process (fork, or exec of a fresh interpreter and all its imports) and the
worker's own start until it is ready.

Managers:

* ``otp-agents/zygote``: the real CLI (``python -m otp_agents.cli run TREE``, asyncio backend),
  a ``one_for_one`` root with a zygote child (``image = "lk"``, ``preload = ["livekit.rtc",
  "bench.lk_worker"]``) and the worker ``module = "bench.lk_worker:main"``, ``zygote = "lk"``:
  each restart is a fork of the preloaded zygote. The worker announces after ``worker.ready()``.
* ``otp-agents/cold``: the same tree without the zygote: each restart is a fresh interpreter.
* ``livekit-style forkserver+preload``: ``bench/lk_worker.py --forkserver-manager``, a one-process
  pool on ``multiprocessing.get_context("forkserver")`` with ``set_forkserver_preload`` of the
  same modules; it waits on the process' sentinel and starts a replacement when it dies. That is
  LiveKit Agents' machinery, but not its behaviour: LiveKit Agents does not restart a crashed job
  process (the job is gone); its pool only tops up its warm idle processes, on a 100 ms poll.
* ``supervisord``: ``[program:w] command=<python> bench/lk_worker.py``, ``autorestart=true``,
  ``startsecs=0``. It notices an exit in its main loop, which polls with a 1 s timeout.
* ``circus`` (0.19): one watcher, ``cmd = <python> bench/lk_worker.py``, ``numprocesses = 1``,
  ``check_delay`` left at its default (5 s): circus has no SIGCHLD handler and reaps and
  respawns only on that poll. Control and pub/sub endpoints are ``ipc://`` paths in the temp
  dir; ``statsd`` is off (so ``stats_endpoint`` is unused; setting it would turn statsd on in
  0.19) and the UDP multicast discovery endpoint is disabled, so no TCP or UDP port is opened.

Between samples the benchmark pauses 0.3 s plus a random part as long as the manager's own
polling period (supervisord 1 s, circus 5 s, others 50 ms), so a kill lands at a uniformly random
phase of that timer instead of locking onto one. Warm-up samples are discarded.

Also measured, in the same run: the idle worker's memory under ``otp-agents/zygote`` and
``otp-agents/cold`` (USS = Private_Clean + Private_Dirty, and PSS, from
``/proc/PID/smaps_rollup``, ~2 s after the first ready), and the zygote's own.

Usage::

    .venv/bin/python bench/zygote_restart.py [--quick] [--runs N] [--slow-runs M]
        [--only NAME,NAME] [--output FILE]

Every wait is bounded; managers get SIGTERM, then SIGKILL after a bound; only processes started
here (or by the managers started here) are signalled, by pid and start time; temp dirs are
removed. No network traffic, no TCP or UDP port. A manager that fails is reported as failed (the
exit code is then 1); the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from restart_latency import machine as base_machine
from restart_latency import start_time, stop_manager, summary_ms

from otp_agents.health.memory import precise_bytes, tree_pids

REPO = Path(__file__).resolve().parent.parent
WORKER_SCRIPT = REPO / "bench" / "lk_worker.py"
PRELOAD = ["livekit.rtc", "bench.lk_worker"]

ZYGOTE = "otp-agents/zygote"
COLD = "otp-agents/cold"
FORKSERVER = "livekit-style forkserver+preload"
LIVEKIT_POOL = "LiveKit's own executor (ProcPool)"
SUPERVISORD = "supervisord"
CIRCUS = "circus"
MANAGERS = (ZYGOTE, COLD, LIVEKIT_POOL, FORKSERVER, SUPERVISORD, CIRCUS)
SLOW = (SUPERVISORD, CIRCUS)  # restart on a polling timer: fewer samples

# seconds
START_TIMEOUT = 60.0  # manager start until the first worker is ready (cold imports, shared CPU)
RESTART_TIMEOUT = 20.0  # a restart slower than this is a failure, not a sample
PAUSE = 0.3  # between samples, plus a random part as long as the manager's polling period
PHASE = {SUPERVISORD: 1.0, CIRCUS: 5.0}  # the managers' own polling periods (see the docstring)
DEFAULT_PHASE = 0.05
MEMORY_SETTLE = 2.0
MB = 1024 * 1024


# -- the managers --------------------------------------------------------------------------------


def _toml(value: str) -> str:
    return json.dumps(value)  # a TOML basic string, for the plain paths used here


def otp_tree(sock: Path, zygote: bool) -> str:
    lines = [
        'id = "root"',
        'strategy = "one_for_one"',
        "intensity = 100000",  # never give up during the benchmark
        "period = 1",
    ]
    if zygote:
        lines += [
            "",
            "[[children]]",
            'id = "zygote"',
            'image = "lk"',
            f"preload = {json.dumps(PRELOAD)}",
            f"cwd = {_toml(str(REPO))}",
        ]
    lines += [
        "",
        "[[children]]",
        'id = "w"',
        'module = "bench.lk_worker:main"',
        *(['zygote = "lk"'] if zygote else []),
        f"cwd = {_toml(str(REPO))}",
        f"env = {{ BENCH_READY = {_toml(str(sock))} }}",
    ]
    return "\n".join(lines) + "\n"


def supervisord_conf(tmp: Path, sock: Path) -> str:
    command = shlex.join([sys.executable, str(WORKER_SCRIPT)])
    return f"""\
[supervisord]
nodaemon=true
silent=true
logfile={tmp}/supervisord.log
pidfile={tmp}/supervisord.pid
childlogdir={tmp}
loglevel=info

[program:w]
command={command}
directory={REPO}
environment=BENCH_READY="{sock}"
autostart=true
autorestart=true
startsecs=0
startretries=1000000
stopsignal=TERM
stopwaitsecs=5
stdout_logfile={tmp}/worker.log
redirect_stderr=true
"""


def circus_conf(tmp: Path, sock: Path) -> str:
    # circus 0.19 (circus/config.py): check_delay defaults to 5.0 here; an empty
    # multicast_endpoint skips the UDP discovery socket (controller.py); a stats_endpoint
    # without statsd would switch statsd on, so it is left unset (unused while statsd is off).
    command = shlex.join([sys.executable, str(WORKER_SCRIPT)])
    return f"""\
[circus]
endpoint = ipc://{tmp}/circus-control.ipc
pubsub_endpoint = ipc://{tmp}/circus-pubsub.ipc
multicast_endpoint =
statsd = False
httpd = False
loglevel = info
logoutput = {tmp}/circusd.log

[watcher:w]
cmd = {command}
numprocesses = 1
working_dir = {REPO}
copy_env = True

[env:w]
BENCH_READY = {sock}
"""


def _tool(name: str, module: str) -> list[str] | None:
    """The console script next to this interpreter, else ``python -m module``; None if missing."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    if importlib.util.find_spec(module.split(".")[0]) is not None:
        return [sys.executable, "-m", module]
    return None


@dataclass
class Ready:
    pid: int
    ts_ns: int  # the worker's time.monotonic_ns() when it announced itself
    started: int | None  # its start time (/proc/PID/stat field 22), to recognise it later


@dataclass
class Manager:
    """One manager under test, started as a subprocess in its own temp dir, with its observer."""

    name: str
    tmp: Path = field(init=False)
    sock: socket.socket = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    current: Ready | None = field(default=None, init=False)
    seen: dict[int, int | None] = field(default_factory=dict, init=False)  # pid -> start time
    _log: BinaryIO | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        slug = "".join(c if c.isalnum() else "-" for c in self.name)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{slug}-"))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.ready_path))

    @property
    def ready_path(self) -> Path:
        return self.tmp / "ready.sock"

    @property
    def log_file(self) -> Path:
        return self.tmp / "manager.log"

    @property
    def events_file(self) -> Path:
        return self.tmp / "events.jsonl"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        if self.name in (ZYGOTE, COLD):
            tree = self.tmp / "tree.toml"
            tree.write_text(otp_tree(self.ready_path, zygote=self.name == ZYGOTE))
            state = self.tmp / "state"
            state.mkdir()
            return [
                *[sys.executable, "-m", "otp_agents.cli", "run", str(tree)],
                *["--backend", "asyncio", "--state-dir", str(state), "--events", str(self.events_file)],
            ]
        if self.name == FORKSERVER:
            return [sys.executable, str(WORKER_SCRIPT), "--forkserver-manager", str(self.ready_path)]
        if self.name == LIVEKIT_POOL:
            return [sys.executable, str(WORKER_SCRIPT), "--livekit-pool", str(self.ready_path)]
        if self.name == SUPERVISORD:
            tool = _tool("supervisord", "supervisor.supervisord")
            if tool is None:
                raise RuntimeError("supervisord is not installed (the 'bench' extra)")
            conf = self.tmp / "supervisord.conf"
            conf.write_text(supervisord_conf(self.tmp, self.ready_path))
            return [*tool, "-n", "-c", str(conf)]
        if self.name == CIRCUS:
            tool = _tool("circusd", "circus.circusd")
            if tool is None:
                raise RuntimeError("circus is not installed")
            conf = self.tmp / "circus.ini"
            conf.write_text(circus_conf(self.tmp, self.ready_path))
            return [*tool, str(conf)]
        raise ValueError(self.name)

    def start(self) -> Ready:
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
        first = self.next_ready(None, START_TIMEOUT)
        self.remember_tree()
        return first

    def next_ready(self, old: int | None, timeout: float, after_ns: int = 0) -> Ready:
        """The next datagram from a pid other than ``old``, sent after ``after_ns``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.check_alive()
                raise RuntimeError(f"{self.name}: no ready worker within {timeout}s\n{self.log_tail()}")
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(256)
            except TimeoutError:
                self.check_alive()
                continue
            pid_text, _, ts_text = data.decode().partition(" ")
            pid, ts_ns = int(pid_text), int(ts_text)
            if pid == old or ts_ns <= after_ns:
                continue  # not the replacement (cannot happen with one worker; never a sample)
            ready = Ready(pid, ts_ns, start_time(pid))
            self.seen.setdefault(pid, ready.started)
            self.current = ready
            return ready

    def remember_tree(self) -> None:
        """Every descendant of the manager (forkserver, zygote, worker) by pid and start time."""
        for pid in tree_pids(self.pid)[1:]:
            self.seen.setdefault(pid, start_time(pid))

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        text: list[str] = []
        for name in ("manager.log", "supervisord.log", "circusd.log", "worker.log"):
            with contextlib.suppress(OSError):
                text += (self.tmp / name).read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM (every manager stops its worker on it), bounded; SIGKILL if needed."""
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(OSError):
                    self.remember_tree()
            stop_manager(self.proc, self.seen)
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.sock.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def otp_events(self) -> list[dict[str, Any]]:
        try:
            lines = self.events_file.read_text().splitlines()
        except OSError:
            return []
        events: list[dict[str, Any]] = []
        for line in lines:
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events


# -- measurements ------------------------------------------------------------------------------


def restart_once(m: Manager) -> tuple[Ready, Ready, int]:
    """SIGKILL the current worker; wait for its replacement's datagram. Returns old, new, ns."""
    old = m.current
    assert old is not None
    if old.started is None or start_time(old.pid) != old.started:
        m.check_alive()
        raise RuntimeError(f"{m.name}: worker {old.pid} is gone before it was killed\n{m.log_tail()}")
    t0 = time.monotonic_ns()
    os.kill(old.pid, signal.SIGKILL)
    new = m.next_ready(old.pid, RESTART_TIMEOUT, after_ns=t0)
    return old, new, new.ts_ns - t0


def measure_restarts(m: Manager, warmup: int, runs: int, log: Callable[[str], None]) -> dict[str, Any]:
    phase = PHASE.get(m.name, DEFAULT_PHASE)
    elapsed: list[float] = []
    for i in range(warmup + runs):
        time.sleep(PAUSE + random.uniform(0, phase))
        _old, _new, ns = restart_once(m)
        if i >= warmup:
            elapsed.append(ns / 1e9)
    r = summary_ms(elapsed)
    r["warmup"] = warmup
    log(f"  {m.name}: {runs} restarts, median {r['median_ms']:.1f} ms")
    return r


def worker_memory(pid: int) -> dict[str, Any]:
    return {
        "pid": pid,
        "uss_mb": round(precise_bytes(pid, "uss") / MB, 2),
        "pss_mb": round(precise_bytes(pid, "pss") / MB, 2),
        "rss_mb": round(precise_bytes(pid, "rss") / MB, 2),
    }


def idle_memory(m: Manager, first: Ready) -> dict[str, Any]:
    """The first worker's memory, ``MEMORY_SETTLE`` s after it was ready (and the zygote's)."""
    time.sleep(MEMORY_SETTLE)
    if first.started is None or start_time(first.pid) != first.started:
        raise RuntimeError(f"{m.name}: worker {first.pid} died before its memory was read")
    out: dict[str, Any] = {"settle_s": MEMORY_SETTLE, "worker": worker_memory(first.pid)}
    for ev in m.otp_events():
        if ev.get("kind") == "child_started" and ev.get("path") == "root/zygote" and ev.get("pid"):
            out["zygote"] = worker_memory(int(ev["pid"]))
    return out


def otp_starts(m: Manager) -> dict[str, int]:
    """How otp-agents started the worker each time (its own events): forked or cold."""
    starts = [e for e in m.otp_events() if e.get("kind") == "child_started" and e.get("path") == "root/w"]
    forked = sum(1 for e in starts if (e.get("detail") or "").startswith("forked by zygote"))
    fallbacks = sum(1 for e in m.otp_events() if e.get("kind") == "zygote_fallback")
    return {
        "starts": len(starts),
        "forked": forked,
        "cold": len(starts) - forked,
        "zygote_fallbacks": fallbacks,
    }


# -- machine -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info = base_machine()
    for pkg in ("livekit", "livekit-agents", "circus", "pyzmq", "tornado"):
        try:
            info["packages"][pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info["packages"][pkg] = "not installed"
    return info


# -- report ------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    out = [
        "### Crash -> replacement ready (SIGKILL to the new worker's ready datagram; "
        "the worker imports `livekit.rtc`)",
        "",
        f"| manager | n | median ms | p90 ms | min ms | max ms | median / {ZYGOTE} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = results["ratio_over_zygote"]
    for name, r in results["restart"].items():
        if "failed" in r:
            first = r["failed"].splitlines()[0] if r["failed"] else "?"
            out.append(f"| {name} | failed: {first} | | | | | |")
            continue
        ratio = f"{ratios[name]:.2f}x" if name in ratios else ""
        out.append(
            f"| {name} | {r['n']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['min_ms']:.1f} "
            f"| {r['max_ms']:.1f} | {ratio} |"
        )
    if results["memory"]:
        out += [
            "",
            f"### Idle worker memory (~{MEMORY_SETTLE:g} s after the first ready, /proc/PID/smaps_rollup)",
            "",
            "| manager | process | USS MB | PSS MB | RSS MB |",
            "|---|---|---:|---:|---:|",
        ]
        for name, mem in results["memory"].items():
            for role in ("worker", "zygote"):
                if role in mem:
                    v = mem[role]
                    out.append(
                        f"| {name} | {role} | {v['uss_mb']:.1f} | {v['pss_mb']:.1f} | {v['rss_mb']:.1f} |"
                    )
    mach = results["machine"]
    pk = mach["packages"]
    out += [
        "",
        f"Machine: {mach['cpu']}, {mach['nproc']} cores, {mach['mem_gib']} GiB, Linux {mach['kernel']}, "
        f"Python {mach['python']}; livekit {pk['livekit']}, supervisor {pk['supervisor']}, "
        f"circus {pk['circus']}.",
        f"Command: `{results['command']}`",
    ]
    return "\n".join(out)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--runs", type=int, default=None, help="samples for otp-agents and forkserver (default 30)"
    )
    p.add_argument(
        "--slow-runs", type=int, default=None, help="samples for supervisord and circus (default 10)"
    )
    p.add_argument("--quick", action="store_true", help="CI-sized run (5 and 2 samples)")
    p.add_argument("--only", help=f"comma-separated managers to run (of: {', '.join(MANAGERS)})")
    p.add_argument("--output", help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    args.runs = args.runs if args.runs is not None else (5 if args.quick else 30)
    args.slow_runs = args.slow_runs if args.slow_runs is not None else (2 if args.quick else 10)
    args.warmup = 1 if args.quick else 3
    args.slow_warmup = 1
    if args.runs < 1 or args.slow_runs < 1:
        p.error("--runs and --slow-runs must be at least 1")
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in MANAGERS]
        if unknown or not names:
            p.error(f"--only: unknown manager(s) {unknown}; choose from {', '.join(MANAGERS)}")
        args.managers = [n for n in MANAGERS if n in names]
    else:
        args.managers = list(MANAGERS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results: dict[str, Any] = {
        "machine": machine(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "config": {
            "quick": args.quick,
            "managers": args.managers,
            "runs": args.runs,
            "slow_runs": args.slow_runs,
            "warmup": args.warmup,
            "slow_warmup": args.slow_warmup,
            "pause_s": PAUSE,
            "phase_jitter_s": {n: PHASE.get(n, DEFAULT_PHASE) for n in args.managers},
            "restart_timeout_s": RESTART_TIMEOUT,
            "memory_settle_s": MEMORY_SETTLE,
        },
        "restart": {},
        "memory": {},
    }
    failed = False
    log("crash -> replacement ready (one manager at a time, one worker each)")
    for name in args.managers:
        slow = name in SLOW
        m: Manager | None = None
        try:
            m = Manager(name)
            log(f"  {name}: starting")
            first = m.start()
            if name in (ZYGOTE, COLD):
                results["memory"][name] = idle_memory(m, first)
            r = measure_restarts(
                m, args.slow_warmup if slow else args.warmup, args.slow_runs if slow else args.runs, log
            )
            m.stop()
            if name in (ZYGOTE, COLD):  # its events file is complete once it has stopped
                r["otp_starts"] = otp_starts(m)
            results["restart"][name] = r
        except Exception as exc:  # reported, and the next manager runs
            failed = True
            log(f"  {name}: FAILED: {exc}")
            results["restart"][name] = {"failed": str(exc)}
        finally:
            if m is not None:
                m.stop()  # again after a failure; a no-op after a stop
                m.cleanup()

    ok = {n: r for n, r in results["restart"].items() if "failed" not in r}
    base = ok.get(ZYGOTE)
    results["ratio_over_zygote"] = (
        {n: round(r["median_ms"] / base["median_ms"], 2) for n, r in ok.items()} if base else {}
    )
    print(markdown(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
