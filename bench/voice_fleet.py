"""Voice leaves on this machine: per-turn latency, CPU and memory per leaf, and how many
concurrent calls the machine holds in real time.

For each fleet size N it writes a tree of N voice leaves (workers/voice_agent.py, the offline
stack: Silero VAD, pocketsphinx, flite, rule agent), each holding the same real-time call of
four turns spoken by flite, runs it with the real CLI until every call is over, and reads:

* turn latency: end of the caller's speech -> first agent audio, on the call's clock (includes
  the 0.5 s minimum endpointing delay; ``processing`` is the rest: STT end, agent, first TTS);
* input lateness: how far behind real time a leaf's audio input was, at its worst moment and
  at the end of the call (a leaf that keeps up ends near 0 whatever its hiccups; one that does
  not falls further behind every second);
* CPU: user+sys of the whole run (supervisor, leaves and their flite processes) per call-second;
* memory: peak RSS and PSS of each leaf process, sampled every 0.5 s from /proc.

A fleet size "holds in real time" when every leaf ended its call less than 100 ms behind real
time and the 95th-percentile turn latency stayed under 1.5 s.

    .venv/bin/python bench/voice_fleet.py [--leaves 1,2,4,8,12,16] [--quick] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from otp_agents import linux
from otp_agents.health import memory

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """\
Remember the number seven.
My favorite color is green.
What is my favorite color?
What number did I tell you?
"""
QUICK_SCRIPT = "What is my favorite color?\n"
LATE_LIMIT = 0.1
P95_LIMIT = 1.5


def _tree(tmp: Path, n: int, script: Path, begin: float, spread: float, inference: bool) -> Path:
    lines = ['id = "root"', 'auto_shutdown = "any_significant"', "intensity = 0", "period = 60"]
    if inference:
        lines += [
            "[[children]]",
            'id = "inference"',
            'module = "workers.inference_server:main"',
            'args = ["--pool", "2"]',
            "start_timeout = 60",
            f'cwd = "{ROOT}"',
        ]
    lines += [
        "[[children]]",
        'id = "calls"',
        'restart = "transient"',
        "significant = true",
        'auto_shutdown = "all_significant"',
        "intensity = 0",
        "period = 60",
    ]
    for i in range(n):
        lines += [
            "  [[children.children]]",
            f'  id = "leaf-{i}"',
            '  module = "workers.voice_agent:main"',
            f'  args = ["--conversation", "{script}", "--out", "{tmp / "out" / f"leaf-{i}"}", '
            f'"--caller-voice", "rms", "--begin-at", "{begin + i * spread / n:.3f}"'
            + (', "--inference"]' if inference else "]"),
            '  restart = "transient"',
            "  significant = true",
            "  start_timeout = 60",
            f'  cwd = "{ROOT}"',
        ]
    tree = tmp / "tree.toml"
    tree.write_text("\n".join(lines) + "\n")
    return tree


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _processes(supervisor: int) -> tuple[list[int], list[int]]:
    """(voice leaves, inference processes: the server and its recognisers), not the supervisor's
    orphan guard (a fork of itself) nor the short-lived flite processes."""
    leaves, inference = [], []
    for child in linux.child_pids(supervisor):
        cmd = _cmdline(child)
        if b"voice_agent" in cmd:
            leaves.append(child)
        elif b"inference_server" in cmd:
            inference.append(child)
            inference += [g for g in linux.child_pids(child) if b"recognizer_proc" in _cmdline(g)]
    return leaves, inference


def _mem_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB, read the way the supervisor's memory breaker reads them."""
    return memory.rss_bytes(pid) // 1024, memory.precise_bytes(pid, "pss") // 1024


