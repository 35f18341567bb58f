#!/usr/bin/env python3
"""Calls per two cores: how many concurrent calls of LiveKit's ``basic_agent.py`` (byte for byte,
offline providers by configuration) this machine holds in real time, run by otp-agents against
LiveKit Agents' own worker, with CPU and memory per call.

* **otp-agents app pool**: ``app = basic_agent.py`` in a tree (a zygote, one supervised leaf per
  job forked from it, heartbeats on, the memory breaker on: ``memory_soft_mb``/``memory_limit_mb``).
* **LiveKit worker**: LiveKit Agents' own ``AgentServer.run()`` with its production defaults
  (forkserver, ``num_idle_processes`` = CPU count, load threshold 0.7, its inference process for
  the turn detector), hosted by ``workers/agents_host.py APP --server`` as the one leaf of a tree.

On both sides the providers run in the job's process: pocketsphinx (STT; ``--stt streaming``,
the default here, sets ``OTP_AGENTS_STT_STREAMING=1`` on both sides), flite (TTS), the
scripted LLM of ``tests/agents_apps/scripts/basic_agent.toml`` and LiveKit's v1-mini turn
detector. Jobs come from ``tests/livekit_standin.py`` (LiveKit's agent-worker protocol on
loopback; **not** a LiveKit server: no rooms). Each job's audio goes over LiveKit's console
transport to its caller, a :class:`~otp_agents.voice.agents_console.ConsoleCall` in this process:
a microphone streaming 10 ms frames on the wall clock (silence between utterances) and a speaker
playing each reply out in real time before acknowledging it.

Callers arrive one every ``--gap`` seconds; each waits for the greeting, then speaks ``--turns``
utterances (flite), each once the agent listens again. A refused offer (LiveKit's worker answers
"not available" above its load threshold) is offered again after 0.25 s, as long as
``TAKE_BOUND``. Measured per call size N (a fresh tree each):

* **turn latency**: the end of the caller's utterance (its last frame sent) to the first frame of
  the agent's reply audio, on this side. The app's turn detector (LiveKit's v1-mini model, on
  both sides) judges each transcript; where it judges that the caller may go on, the app waits
  its longest endpointing delay (2.5 s) instead of its shortest (0.3 s). That wait is the app's
  policy, the same under both systems, and it decides the raw figures (about 0.8 s or 2.5 s with
  one call). So the judged figure is the latency less that extra wait (``POLICY_WAIT``) on such
  turns: what the caller waits for the system, from the shortest endpointing on. Both are
  reported, with how long the turn detector's inference took (it is the heaviest step);
* **input lag**: the agent reports when it hears the caller start speaking (``user_state_changed``
  from its VAD); that delay after the utterance's first frame, less the smallest such delay of the
  whole run (the VAD's own), is how far behind real time the job's audio input is. A job that
  keeps up stays near 0; one that does not falls further behind each turn;
* **CPU**: user+system time of every process of the tree (reaped ones included, through their
  parents' counts) over the calls, per call, in % of one core;
* **memory**: PSS (``smaps_rollup``) of the whole tree, idle and at its largest during the calls;
  per call = (largest - idle) / N.

N holds in real time when every call was taken and answered every turn, the p95 of the judged
turn latency is at most 1.5 s, and no call ended (its last turn) more than 100 ms behind.

    .venv/bin/python bench/agents_capacity.py [--calls 2,4,6,8] [--systems pool,livekit]
        [--turns 4] [--gap 1.0] [--quick] [--json PATH]

Bounds are failure bounds, never speed claims. Every tree gets SIGTERM, then SIGKILL after
``STOP_BOUND``; loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import numpy as np
from restart_latency import machine

from otp_agents.health.memory import precise_bytes, tree_pids
from otp_agents.voice.agents_console import ConsoleCall
from otp_agents.voice.agents_worker_jobs import CONSOLE_KEY
from otp_agents.voice.audio import SAMPLE_RATE
from otp_agents.voice.samples import speak_flite

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the stand-in lives with the tests

from tests.livekit_standin import KEY, SECRET, StandIn, serving  # noqa: E402

APP = REPO / "tests" / "agents_apps" / "livekit" / "basic_agent.py"
SCRIPT = REPO / "tests" / "agents_apps" / "scripts" / "basic_agent.toml"
POOL, LIVEKIT = "otp-agents app pool", "LiveKit worker"
SYSTEMS = {"pool": POOL, "livekit": LIVEKIT}
PHRASES = (  # each recognised by pocketsphinx as said (checked), in this order, again from the top
    "My name is Bob.",
    "How are you today?",
    "What is the weather in Paris?",
    "Tell me a joke.",
    "Thanks a lot.",
    "What is my name?",
    "I am fine thank you.",
    "Hello there.",
)
P95_LIMIT, LAG_LIMIT = 1.5, 0.1
# The app's own endpointing (LiveKit's defaults with a streaming STT): the end of a turn comes
# min_delay after the caller's speech, or max_delay when the turn detector judges the caller may
# go on. That extra wait is the app's choice, the same on both sides, not a cost of either.
_ENDPOINTING: dict[str, Any] = {"min_delay": 0.3, "max_delay": 2.5}
with contextlib.suppress(ImportError):
    from livekit.agents.voice.turn import _STREAMING_ENDPOINTING_DEFAULTS as _ENDPOINTING  # type: ignore[assignment]
POLICY_WAIT = float(_ENDPOINTING["max_delay"]) - float(_ENDPOINTING["min_delay"])
RETRY = 0.25  # a refused offer is offered again after this (the stand-in has one worker)
# failure bounds (seconds)
START_BOUND, TAKE_BOUND, TURN_BOUND, STOP_BOUND, QUIET_BOUND = 120.0, 60.0, 60.0, 60.0, 90.0


def tree_toml(system: str, stand_in: StandIn, n: int, stt: str) -> str:
    streaming = "1" if stt == "streaming" else "0"
    env = (
        f'env = {{ LIVEKIT_URL = "{stand_in.url}", LIVEKIT_API_KEY = "{KEY}", '
        f'LIVEKIT_API_SECRET = "{SECRET}", OTP_AGENTS_STT_STREAMING = "{streaming}" }}'
    )
    head = ['id = "root"', "intensity = 3", "period = 600", "", "[[children]]"]
    if system == POOL:
        body = [
            'id = "agents"',
            f'app = "{APP}"',
            # the dispatcher takes jobs while running/max_jobs is under the app's threshold (0.7)
            f"max_jobs = {max(8, int(n / 0.7) + 2)}",
            "idle = 2",
            'providers = "offline"',
            f'llm_script = "{SCRIPT}"',
            "drain = 10",
            "health = { memory_soft_mb = 800, memory_limit_mb = 1000 }",
            env,
        ]
    else:
        args = [str(APP), "--server", "--providers", "offline", "--llm-script", str(SCRIPT)]
        body = [
            'id = "agent"',
            'module = "workers.agents_host:main"',
            f"args = {json.dumps(args)}",
            "start_timeout = 90",
            "shutdown = 10",
            f'cwd = "{REPO}"',
            env,
        ]
    return "\n".join([*head, *body]) + "\n"


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its descendants, with what they reaped."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / tick


def tree_pss(root: int) -> float:
    return sum(precise_bytes(pid, "pss") for pid in tree_pids(root)) / 2**20


@dataclass
class Call:
    job: str
    refused: int = 0
    taken: bool = False
    latencies: list[float] = field(default_factory=list)
    adjusted: list[float] = field(default_factory=list)  # less the app's wait for more (see POLICY_WAIT)
    verdicts: list[bool] = field(default_factory=list)  # the turn detector judged the turn complete
    detector: list[float] = field(default_factory=list)  # seconds each turn-detector inference took
    onsets: list[float | None] = field(default_factory=list)
    error: str = ""
    heard: list[str] = field(default_factory=list)  # what the agent transcribed
    timings: list[Any] = field(default_factory=list)  # LiveKit's own per-message latencies


class Level:
    """One tree of one system, N callers."""

    def __init__(self, system: str, n: int, args: argparse.Namespace, speech: list[np.ndarray]) -> None:
        self.system, self.n, self.args, self.speech = system, n, args, speech
        self.calls = [Call(f"J{i}") for i in range(n)]
        self.offer_lock = anyio.Lock()
        self.peak_pss = 0.0
        self.own_lag: list[float] = []

    async def run(self, tmp: Path) -> dict[str, Any]:
        async with serving() as stand_in:
            tree = tmp / "tree.toml"
            tree.write_text(tree_toml(self.system, stand_in, self.n, self.args.stt))
            log = (tmp / "stderr.log").open("wb")
            cmd = [sys.executable, "-m", "otp_agents.cli", "run", str(tree)]
            cmd += ["--state-dir", str(tmp / "state")]
            # Popen returns once the child is forked; the waits below are on the stand-in
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO)  # noqa: ASYNC220
            try:
                await stand_in.wait(lambda: stand_in.of("register"), START_BOUND)
                if not self.args.quick:  # the smoke run needs no idle figure
                    await quiet(proc.pid)
                idle_pss = tree_pss(proc.pid)
                cpu0, t0 = tree_cpu(proc.pid), time.monotonic()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._sample, proc.pid)
                    tg.start_soon(self._own_lag)
                    async with anyio.create_task_group() as callers:
                        for i, call in enumerate(self.calls):
                            callers.start_soon(self._caller, stand_in, call, i * self.args.gap)
                    cpu1, t1 = tree_cpu(proc.pid), time.monotonic()
                    tg.cancel_scope.cancel()
            finally:
                stop(proc)
                log.close()
        return self._result(idle_pss, cpu1 - cpu0, t1 - t0, (tmp / "stderr.log").read_text(errors="replace"))

    async def _own_lag(self) -> None:
        """How late this process's own loop wakes (the callers' clock): a check on the caller
        side's figures, which this process times."""
        while True:
            t = time.monotonic()
            await anyio.sleep(0.01)
            self.own_lag.append(time.monotonic() - t - 0.01)

    async def _sample(self, root: int) -> None:
        while True:
            self.peak_pss = max(self.peak_pss, await anyio.to_thread.run_sync(tree_pss, root))
            await anyio.sleep(1.0)

    async def _caller(self, stand_in: StandIn, call: Call, delay: float) -> None:
        await anyio.sleep(delay)
        console = ConsoleCall()
        async with anyio.create_task_group() as tg:
            address = await tg.start(console.serve)
            try:
                with anyio.fail_after(TAKE_BOUND):
                    await self._offer(stand_in, call, json.dumps({CONSOLE_KEY: address}))
                call.taken = True
                await console.wait_for(lambda log: bool(log.replies) and listening(log), TURN_BOUND)
                for speech in self.speech:
                    await self._turn(console, call, speech)
            except (TimeoutError, AssertionError) as exc:
                call.error = str(exc)[:300]
            call.heard = list(console.log.heard)
            call.timings = list(console.log.timings)
            tg.cancel_scope.cancel()  # hang up

    async def _offer(self, stand_in: StandIn, call: Call, metadata: str) -> None:
        while True:
            async with self.offer_lock:  # the stand-in matches one answer to one offer at a time
                if await stand_in.offer(call.job, f"room-{call.job}", metadata=metadata, caller=call.job):
                    return
            call.refused += 1
            await anyio.sleep(RETRY)

    async def _turn(self, console: ConsoleCall, call: Call, speech: np.ndarray) -> None:
        log = console.log
        await console.wait_for(listening, TURN_BOUND)
        await anyio.sleep(0.3)  # the caller's pause before speaking
        replies, heard_start = len(log.reply_started), len(log.user_speaking)
        start = time.monotonic()
        await console.say(speech, SAMPLE_RATE)
        end = time.monotonic()
        await console.wait_for(lambda lg: len(lg.reply_started) > replies, TURN_BOUND)
        reply = log.reply_started[replies]
        call.latencies.append(reply - end)
        verdicts = [v for v in log.end_of_turn if start <= v.at <= reply]
        complete = verdicts[-1].complete if verdicts else True
        call.adjusted.append(reply - end - (0.0 if complete else POLICY_WAIT))
        call.verdicts.append(complete)
        call.detector.extend(v.inference for v in verdicts)
        onset = log.user_speaking[heard_start] - start if len(log.user_speaking) > heard_start else None
        call.onsets.append(onset)
        await console.wait_for(lambda lg: len(lg.replies) > replies and listening(lg), TURN_BOUND)

    def _result(self, idle_pss: float, cpu: float, seconds: float, stderr: str) -> dict[str, Any]:
        latencies = sorted(x for c in self.calls for x in c.latencies)
        adjusted = sorted(x for c in self.calls for x in c.adjusted)
        detector = sorted(x for c in self.calls for x in c.detector)
        lag = sorted(self.own_lag) or [0.0]
        e2e = sorted(x for c in self.calls for x in judged_e2e(c))
        return {
            "system": self.system,
            "calls": self.n,
            "taken": sum(c.taken for c in self.calls),
            "complete": sum(len(c.latencies) == len(self.speech) for c in self.calls),
            "refused_offers": sum(c.refused for c in self.calls),
            "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "latency_p95_s": round(percentile(latencies, 95), 3) if latencies else None,
            "latency_max_s": round(latencies[-1], 3) if latencies else None,
            "onsets_s": [[None if o is None else round(o, 3) for o in c.onsets] for c in self.calls],
            "latencies_s": [[round(x, 3) for x in c.latencies] for c in self.calls],
            "heard": [c.heard for c in self.calls],
            "livekit_timings": [c.timings for c in self.calls],
            "complete_verdicts": [c.verdicts for c in self.calls],
            "adjusted_s": [[round(x, 3) for x in c.adjusted] for c in self.calls],
            "adjusted_p50_s": round(statistics.median(adjusted), 3) if adjusted else None,
            "adjusted_p95_s": round(percentile(adjusted, 95), 3) if adjusted else None,
            "detector_p50_s": round(statistics.median(detector), 3) if detector else None,
            "e2e_judged_p50_s": round(statistics.median(e2e), 3) if e2e else None,
            "e2e_judged_p95_s": round(percentile(e2e, 95), 3) if e2e else None,
            "caller_loop_lag_p99_ms": round(1000 * percentile(lag, 99), 1),
            "caller_loop_lag_max_ms": round(1000 * lag[-1], 1),
            "detector_max_s": round(max(detector), 3) if detector else None,
            "cpu_seconds": round(cpu, 2),
            "window_s": round(seconds, 1),
            "cpu_pct_of_core_per_call": round(100 * cpu / seconds / self.n, 1),
            "pss_idle_mib": round(idle_pss, 1),
            "pss_peak_mib": round(self.peak_pss, 1),
            "pss_per_call_mib": round((self.peak_pss - idle_pss) / self.n, 1),
            "errors": [f"{c.job}: {c.error}" for c in self.calls if c.error],
            "stderr_tail": stderr[-1500:] if any(c.error for c in self.calls) else "",
        }


