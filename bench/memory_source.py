#!/usr/bin/env python3
"""What one memory sample of one child costs: from its memory cgroup against from /proc.

One child (a Python process holding 50 MB, with one subprocess of its own, so its tree has two
processes) is placed in a memory cgroup of its own before it allocates (cgroup v1's memory
controller, as the tree does on these hybrid machines). Each way of reading its memory is then
timed over ``--samples`` reads, in this process, one after another:

* **cgroup**: the working set, ``memory.usage_in_bytes`` less ``total_inactive_file`` from
  ``memory.stat``, both kept open (what the breaker reads where the child has a memory cgroup);
* **/proc statm**: resident pages of each process of the tree, from ``/proc/PID/statm`` kept
  open, re-listing the tree every 5th sample (the breaker's cheap path);
* **/proc pss**: the same tree's PSS from ``/proc/PID/smaps_rollup`` (the breaker's precise
  read, taken near a threshold).

    .venv/bin/python bench/memory_source.py [--samples 20000]

Needs a writable cgroup v1 memory controller (root on these machines); says so otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from otp_agents.health.memory import precise_bytes, tree_pids  # noqa: E402
from otp_agents.proc.memcg import MemoryGroups  # noqa: E402

CHILD = (
    "import subprocess, sys, time\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"  # moved into its cgroup: now its working set
    "hold = bytearray(50 * 1024 * 1024)\n"
    "for i in range(0, len(hold), 4096): hold[i] = 1\n"
    "sub = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


def timed(read: Callable[[], float], samples: int) -> dict[str, float]:
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(samples // 5):
            read()
        runs.append((time.perf_counter() - start) / (samples // 5) * 1e6)
    return {"us_per_sample_median": round(statistics.median(runs), 2), "us_min": round(min(runs), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=20000)
    args = parser.parse_args()
    groups, where = MemoryGroups.create()
    if groups is None:
        raise SystemExit(f"no memory cgroup can be made here: {where}")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdin is not None and child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        group = groups.child("bench", child.pid)  # as the tree does, before it allocates
        assert group is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "ready"
        pids = tree_pids(child.pid)
        statm = {pid: os.open(f"/proc/{pid}/statm", os.O_RDONLY) for pid in pids}
        page = os.sysconf("SC_PAGE_SIZE")
        count = [0]

        def by_cgroup() -> float:
            return float(group.working_set_bytes() or 0)

        def by_statm() -> float:
            count[0] += 1
            if count[0] % 5 == 0:
                tree_pids(child.pid)
            return float(sum(int(os.pread(fd, 256, 0).split()[1]) * page for fd in statm.values()))

        def by_pss() -> float:
            return float(sum(precise_bytes(pid, "pss") for pid in pids))

        result = {
            "processes_in_tree": len(pids),
            "cgroup_working_set_mb": round(by_cgroup() / 2**20, 1),
            "proc_rss_mb": round(by_statm() / 2**20, 1),
            "proc_pss_mb": round(by_pss() / 2**20, 1),
            "cgroup": timed(by_cgroup, args.samples),
            "proc_statm": timed(by_statm, args.samples),
            "proc_pss": timed(by_pss, max(args.samples // 10, 5)),
        }
        for fd in statm.values():
            os.close(fd)
    finally:
        for pid in reversed(tree_pids(child.pid)):
            os.kill(pid, 9)
        child.wait()
        time.sleep(0.1)
        groups.remove()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