def run_fleet(n: int, script_text: str, spread: float, inference: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="otp-voice-bench-") as tmp_name:
        tmp = Path(tmp_name)
        script = tmp / "call.txt"
        script.write_text(script_text)
        # Render the caller once, so the N leaves do not all synthesize it at the same time.
        from otp_agents.voice.samples import render_script

        for i in range(n):
            render_script(script, tmp / "out" / f"leaf-{i}", voice="rms")
        # Every call starts once every leaf is up (a leaf takes ~0.7 s to load its models), at
        # phases spread evenly over ``spread`` seconds: all calls run at the same time.
        tree = _tree(tmp, n, script, time.time() + 5.0 + 0.9 * n, spread, inference)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "otp_agents.cli", "run", str(tree), "--state-dir", str(tmp / "state")],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        peaks: dict[int, tuple[int, int]] = {}
        total_pss_peak = 0  # kB: every leaf plus the inference server and its recognisers
        inference_pss_peak = 0
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            leaves, serving = _processes(proc.pid)
            total = 0
            for leaf in leaves:
                rss, pss = _mem_kb(leaf)
                old = peaks.get(leaf, (0, 0))
                peaks[leaf] = (max(old[0], rss), max(old[1], pss))
                total += pss
            served = sum(_mem_kb(p)[1] for p in serving)
            inference_pss_peak = max(inference_pss_peak, served)
            total_pss_peak = max(total_pss_peak, total + served)
            time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"fleet of {n} failed ({proc.returncode}): {err.decode()[-2000:]}")
        latencies: list[float] = []
        processing: list[float] = []
        late: list[float] = []
        lag: list[float] = []
        call_seconds = 0.0
        for i in range(n):
            events = [
                json.loads(line)
                for line in (tmp / "out" / f"leaf-{i}" / "events.jsonl").read_text().splitlines()
                if line.strip()
            ]
            for e in events:
                if e["kind"] == "turn":
                    latencies.append(e["value"])
                    processing.append(e["value"] - 0.5)
                elif e["kind"] == "input_finished":
                    late.append(e.get("late") or 0.0)
                    lag.append(e.get("lag") or 0.0)
                    call_seconds += e["t"]
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        rss_kb = sorted(v[0] for v in peaks.values())
        pss_kb = sorted(v[1] for v in peaks.values())
        q = (
            statistics.quantiles(latencies, n=20, method="inclusive")
            if len(latencies) >= 2
            else latencies * 19
        )
        result = {
            "leaves": n,
            "turns": len(latencies),
            "latency_median_s": round(statistics.median(latencies), 3),
            "latency_p95_s": round(q[18], 3),
            "latency_max_s": round(max(latencies), 3),
            "processing_median_ms": round(1000 * statistics.median(processing), 1),
            "input_late_max_ms": round(1000 * max(late), 1),
            "input_lag_end_max_ms": round(1000 * max(lag), 1),
            "latencies": [round(x, 3) for x in latencies],
            "cpu_s": round(cpu, 2),
            "call_seconds": round(call_seconds, 1),
            "cpu_per_call_second_pct": round(100 * cpu / call_seconds, 1) if call_seconds else None,
            "wall_s": round(wall, 1),
            "spread_s": spread,
            "rss_median_mb": round(statistics.median(rss_kb) / 1024, 1) if rss_kb else None,
            "pss_median_mb": round(statistics.median(pss_kb) / 1024, 1) if pss_kb else None,
            "real_time": bool(max(lag) < LATE_LIMIT and q[18] < P95_LIMIT),
            "inference": inference,
            "inference_pss_mb": round(inference_pss_peak / 1024, 1),
            "total_pss_mb": round(total_pss_peak / 1024, 1),
        }
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--leaves", default="1,2,4,8,12,16")
    parser.add_argument("--quick", action="store_true", help="one leaf, one turn (a smoke run)")
    parser.add_argument(
        "--spread",
        type=float,
        default=4.0,
        help="calls start at phases spread over this many seconds (0: in step)",
    )
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--inference",
        action="store_true",
        help="leaves use the shared inference process instead of local STT",
    )
    args = parser.parse_args()
    sizes = [1] if args.quick else [int(x) for x in args.leaves.split(",")]
    script = QUICK_SCRIPT if args.quick else SCRIPT
    results = []
    for n in sizes:
        r = run_fleet(n, script, args.spread, args.inference)
        results.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}")
    print(
        "| leaves | turns | latency median | p95 | max | processing median | input late: worst / at end "
        "| CPU per call-second | RSS / PSS per leaf | PSS of all | real time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['leaves']} | {r['turns']} | {r['latency_median_s']} s | {r['latency_p95_s']} s "
            f"| {r['latency_max_s']} s | {r['processing_median_ms']} ms "
            f"| {r['input_late_max_ms']} / {r['input_lag_end_max_ms']} ms "
            f"| {r['cpu_per_call_second_pct']} % | {r['rss_median_mb']} / {r['pss_median_mb']} MB "
            f"| {r['total_pss_mb']} MB "
            f"| {'yes' if r['real_time'] else 'no'} |"
        )
    if args.output:
        args.output.write_text(json.dumps({"voice_fleet": results}, indent=2))


if __name__ == "__main__":
    main()