def judged_e2e(call: Call) -> list[float]:
    """LiveKit's own ``e2e_latency`` of each turn's reply (the caller stopped speaking, by the
    job's VAD, to the agent's first audio, in the job), less the app's wait for more as above."""
    e2e = [t["e2e_latency"] for role, t in call.timings if role == "ASSISTANT" and "e2e_latency" in t]
    if len(e2e) != len(call.verdicts):
        return []
    return [x - (0.0 if complete else POLICY_WAIT) for x, complete in zip(e2e, call.verdicts, strict=True)]


def listening(log: Any) -> bool:
    return bool(log.states) and log.states[-1] == "AS_LISTENING"


def percentile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))]


async def quiet(root: int) -> None:
    """Until the tree uses under 20 % of a core for three 0.5 s windows in a row (its idle job
    processes are up and warm)."""
    calm = 0
    with anyio.fail_after(QUIET_BOUND):
        while calm < 3:
            before = tree_cpu(root)
            await anyio.sleep(0.5)
            calm = calm + 1 if tree_cpu(root) - before < 0.1 else 0


def stop(proc: subprocess.Popen[bytes]) -> None:
    pids = tree_pids(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_BOUND)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in pids[1:]:  # anything of this tree still there (the tree should have ended it)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def judge(levels: list[dict[str, Any]]) -> None:
    """Mark each level held or not. The lag baseline of a phrase is the smallest onset delay of
    that phrase in the whole run: how soon the VAD hears speech depends on how it begins."""
    base: dict[int, float] = {}
    for lv in levels:
        for c in lv["onsets_s"]:
            for i, o in enumerate(c):
                if o is not None:
                    k = i % len(PHRASES)
                    base[k] = min(base.get(k, o), o)
    for lv in levels:
        ends = [c[-1] - base[(len(c) - 1) % len(PHRASES)] for c in lv["onsets_s"] if c and c[-1] is not None]
        lv["lag_at_end_max_s"] = round(max(ends), 3) if ends else None
        lv["held"] = bool(
            lv["complete"] == lv["calls"]
            and lv["adjusted_p95_s"] is not None
            and lv["adjusted_p95_s"] <= P95_LIMIT
            and len(ends) == lv["calls"]
            and max(ends) <= LAG_LIMIT
        )


