"""The running tree as plain data: what ``otp-agents status`` shows and what SIGUSR1 logs.
Answered from current state, never through a supervisor's mailbox.

Each child's row says what it is doing and, when it is down, why: how its last instance ended
(exit code or signal, the reason, when, its last stderr lines) and, while it is restarting, when
the next start is tried. CPU is the share of one core its whole process tree used since the last
``status`` (or since it started)."""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

from otp_agents.errors import ChildNotFound
from otp_agents.health.memory import MB, rss_bytes, tree_pids
from otp_agents.proc.handle import ChildProcess
from otp_agents.runtime.tree import Tree
from otp_agents.spec.model import CommandSpec, Strategy, WorkerSpec
from otp_agents.tree.node import Slot
from otp_agents.tree.supervisor import Supervisor

_cpu_seen: dict[int, tuple[float, float]] = {}  # child pid -> (its tree's CPU seconds, when)


def status(tree: Tree, path: str = "") -> dict[str, Any]:
    """The whole tree, or the node at ``path`` (a supervisor with its subtree, or one child)."""
    now = time.monotonic()
    root = tree.root
    if path and path != root.path:
        node = tree.slot(path)  # ChildNotFound names the path
        parent = tree.supervisor(path.rpartition("/")[0])
        info = next((i for i in parent.which_children() if i.path == path), None)
        if info is None:
            raise ChildNotFound(path)
        rows = [_row(tree, parent, node, info, now)]
    else:
        rows = _rows(tree, root, now)
    out: dict[str, Any] = {"path": root.path, "strategy": root.spec.strategy.value, "children": rows}
    out["pid"] = os.getpid()
    guard = tree.host.guard
    out["containment"] = guard.containment if guard is not None else "process groups"
    out["uptime"] = round(now - root.started_at, 3)
    if path:
        out["only"] = path
    live = {r["pid"] for r in _walk(rows) if r.get("pid")}
    for gone in [pid for pid in _cpu_seen if pid not in live]:
        del _cpu_seen[gone]
    return out


def _rows(tree: Tree, sup: Supervisor, now: float) -> list[dict[str, Any]]:
    return [_row(tree, sup, sup.slots[info.id], info, now) for info in sup.which_children()]


def _row(tree: Tree, sup: Supervisor, slot: Slot, info: Any, now: float) -> dict[str, Any]:
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
        pids = tree_pids(inst.pid)
        mb = watched if watched is not None else sum(rss_bytes(p) for p in pids) / MB
        row["memory_mb"] = round(mb, 1)
        spec = slot.spec
        limit = spec.settings.memory_limit_mb if isinstance(spec, CommandSpec | WorkerSpec) else None
        if limit is not None:
            row["memory_limit_mb"] = limit  # the breaker's bound for this instance
        row["rtt_ms"] = round(inst.rtt * 1000, 3) if inst.rtt is not None else None
        row["cpu_percent"] = _cpu_percent(inst.pid, pids, now)
    if isinstance(inst, Supervisor):
        row["children"] = _rows(tree, inst, now)
        row["strategy"] = inst.spec.strategy.value
    started_with = _dynamic_args(sup, slot)
    if started_with:
        row["args"] = started_with  # what this instance was started for (a job, a room)
    if slot.last_exit is not None:
        last = slot.last_exit
        row["last_exit"] = {
            "how": last.how,
            "reason": last.reason,
            "at": round(last.at, 3),
            "detail": last.detail,
            "output": list(last.output),
        }
    if info.status == "restarting" and slot.retry_at is not None:
        row["retry_in"] = round(max(0.0, slot.retry_at - now), 3)
    return row


def _dynamic_args(sup: Supervisor, slot: Slot) -> list[str]:
    """The arguments a simple_one_for_one instance got on top of its template's."""
    if sup.spec.strategy is not Strategy.SIMPLE_ONE_FOR_ONE or not sup.spec.children:
        return []
    template, spec = sup.spec.children[0], slot.spec
    if isinstance(spec, WorkerSpec) and isinstance(template, WorkerSpec):
        return list(spec.args[len(template.args) :])
    if isinstance(spec, CommandSpec) and isinstance(template, CommandSpec):
        return list(spec.command[len(template.command) :])
    return []


def _cpu_percent(pid: int, pids: list[int], now: float) -> float | None:
    """Percent of one core used by ``pid``'s process tree since the last call (or its start)."""
    total = 0.0
    started = None
    for p in pids:
        try:
            proc = psutil.Process(p)
            times = proc.cpu_times()
            total += times.user + times.system
            if p == pid:
                started = proc.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    before = _cpu_seen.get(pid)
    _cpu_seen[pid] = (total, now)
    if before is not None and now > before[1]:
        return round(max(0.0, total - before[0]) / (now - before[1]) * 100, 1)
    if started is None:
        return None
    ran = time.time() - started
    return round(total / ran * 100, 1) if ran > 0 else None


def _walk(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for row in rows:
        out.append(row)
        out.extend(_walk(row.get("children", [])))
    return out
