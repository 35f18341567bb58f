"""The wall time of `otp-agents status` against `supervisorctl status`, as an operator sees it:
the whole command, from exec to exit, its interpreter's start and imports included.

Two scenarios, each run on both tools in the same run, alternating A B A B so a drift of the
machine's speed hits both alike:

* idle: 5 children that sleep;
* storm: 50 children that exit with code 1 after 50 ms, restarted at once, forever.

    .venv/bin/python bench/cli_status.py [--runs 100] [--storm 50] [--output results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SLEEPER = "sleep 1000"
CRASHER = "sleep 0.05; exit 1"


@contextmanager
def otp_agents(tmp: Path, n: int, program: str) -> Iterator[list[str]]:
    tree = tmp / "tree.toml"
    lines = ["intensity = 1000000", "period = 1"]
    for i in range(n):
        lines += ["[[children]]", f'id = "c{i}"', f'command = ["sh", "-c", "{program}"]', "shutdown = 2"]
    tree.write_text("\n".join(lines) + "\n")
    state = tmp / "otp-state"
    argv = [str(BIN / "otp-agents"), "run", str(tree), "--state-dir", str(state), "--log-level", "error"]
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: (state / "control.sock").exists(), proc)
        yield [str(BIN / "otp-agents"), "status", "--state-dir", str(state)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


@contextmanager
def supervisord(tmp: Path, n: int, program: str) -> Iterator[list[str]]:
    conf = tmp / "supervisord.conf"
    sock = tmp / "supervisor.sock"
    text = (
        f"[unix_http_server]\nfile={sock}\n\n[supervisord]\nnodaemon=true\nlogfile={tmp}/supervisord.log\n"
        f"pidfile={tmp}/supervisord.pid\nchildlogdir={tmp}\n\n[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
        f"[supervisorctl]\nserverurl=unix://{sock}\n\n"
    )
    for i in range(n):
        text += (
            f"[program:c{i}]\ncommand=sh -c '{program}'\nautorestart=true\nstartsecs=0\n"
            "startretries=1000000\nstopwaitsecs=2\n\n"
        )
    conf.write_text(text)
    proc = subprocess.Popen([str(BIN / "supervisord"), "-c", str(conf)], stderr=subprocess.DEVNULL)
    ctl = [str(BIN / "supervisorctl"), "-c", str(conf), "status"]
    try:
        _wait(lambda: subprocess.run(ctl, capture_output=True, check=False).returncode in (0, 3), proc)
        yield ctl
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def _wait(ready: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the supervisor did not start")
        time.sleep(0.05)


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    took = time.perf_counter() - t0
    if done.returncode not in (0, 3):  # supervisorctl says 3 when a program is not running
        raise RuntimeError(f"{argv[0]} exited {done.returncode}")
    return took


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]

    return {
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "p90_ms": round(pick(0.9) * 1000, 1),
        "p99_ms": round(pick(0.99) * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def scenario(name: str, n: int, program: str, runs: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="cli-status-") as tmp:
        base = Path(tmp)
        (base / "o").mkdir()
        (base / "s").mkdir()
        with otp_agents(base / "o", n, program) as ours, supervisord(base / "s", n, program) as theirs:
            time.sleep(1.0)  # let a storm get going
            a: list[float] = []
            b: list[float] = []
            for _ in range(runs):
                a.append(timed(ours))
                b.append(timed(theirs))
    return {
        "scenario": name,
        "children": n,
        "runs": runs,
        "otp-agents": summary(a),
        "supervisorctl": summary(b),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--storm", type=int, default=50, help="children crash-looping in the storm")
    parser.add_argument("--output", help="also write the results as JSON")
    args = parser.parse_args()
    results = [
        scenario("idle", 5, SLEEPER, args.runs),
        scenario("storm", args.storm, CRASHER, args.runs),
    ]
    print(f"machine: {os.cpu_count()} cores; {args.runs} runs of each tool per scenario, alternating")
    print("| scenario | children | tool | median ms | p90 | p99 | max |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in results:
        for tool in ("otp-agents", "supervisorctl"):
            s = r[tool]
            assert isinstance(s, dict)
            print(
                f"| {r['scenario']} | {r['children']} | `{tool} status` | {s['median_ms']} | {s['p90_ms']} "
                f"| {s['p99_ms']} | {s['max_ms']} |"
            )
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
