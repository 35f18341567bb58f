"""Stack dumps taken inside a worker: every thread, and every task of the running event loop.

Used by the worker library to answer a ``DumpRequest``. The signal route (faulthandler, see
``worker.py``) covers the cases where this cannot run: a blocked event loop or C code holding
the GIL.
"""

from __future__ import annotations

import sys
import threading
import traceback
from types import FrameType
from typing import Any

import sniffio


def render() -> str:
    parts = [_threads(), _tasks()]
    return "\n".join(p for p in parts if p)


def _threads() -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    current = threading.get_ident()
    for ident, frame in sys._current_frames().items():
        label = names.get(ident, "?")
        mark = " (answering this dump)" if ident == current else ""
        out.append(f"Thread {ident:#x} {label}{mark} (most recent call last):")
        out.append("".join(traceback.format_stack(frame)).rstrip())
    return "\n".join(out)


def _tasks() -> str:
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return ""
    if library == "asyncio":
        return _asyncio_tasks()
    if library == "trio":
        return _trio_tasks()
    return ""


def _asyncio_tasks() -> str:
    import asyncio

    out = []
    for task in asyncio.all_tasks():
        out.append(f"Task {task.get_name()} (most recent call last):")
        frames = _await_chain(task.get_coro())
        out.append(_format_frames(frames) or "  <no Python frames: not started or done>")
    return "\n".join(out)


def _await_chain(coro: Any) -> list[FrameType]:
    """The frames of a suspended coroutine and of everything it awaits, outermost first."""
    frames: list[FrameType] = []
    seen = 0
    while coro is not None and seen < 256:
        seen += 1
        frame = (
            getattr(coro, "cr_frame", None)
            or getattr(coro, "gi_frame", None)
            or getattr(coro, "ag_frame", None)
        )
        if frame is None:
            break
        frames.append(frame)
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "gi_yieldfrom", None)
            or getattr(coro, "ag_await", None)
        )
    return frames


def _trio_tasks() -> str:
    import trio

    out: list[str] = []

    def walk(task: Any, depth: int) -> None:
        out.append(f"{'  ' * depth}Task {task.name} (most recent call last):")
        frames = _await_chain(task.coro)
        out.append(_format_frames(frames, indent="  " * (depth + 1)) or f"{'  ' * (depth + 1)}<no frames>")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)
    return "\n".join(out)


def _format_frames(frames: list[FrameType], indent: str = "  ") -> str:
    lines = []
    for frame in frames:
        code = frame.f_code
        lines.append(f'{indent}File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}')
    return "\n".join(lines)