def table(levels: list[dict[str, Any]]) -> str:
    head = (
        "| system | calls | held | taken / complete | refused offers | turn p50 / p95 s "
        "| as measured: p50 / p95 / max s | turn detector p50 / max s | lag at end, worst s "
        "| CPU % of a core per call | PSS idle / peak MiB | PSS per call MiB |"
    )
    rows = [head, "|" + "---|" * 12]
    for lv in levels:
        rows.append(
            f"| {lv['system']} | {lv['calls']} | {'yes' if lv['held'] else 'no'} "
            f"| {lv['taken']} / {lv['complete']} | {lv['refused_offers']} "
            f"| {lv['adjusted_p50_s']} / {lv['adjusted_p95_s']} "
            f"| {lv['latency_p50_s']} / {lv['latency_p95_s']} / {lv['latency_max_s']} "
            f"| {lv['detector_p50_s']} / {lv['detector_max_s']} "
            f"| {lv['lag_at_end_max_s']} | {lv['cpu_pct_of_core_per_call']} "
            f"| {lv['pss_idle_mib']} / {lv['pss_peak_mib']} | {lv['pss_per_call_mib']} |"
        )
    return "\n".join(rows)


async def amain(args: argparse.Namespace) -> list[dict[str, Any]]:
    speech = [speak_flite(PHRASES[i % len(PHRASES)], "kal16") for i in range(args.turns)]
    levels: list[dict[str, Any]] = []
    for key in args.systems:
        for n in args.calls:
            with tempfile.TemporaryDirectory(prefix="otp-capacity-", dir=args.keep) as tmp:
                print(f"{SYSTEMS[key]}: {n} calls ...", file=sys.stderr, flush=True)
                result = await Level(SYSTEMS[key], n, args, speech).run(Path(tmp))
                if args.keep:
                    with contextlib.suppress(OSError):
                        os.rename(tmp, f"{tmp}-{key}-{n}")  # kept: the tree, its stderr and state
            levels.append(result)
            judge(levels)
            print(table([result]).splitlines()[-1], file=sys.stderr, flush=True)
            if not result["held"] and not args.all:
                break
    return levels


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--calls", default="2,4,6,8,10", help="call counts to try, ascending")
    p.add_argument("--systems", default="pool,livekit", help="pool, livekit or both")
    p.add_argument("--turns", type=int, default=4, help="utterances per call (the phrases in turn)")
    p.add_argument("--gap", type=float, default=1.0, help="seconds between two callers' arrivals")
    p.add_argument(
        "--stt",
        choices=["streaming", "whole"],
        default="streaming",
        help="the offline recogniser on both sides: decoding while the caller speaks, or each "
        "utterance once it ended (the default in the product)",
    )
    p.add_argument("--all", action="store_true", help="try every count, even after one that failed")
    p.add_argument("--quick", action="store_true", help="one call of one turn per system (a smoke run)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--keep", metavar="DIR", help="keep each tree's files under DIR")
    args = p.parse_args(argv)
    args.calls = [1] if args.quick else [int(x) for x in args.calls.split(",")]
    args.turns = 1 if args.quick else args.turns
    args.systems = [s.strip() for s in args.systems.split(",")]
    if unknown := [s for s in args.systems if s not in SYSTEMS]:
        p.error(f"--systems: unknown {', '.join(unknown)} (pool, livekit)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = anyio.run(amain, args)
    out = {"machine": machine(), "args": sys.argv[1:], "levels": levels}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(table(levels))
    return 0 if all(lv["complete"] == lv["calls"] for lv in levels if lv["calls"] == min(args.calls)) else 1


if __name__ == "__main__":
    sys.exit(main())
