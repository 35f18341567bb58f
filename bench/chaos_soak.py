#!/usr/bin/env python3
"""Chaos soak: a 200-child tree under continuous random faults, with its invariants checked.

The real CLI runs a tree of about 200 leaves (``chaos_tree``): protocol workers started cold
and forked by a zygote (``workers.chaos:target``), plain commands (sleepers, commands that
ignore SIGTERM, commands that leave grandchildren behind and exit), and small subtrees whose
child crash-loops until the subtree exhausts its intensity and escalates to the root. While it
runs, faults are injected at random, bounded in rate and count, each aimed at one process:

* from outside: SIGKILL; SIGSTOP for longer than the ping timeout (a hang); SIGSTOP then
  SIGCONT after half a second; an operator ``restart`` over the control socket;
* from inside a protocol worker (``workers.chaos:target``, told by SIGUSR2): garbage bytes, an
  oversized frame, a truncated frame, a closed channel, grandchildren left behind then exit, a
  memory leak, a stuck event loop, a crash, ignoring the stop request (then an operator restart).

Invariants, checked throughout and at the end (any breach is listed in the report):

1. the supervisor never dies;
2. every fault is detected and handled: the process ends (the events name its pid), with the
   detection event its kind calls for (``protocol_error``, ``hang``, ``memory_limit``, a
   SIGKILL after the shutdown timeout), and its child is started again;
3. no zombie child of the supervisor outlives ZOMBIE_BOUND;
4. every ``health_kill`` for a hang or a memory limit has a stack dump on disk;
5. the control socket answers ``status`` within CONTROL_BOUND, every second of the run;
6. the supervisor's RSS does not grow after warm-up (last third against the first third after
   warm-up, within RSS_SLACK);
7. after ``otp-agents stop`` the supervisor exits 0 and no process of the tree is left: every
   process on the machine is searched for the run's marker in its environment (grandchildren,
   setsid escapees and zygote spares included).

Usage::

    .venv/bin/python bench/chaos_soak.py [--duration S] [--rate FAULTS_PER_S] [--seed N]
        [--backend asyncio|trio] [--output FILE.json] [--markdown FILE.md]

Exit status 0 when no invariant was breached. Only processes of the tree started here are
signalled, by pid; everything stays on this machine (Unix sockets only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otp_agents.errors import NotRunning
from otp_agents.ops import control_client as control
from workers.chaos import CHAOS_FAULTS

ROOT = Path(__file__).resolve().parent.parent
ZOMBIE_BOUND = 5.0  # s: a zombie child of the supervisor seen for longer is a breach
CONTROL_BOUND = 2.0  # s: a status request slower than this is a breach
HANDLE_BOUND = 30.0  # s: a fault must be handled (process gone, event seen) within this
RESTART_BOUND = 30.0  # s: and its child started again within this after that
RSS_SLACK_MB = 8.0  # growth of the supervisor's RSS allowed after warm-up
STOP_BOUND = 90.0  # s: the ordered stop of the whole tree
KILL_BOUND = 10.0  # s: after the supervisor's SIGKILL, every process of the tree gone

# Fault kinds and their weights. "internal" ones are committed by the target worker itself.
FAULTS: dict[str, float] = {
    "sigkill": 4,
    "stop_long": 1,
    "stop_short": 2,
    "operator_restart": 1,
    "garbage": 1,
    "oversized": 1,
    "truncated": 1,
    "close": 1,
    "fork_exit": 1,
    "leak": 1,
    "hang": 1,
    "crash": 1,
    "ignore_term": 1,
}
INTERNAL = set(CHAOS_FAULTS)  # committed by the target worker itself, on SIGUSR2
# What must be seen for the target pid, besides its end (child_exited / child_terminated).
DETECTION: dict[str, tuple[str, ...]] = {
    "garbage": ("protocol_error",),
    "oversized": ("protocol_error",),
    "stop_long": ("hang", "health_kill"),
    "hang": ("hang", "health_kill"),
    "leak": ("memory_limit", "health_kill"),
}
WORKER_HEALTH = (
    "{ ping_interval = 0.5, ping_timeout = 2, memory_limit_mb = 300, memory_grace = 1, "
    "memory_interval = 0.5 }"
)


def chaos_tree() -> tuple[str, int]:
    """The tree's TOML and its number of leaves (processes, zygote included)."""
    cwd = json.dumps(str(ROOT))
    out = [
        'id = "root"',
        'strategy = "one_for_one"',
        "intensity = 100000",
        "period = 1",
        "",
        "[[children]]",
        'id = "zygote"',
        'image = "chaos"',
        'preload = ["workers.chaos"]',
        "idle = 2",
        f"cwd = {cwd}",
        "",
        "[[children]]",
        'id = "workers"',
        "intensity = 100000",
        "period = 1",
        "start_concurrency = 4",
        f"health = {WORKER_HEALTH}",
    ]
    leaves = 1
    for i in range(100):
        out += ["  [[children.children]]", f'  id = "{"t" if i < 60 else "z"}{i:03d}"']
        out += ['  module = "workers.chaos:target"', f"  cwd = {cwd}", "  shutdown = 2"]
        if i >= 60:
            out.append('  zygote = "chaos"')
        leaves += 1
    out += [
        "",
        "[[children]]",
        'id = "commands"',
        "intensity = 100000",
        "period = 1",
        "start_concurrency = 8",
    ]
    for i in range(70):
        out += [
            "  [[children.children]]",
            f'  id = "c{i:03d}"',
            '  command = ["sleep", "3600"]',
            "  shutdown = 2",
        ]
        leaves += 1
    for i in range(10):
        out += [
            "  [[children.children]]",
            f'  id = "s{i:03d}"',
            '  command = ["sh", "-c", "trap \'\' TERM; while :; do sleep 1; done"]',
            "  shutdown = 1",
        ]
        leaves += 1
    for i in range(10):
        out += [
            "  [[children.children]]",
            f'  id = "f{i:03d}"',
            '  command = ["sh", "-c", "setsid sleep 5 & sleep 60 & sleep 3; exit 1"]',
            "  shutdown = 2",
        ]
        leaves += 1
    for k in range(5):
        out += [
            "",
            "[[children]]",
            f'id = "loop{k}"',
            "intensity = 2",
            "period = 5",
            "  [[children.children]]",
            '  id = "crasher"',
            '  command = ["sh", "-c", "sleep 0.5; exit 1"]',
            "  [[children.children]]",
            '  id = "bystander"',
            '  command = ["sleep", "3600"]',
        ]
        leaves += 2
    return "\n".join(out) + "\n", leaves


