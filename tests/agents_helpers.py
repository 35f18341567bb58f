"""Following a real ``otp-agents run`` from a test: its events (``--events`` JSON lines), its
stderr, its exit."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

BOUND = 120.0  # failure bound for a job's process to start and run; never a speed claim

Events = list[dict[str, Any]]


@dataclass
class Hosted:
    proc: subprocess.Popen[bytes]
    events_file: Path
    log: Path

    def events(self) -> Events:
        if not self.events_file.exists():
            return []
        return [json.loads(line) for line in self.events_file.read_text().splitlines() if line.strip()]

    async def until(self, pred: Callable[[Events], Any], what: str) -> Any:
        with anyio.fail_after(BOUND):
            while not (found := pred(self.events())):
                if self.proc.poll() is not None:
                    raise AssertionError(f"{what}: otp-agents exited ({self.proc.returncode}): {self.tail()}")
                await anyio.sleep(0.05)
        return found

    async def ended(self) -> int:
        with anyio.fail_after(BOUND):
            while self.proc.poll() is None:  # noqa: ASYNC110 - another process's exit has no wakeup here
                await anyio.sleep(0.05)
        return self.proc.returncode

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]
