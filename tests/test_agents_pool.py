"""A LiveKit Agents app as a pool of supervised jobs (``app = "agent.py"`` in the tree): every
job its own leaf, forked from a zygote that loaded the app and ran its prewarm once.

Jobs come from a protocol-level stand-in (tests/livekit_standin.py: LiveKit's agent worker
protocol over a WebSocket, **not** a LiveKit server: no rooms, no media). So that each job holds
a real call offline, the stand-in puts a console peer's address in the job's metadata: the leaf
then runs the job in LiveKit's mock room with its audio over LiveKit's console transport, and
:class:`ConsoleCall` plays the caller (flite speech in, the agent's audio out). The apps are
LiveKit's own examples, byte for byte, with offline providers by configuration. The tree runs as
a real ``otp-agents run``; the test body is asyncio (the stand-in is an aiohttp server).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("livekit.agents")

from otp_agents.voice.agents_console import CallLog, ConsoleCall
from otp_agents.voice.agents_leaf import CONSOLE_KEY
from otp_agents.voice.audio import SAMPLE_RATE
from otp_agents.voice.samples import speak_flite

from .agents_helpers import BOUND, Events, Hosted
from .helpers import ROOT, run_cli
from .livekit_standin import KEY, SECRET, StandIn, serving
from .voice_helpers import needs_tts

pytestmark = [pytest.mark.anyio, needs_tts]

APPS = ROOT / "tests" / "agents_apps"
EXAMPLES = APPS / "livekit"
SCRIPTS = APPS / "scripts"
SAMPLE = ROOT / "workers" / "livekit_agents_app" / "agent.py"
JOBS = "root/agents/jobs"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pool_tree(stand_in: StandIn, app: Path, script: Path | None, max_jobs: int, extra: str) -> str:
    llm = f'llm_script = "{script}"' if script else ""
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
env = {{ LIVEKIT_URL = "{stand_in.url}", LIVEKIT_API_KEY = "{KEY}", LIVEKIT_API_SECRET = "{SECRET}" }}
{extra}
"""


class Pool:
    def __init__(self, run: Hosted, stand_in: StandIn, tree: Path) -> None:
        self.run = run
        self.stand_in = stand_in
        self.tree = tree
        self.calls: dict[str, ConsoleCall] = {}

    def started(self, job: str) -> list[dict[str, Any]]:
        """The child_started events of the leaf holding ``job`` (its args name the job)."""
        paths = {
            e["path"]
            for e in self.run.events()
            if e["kind"] == "worker_log" and e["path"].startswith(JOBS + "/") and f"job {job} " in e.get("detail", "")
        }
        return [e for e in self.run.events() if e["kind"] == "child_started" and e["path"] in paths]

    async def leaf(self, job: str, count: int = 1) -> dict[str, Any]:
        """The ``count``-th start of ``job``'s leaf."""
        found = await self.run.until(lambda _ev: self.started(job)[count - 1 :], f"start {count} of {job}")
        return found[0]

    async def call(self, job: str, tg: Any, caller: str = "") -> ConsoleCall:
        """Offer ``job`` with a console peer of its own; return that peer (the caller)."""
        call = ConsoleCall()
        address = await tg.start(call.serve)
        self.calls[job] = call
        metadata = json.dumps({CONSOLE_KEY: address})
        assert await self.stand_in.offer(job, f"room-{job}", metadata=metadata, caller=caller or f"caller-{job}")
        return call


@asynccontextmanager
async def pool(
    tmp: Path, app: Path = SAMPLE, script: Path | None = None, *, max_jobs: int = 3, extra: str = ""
) -> AsyncIterator[tuple[Pool, anyio.abc.TaskGroup]]:
    async with serving() as stand_in, anyio.create_task_group() as tg:
        tree = tmp / "tree.toml"
        tree.write_text(pool_tree(stand_in, app, script, max_jobs, extra))
        events, log = tmp / "events.jsonl", tmp / "stderr.log"
        proc = run_cli(tree, tmp / "state", events, "asyncio", log)
        run = Hosted(proc, events, log)
        try:
            await stand_in.wait(lambda: stand_in.of("register"), BOUND)
            yield Pool(run, stand_in, tree), tg
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                await run.ended()
            tg.cancel_scope.cancel()


def greeted(log: CallLog) -> bool:
    return len(log.said) >= 1 and log.states[-1:] == ["AS_LISTENING"]


async def say(call: ConsoleCall, text: str, replies: int = 1) -> None:
    await call.wait_for(lambda log: log.states[-1:] == ["AS_LISTENING"], BOUND)
    before = len(call.log.said)
    await call.say(speak_flite(text, "kal16"), SAMPLE_RATE)
    await call.wait_for(lambda log: len(log.said) >= before + replies, BOUND)  # noqa: B023


def exits(events: Events, path: str) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "child_exited" and e["path"] == path]


async def test_each_job_is_its_own_forked_leaf_holding_its_call(tmp_path: Path) -> None:
    """N jobs -> N leaves with distinct pids, forked from the app's zygote (prewarm run there,
    its VAD used in each job), each holding its own call; one SIGKILLed is restarted and takes
    its call again, the others go on untouched."""
    async with pool(tmp_path, SAMPLE, max_jobs=3) as (p, tg):
        calls = {job: await p.call(job, tg) for job in ("J1", "J2", "J3")}
        leaves = {job: await p.leaf(job) for job in calls}
        for call in calls.values():
            await call.wait_for(greeted, BOUND)
        pids = {leaf["pid"] for leaf in leaves.values()}
        assert len(pids) == 3  # a process each
        for job in calls:
            assert "JS_RUNNING" in p.stand_in.job_status(job)
        logs = [e["detail"] for e in p.run.events() if e["kind"] == "worker_log"]
        assert sum("forked from the app zygote" in line for line in logs) == 3
        await say(calls["J2"], "My name is Alice.")
        assert "alice" in calls["J2"].log.said[-1].lower()

        victim = leaves["J1"]
        os.kill(victim["pid"], signal.SIGKILL)
        again = await p.leaf("J1", 2)
        assert again["path"] == victim["path"] and again["pid"] != victim["pid"]
        await calls["J1"].wait_for(lambda log: log.connections == 2 and len(log.said) >= 2, BOUND)
        await say(calls["J1"], "My name is Bob.")
        assert "bob" in calls["J1"].log.said[-1].lower()
        # the other calls were never touched: one start each, no exit, still talking
        for job in ("J2", "J3"):
            assert len(p.started(job)) == 1 and exits(p.run.events(), leaves[job]["path"]) == []
        await say(calls["J3"], "My name is Carol.")
        assert "carol" in calls["J3"].log.said[-1].lower()
        assert "JS_FAILED" not in p.stand_in.job_status("J1")