# -- observation --------------------------------------------------------------------------------


def proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0].decode()
    except OSError:
        return None


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children_of(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(p) for p in f.read().split())
    except OSError:
        pass
    return out


def marked(marker: str) -> dict[int, str]:
    """Live processes carrying the run's marker in their environment."""
    needle = f"OTP_CHAOS_RUN={marker}".encode()
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if proc_state(int(entry)) not in (None, "Z"):
            found[int(entry)] = cmd
    return found


class EventTail:
    """Reads the supervisor's JSONL event file as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.events: list[dict[str, Any]] = []
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        new = [json.loads(line) for line in lines if line.strip()]
        self.events.extend(new)
        return new


@dataclass
class Fault:
    kind: str
    path: str
    pid: int
    at: float  # monotonic
    seen: set[str] = field(default_factory=set)  # event kinds seen for the pid
    ended_at: float | None = None
    restarted: bool = False
    judged: bool = False  # settled: handled as its kind requires
    violation: str | None = None


# -- the run ------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="otp-chaos-"))
        self.state = self.tmp / "state"
        self.chaos_dir = self.tmp / "faults"
        self.chaos_dir.mkdir()
        self.events_file = self.tmp / "events.jsonl"
        self.marker = uuid.uuid4().hex
        self.tail = EventTail(self.events_file)
        self.faults: list[Fault] = []
        self.by_pid: dict[int, list[Fault]] = {}
        self.violations: list[str] = []
        self.control_ms: list[float] = []
        self.rss: list[tuple[float, float]] = []
        self.zombies: dict[int, float] = {}
        self.zombie_max = 0.0
        self.continue_at: list[tuple[float, int]] = []  # SIGCONT due for a short stop
        self.children: dict[str, tuple[int, str]] = {}  # path -> (pid, kind)
        self.proc: subprocess.Popen[bytes] | None = None
        self.kinds: Counter[str] = Counter()

    def breach(self, text: str) -> None:
        if len(self.violations) < 200:
            self.violations.append(text)
        print(f"VIOLATION: {text}", file=sys.stderr, flush=True)

    # -- lifecycle --

    def start(self) -> None:
        text, self.leaves = chaos_tree()
        tree = self.tmp / "tree.toml"
        tree.write_text(text)
        mark = len(self.tail.events)
        env = {**os.environ, "OTP_CHAOS_RUN": self.marker, "CHAOS_DIR": str(self.chaos_dir)}
        with open(self.tmp / "supervisor.log", "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "otp_agents.cli",
                    "run",
                    str(tree),
                    "--backend",
                    self.args.backend,
                    "--state-dir",
                    str(self.state),
                    "--events",
                    str(self.events_file),
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
                env=env,
                stderr=log,
            )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            self.tail.poll()
            if self.proc.poll() is not None:
                raise RuntimeError(f"the supervisor exited at start with {self.proc.returncode}")
            if (
                len({e["path"] for e in self.tail.events[mark:] if e["kind"] == "child_started"})
                >= self.leaves
            ):
                return
            time.sleep(0.1)
        raise RuntimeError("the tree did not start within 180 s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, Any] | None:
        began = time.monotonic()
        try:
            replies = control.request(
                control.socket_path(self.state), control.Request(op="status"), timeout=CONTROL_BOUND * 5
            )
        except (OSError, NotRunning) as exc:
            self.breach(f"status request failed: {exc}")
            return None
        took = time.monotonic() - began
        self.control_ms.append(took * 1000)
        if took > CONTROL_BOUND:
            self.breach(f"status took {took:.2f}s (bound {CONTROL_BOUND}s)")
        data = replies[-1].data if replies else None
        return data if isinstance(data, dict) else None

    def refresh(self, data: dict[str, Any]) -> None:
        self.children = {}

        def walk(rows: list[dict[str, Any]]) -> None:
            for row in rows:
                if "children" in row:
                    walk(row["children"])
                elif row.get("pid") and row.get("status") == "running":
                    self.children[row["path"]] = (int(row["pid"]), row["kind"])

        walk(data.get("children", []))

    # -- faults --

    def targets(self, kind: str) -> list[str]:
        paths = list(self.children)
        if kind in INTERNAL or kind == "stop_long":
            return [p for p in paths if p.startswith("root/workers/")]
        if kind == "operator_restart":
            return [p for p in paths if p.startswith(("root/workers/", "root/commands/"))]
        return [p for p in paths if p != "root/zygote" and not p.startswith("root/loop")]

    def inject(self) -> None:
        kinds = list(FAULTS)
        kind = self.rng.choices(kinds, weights=[FAULTS[k] for k in kinds])[0]
        candidates = [p for p in self.targets(kind) if self.children[p][0] not in self.by_pid]
        if not candidates:
            return
        path = self.rng.choice(candidates)
        pid = self.children[path][0]
        if proc_state(pid) in (None, "Z", "T"):
            return
        fault = Fault(kind, path, pid, time.monotonic())
        try:
            if kind == "sigkill":
                os.kill(pid, signal.SIGKILL)
            elif kind == "stop_long":
                os.kill(pid, signal.SIGSTOP)
            elif kind == "stop_short":
                os.kill(pid, signal.SIGSTOP)
                self.continue_at.append((time.monotonic() + 0.5, pid))
            elif kind == "operator_restart":
                operator_restart(self.state, path)
            else:
                (self.chaos_dir / str(pid)).write_text(kind)
                os.kill(pid, signal.SIGUSR2)
                if kind == "ignore_term":
                    time.sleep(0.05)
                    operator_restart(self.state, path)
        except ProcessLookupError:
            return  # it ended on its own meanwhile
        self.faults.append(fault)
        self.by_pid.setdefault(pid, []).append(fault)
        self.kinds[kind] += 1

    # -- checks --

    def observe(self) -> None:
        for e in self.tail.poll():
            pid = e.get("pid")
            kind = e["kind"]
            if kind == "child_started":
                for f in self.faults_for_path(e["path"]):
                    if f.ended_at is not None:
                        f.restarted = True
            if pid is None or pid not in self.by_pid:
                continue
            for f in self.by_pid[pid]:
                f.seen.add(kind)
                if kind in ("child_exited", "child_terminated") and f.ended_at is None:
                    f.ended_at = time.monotonic()
                if kind == "health_kill" and e.get("reason") in ("hang", "memory"):
                    dump = e.get("file")
                    if not dump or not Path(dump).exists() or Path(dump).stat().st_size == 0:
                        self.breach(f"{e['path']} pid {pid}: health_kill ({e.get('reason')}) without a dump")

    def faults_for_path(self, path: str) -> list[Fault]:
        return [f for f in self.faults[-400:] if f.path == path and not f.restarted]

    def judge(self, now: float, final: bool = False) -> None:
        """Settle every fault old enough: handled as its kind requires, or a breach."""
        for f in self.faults:
            if f.violation is not None or f.judged:
                continue
            age = now - f.at
            if f.kind == "stop_short":  # half a second stopped is no hang: nothing may happen
                if "hang" in f.seen:
                    f.violation = f"stop_short on {f.path} (pid {f.pid}): called a hang"
                    self.breach(f.violation)
                elif age > 4.0 or final:
                    f.judged = True
                continue
            ended = f.ended_at is not None
            need = DETECTION.get(f.kind, ())
            detected = all(k in f.seen for k in need)
            restarted = f.restarted or self.supervisor_gave_up_on(f.path)
            if ended and detected and restarted:
                f.judged = True
                continue
            if age > HANDLE_BOUND + RESTART_BOUND or final:
                missing = [k for k in need if k not in f.seen]
                what = (
                    "not ended" if not ended else (f"no {', '.join(missing)}" if missing else "not restarted")
                )
                f.violation = f"{f.kind} on {f.path} (pid {f.pid}): {what} after {age:.1f}s"
                self.breach(f.violation)

    def supervisor_gave_up_on(self, path: str) -> bool:
        parent = path.rpartition("/")[0]
        return any(
            e["kind"] == "intensity_exceeded" and e["path"] == parent for e in self.tail.events[-2000:]
        )

    def check_process(self, now: float) -> None:
        state = proc_state(self.pid)
        if state in (None, "Z"):
            self.breach("the supervisor died")
            raise SystemExit(self.report(aborted=True))
        self.rss.append((now, rss_mb(self.pid)))
        seen = set()
        for child in children_of(self.pid):
            if proc_state(child) == "Z":
                seen.add(child)
                first = self.zombies.setdefault(child, now)
                self.zombie_max = max(self.zombie_max, now - first)
                if now - first > ZOMBIE_BOUND:
                    self.breach(f"zombie {child} not reaped for {now - first:.1f}s")
                    self.zombies[child] = now  # report it once per bound
        self.zombies = {p: t for p, t in self.zombies.items() if p in seen}

    # -- main loop --

    def check_all(self, now: float) -> None:
        """The once-a-second round: ask for status (timed), check the supervisor's process,
        read new events, settle the faults that are due."""
        data = self.status()
        if data is not None:
            self.refresh(data)
        self.check_process(now)
        self.observe()
        self.judge(now)

    def run(self) -> int:
        began = time.monotonic()
        self.start()
        started_in = time.monotonic() - began
        print(f"tree of {self.leaves} processes started in {started_in:.1f}s", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        end = t0 + self.args.duration
        next_fault, next_second = t0, t0
        gap = 1.0 / self.args.rate
        while (now := time.monotonic()) < end:
            if now >= next_second:
                self.check_all(now)
                next_second += 1.0
            for due, pid in [c for c in self.continue_at if c[0] <= now]:
                self.continue_at.remove((due, pid))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            if now >= next_fault and len(self.faults) < self.args.max_faults:
                self.inject()
                next_fault += self.rng.expovariate(1.0 / gap)
            time.sleep(0.02)
        # Let the last faults play out, still checking, then stop the tree.
        for _due, pid in self.continue_at:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        settle_end = time.monotonic() + HANDLE_BOUND + 5
        while time.monotonic() < settle_end:
            self.check_all(time.monotonic())
            if all(f.judged or f.violation for f in self.faults):
                break
            time.sleep(1.0)
        self.observe()
        self.judge(time.monotonic(), final=True)
        if self.args.end == "kill":
            self.kill_and_restart()
        self.stop()
        return self.report()

    def kill_and_restart(self) -> None:
        """SIGKILL the supervisor; time until no process of the tree is left; then start it
        again on the same state dir (it must come up and answer)."""
        assert self.proc is not None
        before = len(marked(self.marker))
        began = time.monotonic()
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()
        while (left := marked(self.marker)) and time.monotonic() - began < KILL_BOUND:
            time.sleep(0.01)
        self.death = {
            "processes": before,
            "all_gone_s": round(time.monotonic() - began, 3),
            "left": len(left),
        }
        for pid, cmd in left.items():
            self.breach(f"left after the supervisor's SIGKILL: pid {pid} {cmd}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        began = time.monotonic()
        self.start()  # same state dir, same events file
        self.death["restart_all_started_s"] = round(time.monotonic() - began, 2)
        if self.status() is None:
            self.breach("the restarted supervisor does not answer status")

    def stop(self) -> None:
        began = time.monotonic()
        try:
            control.request(control.socket_path(self.state), control.Request(op="stop"), timeout=10)
        except (OSError, NotRunning) as exc:
            self.breach(f"stop request failed: {exc}")
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=STOP_BOUND)
        except subprocess.TimeoutExpired:
            self.breach(f"the tree did not stop within {STOP_BOUND}s")
            self.proc.kill()
            code = self.proc.wait()
        self.stop_s = time.monotonic() - began
        if code != 0:
            self.breach(f"the supervisor exited {code} after stop")
        deadline = time.monotonic() + 5
        while (left := marked(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid, cmd in left.items():
            self.breach(f"left after stop: pid {pid} {cmd}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # ours: it carries this run's marker
        self.observe()

    # -- report --

    def report(self, aborted: bool = False) -> int:
        events = Counter(e["kind"] for e in self.tail.events)
        rss = [mb for _, mb in self.rss]
        n = len(rss)
        warm = max(1, n // 5)
        first = rss[warm : warm + max(1, (n - warm) // 3)]
        last = rss[n - max(1, (n - warm) // 3) :]
        growth = (statistics.median(last) - statistics.median(first)) if first and last else 0.0
        if n >= 10 and growth > RSS_SLACK_MB:
            self.breach(f"supervisor RSS grew {growth:.1f} MB after warm-up")
        handled = Counter(f.kind for f in self.faults if f.judged and not f.violation)
        kills = [
            e
            for e in self.tail.events
            if e["kind"] == "health_kill" and e.get("reason") in ("hang", "memory")
        ]
        # Health kills of processes no fault was aimed at: false alarms under this load.
        unprovoked = [
            f"{e['path']} pid {e.get('pid')} ({e.get('reason')})"
            for e in kills
            if e.get("pid") not in self.by_pid
        ]
        ctl = sorted(self.control_ms)
        result = {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}",
            "backend": self.args.backend,
            "seed": self.args.seed,
            "duration_s": self.args.duration,
            "processes_in_tree": getattr(self, "leaves", 0),
            "faults_injected": dict(sorted(self.kinds.items())),
            "faults_handled": dict(sorted(handled.items())),
            "faults_total": len(self.faults),
            "events": dict(sorted(events.items())),
            "dumps_for_hang_or_memory_kills": len(kills),
            "unprovoked_health_kills": unprovoked,
            "control_status_ms": {
                "n": len(ctl),
                "p50": round(ctl[len(ctl) // 2], 2) if ctl else None,
                "p99": round(ctl[min(len(ctl) - 1, int(len(ctl) * 0.99))], 2) if ctl else None,
                "max": round(ctl[-1], 2) if ctl else None,
            },
            "supervisor_rss_mb": {
                "after_warmup": round(statistics.median(first), 1) if first else None,
                "end": round(statistics.median(last), 1) if last else None,
                "max": round(max(rss), 1) if rss else None,
            },
            "longest_zombie_s": round(self.zombie_max, 2),
            "stop_s": round(getattr(self, "stop_s", 0.0), 2),
            "supervisor_sigkill": getattr(self, "death", None),
            "aborted": aborted,
            "violations": self.violations,
            "faults": [
                {"kind": f.kind, "path": f.path, "pid": f.pid, "seen": sorted(f.seen), "ok": f.judged}
                for f in self.faults
            ],
        }
        text = json.dumps(result, indent=2)
        print(text)
        if self.args.output:
            Path(self.args.output).write_text(text + "\n")
        if self.args.markdown:
            Path(self.args.markdown).write_text(markdown(result))
        return 1 if self.violations else 0


def operator_restart(state: Path, path: str) -> None:
    """An operator restart over the control socket, from a thread of this harness: the reply
    comes only once the child is stopped and started again, and the fault loop (with its
    SIGCONTs due) must not wait for that."""

    def ask() -> None:
        with contextlib.suppress(OSError, NotRunning):
            control.request(control.socket_path(state), control.Request(op="restart", path=path), timeout=30)

    threading.Thread(target=ask, daemon=True).start()


def markdown(r: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {k} | {v} | {r['faults_handled'].get(k, 0)} |" for k, v in r["faults_injected"].items()
    )
    ctl, rss = r["control_status_ms"], r["supervisor_rss_mb"]
    return (
        f"Run {r['when']}, {r['machine']}, backend {r['backend']}, seed {r['seed']}, "
        f"{r['duration_s']:g} s, {r['processes_in_tree']} processes in the tree.\n\n"
        "| fault | injected | handled |\n|---|---:|---:|\n"
        f"{rows}\n| **total** | **{r['faults_total']}** | **{sum(r['faults_handled'].values())}** |\n\n"
        f"* control `status`: p50 {ctl['p50']} ms, p99 {ctl['p99']} ms, max {ctl['max']} ms "
        f"(n = {ctl['n']})\n"
        f"* supervisor RSS: {rss['after_warmup']} MB after warm-up, {rss['end']} MB at the end, "
        f"max {rss['max']} MB\n"
        f"* longest-lived zombie: {r['longest_zombie_s']} s; dumps for hang or memory kills: "
        f"{r['dumps_for_hang_or_memory_kills']}; stop of the whole tree: {r['stop_s']} s\n"
        f"* health kills of processes no fault was aimed at: {len(r['unprovoked_health_kills'])}"
        + "".join(f"\n  * {u}" for u in r["unprovoked_health_kills"])
        + "\n"
        + _death_line(r.get("supervisor_sigkill"))
        + f"* violations: {len(r['violations'])}"
        + ("".join(f"\n  * {v}" for v in r["violations"]) if r["violations"] else " (none)")
        + "\n"
    )


def _death_line(death: dict[str, Any] | None) -> str:
    if not death:
        return ""
    return (
        f"* supervisor SIGKILLed with {death['processes']} processes in the tree: all gone in "
        f"{death['all_gone_s']} s; started again on the same state dir, all children up in "
        f"{death.get('restart_all_started_s')} s\n"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of fault injection (default 600)")
    p.add_argument("--rate", type=float, default=3.0, help="faults per second on average (default 3)")
    p.add_argument("--max-faults", type=int, default=100_000, help="stop injecting after this many")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    p.add_argument(
        "--end",
        choices=("stop", "kill"),
        default="stop",
        help="end with an ordered stop, or SIGKILL the supervisor, restart it on the same state "
        "dir, then stop (default stop)",
    )
    p.add_argument("--output", help="write the result as JSON here")
    p.add_argument("--markdown", help="write a Markdown summary here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    soak = Soak(parse_args(argv))
    try:
        return soak.run()
    finally:
        if soak.proc is not None and soak.proc.poll() is None:
            soak.proc.kill()
            soak.proc.wait()


if __name__ == "__main__":
    sys.exit(main())
