"""How fast the control socket answers `status` while children crash-loop.

Runs the real CLI (`otp-agents run`) with N plain-command children that each exit with code 1
after a short sleep, forever (one_for_one, intensity high enough never to give up), and times
`status` requests over the control socket from this process, back to back.

    .venv/bin/python bench/control_latency.py [--children 50] [--requests 300] [--backend asyncio]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from otp_agents.ops import control_client as control

ROOT = Path(__file__).resolve().parent.parent


def run(children: int, requests: int, backend: str) -> dict[str, float | int | str]:
    with tempfile.TemporaryDirectory(prefix="otp-ctl-bench-") as tmp:
        tree = Path(tmp) / "tree.toml"
        lines = ["intensity = 1000000", "period = 1"]
        for i in range(children):
            lines += ["[[children]]", f'id = "c{i}"', 'command = ["sh", "-c", "sleep 0.05; exit 1"]']
        tree.write_text("\n".join(lines) + "\n")
        state = Path(tmp) / "state"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "otp_agents.cli",
                "run",
                str(tree),
                "--backend",
                backend,
                "--state-dir",
                str(state),
                "--log-level",
                "error",
            ],
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        try:
            sock = control.socket_path(state)
            deadline = time.monotonic() + 120
            while not sock.exists():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the supervisor did not start")
                time.sleep(0.05)
            restarts: list[int] = [_restarts(sock)]
            started = time.monotonic()
            time.sleep(1.0)  # let the storm get going
            times: list[float] = []
            for _ in range(requests):
                t0 = time.perf_counter()
                (reply,) = control.request(sock, control.Request(op="status"), timeout=60)
                times.append(time.perf_counter() - t0)
                assert reply.ok and len(reply.data["children"]) == children
                restarts.append(sum(c["restarts"] for c in reply.data["children"]))
            window = time.monotonic() - started
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    times.sort()
    return {
        "backend": backend,
        "children": children,
        "requests": requests,
        "restarts_per_second_during": round((restarts[-1] - restarts[0]) / window, 1),
        "median_ms": round(statistics.median(times) * 1000, 3),
        "p90_ms": round(times[int(len(times) * 0.9)] * 1000, 3),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 3),
        "max_ms": round(times[-1] * 1000, 3),
    }


def _restarts(sock: Path) -> int:
    (reply,) = control.request(sock, control.Request(op="status"), timeout=60)
    return sum(int(c["restarts"]) for c in reply.data["children"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--children", type=int, default=50)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    parser.add_argument("--output", help="also write the results as JSON")
    args = parser.parse_args()
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    results = [run(args.children, args.requests, b) for b in backends]
    print("| backend | children crash-looping | restarts/s during | status median ms | p90 | p99 | max |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['backend']} | {r['children']} | {r['restarts_per_second_during']} | {r['median_ms']} "
            f"| {r['p90_ms']} | {r['p99_ms']} | {r['max_ms']} |"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
