"""Following a real ``otp-agents run`` from a test: its events (``--events`` JSON lines), its
stderr, its exit; and a LiveKit Agents app pool run that way, its jobs offered by the protocol
stand-in (tests/livekit_standin.py), each job's caller a :class:`ConsoleCall`."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from otp_agents.voice.agents_console import CallLog, ConsoleCall
from otp_agents.voice.agents_leaf import CONSOLE_KEY
from otp_agents.voice.audio import SAMPLE_RATE
from otp_agents.voice.samples import speak_flite

from .helpers import ROOT, run_cli
from .livekit_standin import KEY, SECRET, StandIn, serving

BOUND = 120.0  # failure bound for a job's process to start and run; never a speed claim

Events = list[dict[str, Any]]
APPS = ROOT / "tests" / "agents_apps"
EXAMPLES = APPS / "livekit"
SCRIPTS = APPS / "scripts"
SAMPLE = ROOT / "workers" / "livekit_agents_app" / "agent.py"
JOBS = "root/agents/jobs"


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


def pool_tree(
    server: StandIn | tuple[str, str, str],
    app: Path,
    script: Path | None,
    max_jobs: int,
    extra: str,
    env: dict[str, str],
) -> str:
    """The tree: one app pool, its dispatcher registered with ``server`` (the stand-in, or a
    real server's url, key and secret)."""
    llm = f'llm_script = "{script}"' if script else ""
    url, key, secret = (server.url, KEY, SECRET) if isinstance(server, StandIn) else server
    env = {"LIVEKIT_URL": url, "LIVEKIT_API_KEY": key, "LIVEKIT_API_SECRET": secret, **env}
    env_table = ", ".join(f"{k} = {json.dumps(v)}" for k, v in env.items())
    return f"""
id = "root"
intensity = 3
period = 600

[[children]]
id = "agents"
app = "{app}"
max_jobs = {max_jobs}
idle = 1
providers = "offline"
{llm}
drain = 60
env = {{ {env_table} }}
{extra}
"""


class Pool:
    def __init__(self, run: Hosted, stand_in: StandIn, tree: Path) -> None:
        self.run = run
        self.stand_in = stand_in
        self.tree = tree
        self.calls: dict[str, ConsoleCall] = {}
        self.lines: dict[str, anyio.CancelScope] = {}

    def hang_up(self, job: str) -> None:
        self.lines[job].cancel()

    def started(self, job: str) -> list[dict[str, Any]]:
        """The child_started events of the leaf holding ``job`` (its args name the job)."""
        paths = {
            e["path"]
            for e in self.run.events()
            if e["kind"] == "worker_log"
            and e["path"].startswith(JOBS + "/")
            and f"job {job} " in e.get("detail", "")
        }
        return [e for e in self.run.events() if e["kind"] == "child_started" and e["path"] in paths]

    async def leaf(self, job: str, count: int = 1) -> dict[str, Any]:
        """The ``count``-th start of ``job``'s leaf."""
        found = await self.run.until(lambda _ev: self.started(job)[count - 1 :], f"start {count} of {job}")
        return dict(found[0])

    async def call(self, job: str, tg: Any, room: str = "", *, accepted: bool = True) -> ConsoleCall:
        """Offer ``job`` with a console peer of its own; return that peer (the caller)."""
        call = ConsoleCall()
        scope = self.lines[job] = anyio.CancelScope()

        async def line(*, task_status: anyio.abc.TaskStatus[str]) -> None:
            with scope:
                await call.serve(task_status=task_status)

        address = await tg.start(line)
        self.calls[job] = call
        metadata = json.dumps({CONSOLE_KEY: address})
        answer = await self.stand_in.offer(
            job, room or f"room-{job}", metadata=metadata, caller=f"caller-{job}"
        )
        assert answer is accepted
        return call

    def stderr(self) -> str:
        return self.run.log.read_text(errors="replace")


@asynccontextmanager
async def pool(
    tmp: Path,
    app: Path = SAMPLE,
    script: Path | None = None,
    *,
    max_jobs: int = 3,
    extra: str = "",
    env: dict[str, str] | None = None,
) -> AsyncIterator[tuple[Pool, anyio.abc.TaskGroup]]:
    async with serving() as stand_in, anyio.create_task_group() as tg:
        tree = tmp / "tree.toml"
        tree.write_text(pool_tree(stand_in, app, script, max_jobs, extra, env or {}))
        events, log = tmp / "events.jsonl", tmp / "stderr.log"
        proc = run_cli(tree, tmp / "state", events, "asyncio", log)
        run = Hosted(proc, events, log)
        try:
            await stand_in.wait(lambda: stand_in.of("register"), BOUND)
            yield Pool(run, stand_in, tree), tg
        finally:
            tg.cancel_scope.cancel()  # the callers hang up: their jobs end
            with anyio.CancelScope(shield=True):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    await run.ended()


def greeted(log: CallLog) -> bool:
    return len(log.said) >= 1 and log.states[-1:] == ["AS_LISTENING"]


async def say(call: ConsoleCall, text: str, replies: int = 1) -> None:
    await call.wait_for(lambda log: log.states[-1:] == ["AS_LISTENING"], BOUND)
    before = len(call.log.said)
    await call.say(speak_flite(text, "kal16"), SAMPLE_RATE)
    await call.wait_for(lambda log: len(log.said) >= before + replies, BOUND)


def exits(events: Events, path: str) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "child_exited" and e["path"] == path]
