"""The whole running tree as plain data: what ``otp-agents status`` shows and what SIGUSR1 logs.
Answered from current state, never through a supervisor's mailbox."""

from __future__ import annotations

import os
import time
from typing import Any

from otp_agents.health.memory import MB, rss_bytes, tree_pids
from otp_agents.proc.handle import ChildProcess
from otp_agents.runtime.tree import Tree
from otp_agents.tree.supervisor import Supervisor


def status(tree: Tree) -> dict[str, Any]:
    """The whole tree as plain data (what ``otp-agents status`` shows)."""
    now = time.monotonic()

    def sup_row(sup: Supervisor) -> dict[str, Any]:
        children = []
        for info in sup.which_children():
            slot = sup.slots[info.id]
            row: dict[str, Any] = {
                "id": info.id,
                "path": info.path,
                "kind": info.kind,
                "status": info.status,
                "pid": info.pid,
                "uptime": round(now - info.started_at, 3) if info.started_at else None,
                "restarts": info.restarts,
            }
            inst = slot.instance
            if isinstance(inst, ChildProcess):
                watched = tree.host.memory.last_mb(inst)
                mb = watched if watched is not None else sum(rss_bytes(p) for p in tree_pids(inst.pid)) / MB
                row["memory_mb"] = round(mb, 1)
                row["rtt_ms"] = round(inst.rtt * 1000, 3) if inst.rtt is not None else None
            if isinstance(inst, Supervisor):
                row["children"] = sup_row(inst)["children"]
                row["strategy"] = inst.spec.strategy.value
            children.append(row)
        return {"path": sup.path, "strategy": sup.spec.strategy.value, "children": children}

    root = sup_row(tree.root)
    root["pid"] = os.getpid()
    guard = tree.host.guard
    root["containment"] = guard.containment if guard is not None else "process groups"
    root["uptime"] = round(now - tree.root.started_at, 3)
    return root
