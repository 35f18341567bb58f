"""``otp-agents status`` as a table: a header row, one row per child (indented by depth inside a
fixed-width first column, so the other columns never drift), and under a child that is down the
reason in its own words (the last line of its stderr, or the start error)."""

from __future__ import annotations

import time
from typing import Any

import click

COLUMNS = ("PATH", "STATE", "PID", "UPTIME", "RESTARTS", "LAST EXIT", "RETRY IN", "CPU", "MEM", "RTT")
_COLOURS = {"running": "green", "stopped": "yellow", "restarting": "red", "held": "blue"}
_Row = tuple[list[str], str, list[str]]  # cells, state, notes shown under the row


def render(data: dict[str, Any], colour: bool, now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    head = f"{data['path']}  supervisor {data['strategy']}  pid {data['pid']}  up {age(data['uptime'])}"
    head += f"  contained by {data.get('containment', '-')}"
    rows: list[_Row] = []
    _collect(data["children"], 0, rows, now)
    widths = [max([len(h)] + [len(r[0][i]) for r in rows]) for i, h in enumerate(COLUMNS)]
    lines = [head, _join(list(COLUMNS), widths)]
    for cells, state, notes in rows:
        line = _join(cells, widths)
        if colour and state in _COLOURS:
            start = widths[0] + 2
            line = (
                line[:start]
                + click.style(cells[1].ljust(widths[1]), fg=_COLOURS[state])
                + line[start + widths[1] :]
            )
        lines.append(line.rstrip())
        lines.extend(f"{' ' * (len(cells[0]) - len(cells[0].lstrip()) + 4)}{note}" for note in notes)
    return lines


def _collect(
    children: list[dict[str, Any]], depth: int, rows: list[tuple[list[str], str, list[str]]], now: float
) -> None:
    for c in children:
        state = c["status"]
        last = c.get("last_exit")
        cells = [
            "  " * depth + c["path"],
            state,
            str(c["pid"]) if c.get("pid") else "-",
            age(c["uptime"]) if c.get("uptime") is not None else "-",
            str(c["restarts"]),
            f"{last['how']} ({last['reason']}) {age(max(0.0, now - last['at']))} ago" if last else "-",
            age(c["retry_in"]) if c.get("retry_in") is not None else "-",
            f"{c['cpu_percent']:.1f}%" if c.get("cpu_percent") is not None else "-",
            _memory(c),
            f"{c['rtt_ms']:.2f}ms" if c.get("rtt_ms") is not None else "-",
        ]
        notes: list[str] = []
        if c.get("args"):
            notes.append("for: " + " ".join(c["args"]))
        if last and state != "running":
            said = [line for line in last.get("output", []) if line.strip()]
            if last.get("detail"):
                notes.append(f"why: {last['detail']}")
            if said:
                notes.append(f"stderr: {said[-1].strip()}")
        rows.append((cells, state, notes))
        if "children" in c:
            _collect(c["children"], depth + 1, rows, now)


def _memory(c: dict[str, Any]) -> str:
    if c.get("memory_mb") is None:
        return "-"
    limit = c.get("memory_limit_mb")
    return f"{c['memory_mb']:.1f}MB" + (f"/{limit:g}" if limit is not None else "")


def _join(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True))


def age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{seconds:.1f}s" if s < 10 else f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"
