"""LiveKit Agents apps hosted in server mode (``workers/agents_host.py --server``), taking jobs
from a protocol-level stand-in (tests/livekit_standin.py: LiveKit's agent worker protocol over a
WebSocket, **not** a LiveKit server; no media, so a job's room connection fails with a 404).

The stand-in offers a job; LiveKit's own executor starts the job in a process of its own
(multiprocessing forkserver, as ``python app.py start`` would), which must find and run the
app's entrypoint. The entrypoint's room connection then fails against the stand-in, and the host
reports that with the exception and the frame in the app file it came from: proof that the job
process ran the app's own code. The tree runs as a real ``otp-agents run`` on each backend; the
test body is asyncio (the stand-in is an aiohttp server).
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

pytest.importorskip("livekit.agents")

from .agents_helpers import BOUND, Events, Hosted
from .helpers import ROOT, run_cli
from .livekit_standin import KEY, SECRET, StandIn, serving

pytestmark = pytest.mark.anyio

APPS = ROOT / "tests" / "agents_apps"
SAMPLE = ROOT / "workers" / "livekit_agents_app" / "agent.py"
LIVEKIT_EXAMPLES = APPS / "livekit"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def job_reports(events: Events, job: str) -> list[str]:
    return [
        e["detail"]
        for e in events
        if e["kind"] == "worker_log"
        and e["path"] == "root/agent"
        and f"job {job} " in (e.get("detail") or "")
    ]


@asynccontextmanager
async def hosted(
    tmp: Path, app: Path, backend: str = "asyncio", *, max_failures: int = 3, intensity: int = 3
) -> AsyncIterator[tuple[Hosted, StandIn]]:
    async with serving() as stand_in:
        args = [str(app), "--server", "--idle-processes", "1", "--max-job-failures", str(max_failures)]
        tree = tmp / "tree.toml"
        tree.write_text(
            f"""
id = "root"
intensity = {intensity}
period = 600

[[children]]
id = "agent"
module = "workers.agents_host:main"
args = {json.dumps(args)}
start_timeout = 60
shutdown = 10
cwd = "{ROOT}"
env = {{ LIVEKIT_URL = "{stand_in.url}", LIVEKIT_API_KEY = "{KEY}", LIVEKIT_API_SECRET = "{SECRET}" }}
"""
        )
        events, log = tmp / "events.jsonl", tmp / "stderr.log"
        proc = run_cli(tree, tmp / "state", events, backend, log)
        run = Hosted(proc, events, log)
        try:
            yield run, stand_in
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                await run.ended()


async def registered(run: Hosted, stand_in: StandIn) -> None:
    """The host said Ready: it registered with the (stand-in) server."""
    await run.until(lambda ev: any(e["kind"] == "child_started" for e in ev), "the host's start")
    await stand_in.wait(lambda: stand_in.of("register"), BOUND)


async def entrypoint_ran(run: Hosted, stand_in: StandIn, app: Path, job: str = "J1") -> str:
    """Offer a job; return the host's report of it, once its process ran the app's entrypoint."""
    await registered(run, stand_in)
    assert await stand_in.offer(job, f"room-{job}")
    reports = await run.until(lambda ev: job_reports(ev, job), f"the report of job {job}")
    assert re.search(rf"\({re.escape(app.name)}:\d+, in entrypoint\)", reports[0]), reports[0]
    return str(reports[0])


def test_livekit_examples_are_kept_byte_for_byte() -> None:
    table = (LIVEKIT_EXAMPLES / "SOURCE.md").read_text()
    for name in (
        "basic_agent.py",
        "minimal_worker.py",
        "restaurant_agent.py",
        "drive_thru/agent.py",
        "drive_thru/database.py",
        "drive_thru/order.py",
    ):
        digest = hashlib.sha256((LIVEKIT_EXAMPLES / name).read_bytes()).hexdigest()
        assert f"`{name}`" in table and digest in table, name


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_the_sample_app_takes_a_job_and_its_process_runs_the_entrypoint(
    tmp_path: Path, backend: str
) -> None:
    async with hosted(tmp_path, SAMPLE, backend) as (run, stand_in):
        report = await entrypoint_ran(run, stand_in, SAMPLE)
        assert "job J1 (room room-J1): entrypoint raised" in report
        assert "ConnectError" in report  # the stand-in has no media server: the room cannot connect
        assert stand_in.job_status("J1")[:1] == ["JS_RUNNING"]
    assert run.proc.returncode == 0
    assert "ModuleNotFoundError" not in run.tail()


async def test_livekits_basic_agent_takes_a_job_unmodified(tmp_path: Path) -> None:
    app = LIVEKIT_EXAMPLES / "basic_agent.py"
    async with hosted(tmp_path, app) as (run, stand_in):
        report = await entrypoint_ran(run, stand_in, app)
        assert "entrypoint raised" in report
    assert "ModuleNotFoundError" not in run.log.read_text(errors="replace")


async def test_a_worker_options_app_loads_and_takes_a_job(tmp_path: Path) -> None:
    """``cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint))``, LiveKit's older style."""
    app = LIVEKIT_EXAMPLES / "minimal_worker.py"
    async with hosted(tmp_path, app) as (run, stand_in):
        report = await entrypoint_ran(run, stand_in, app)
        assert "(minimal_worker.py:14, in entrypoint)" in report  # its `await ctx.connect()`


async def test_an_entrypoint_that_raises_is_the_leafs_exit_reason(tmp_path: Path) -> None:
    app = APPS / "raising_agent.py"
    async with hosted(tmp_path, app, max_failures=1) as (run, stand_in):
        report = await entrypoint_ran(run, stand_in, app)
        assert "BrokenConfiguration: no prompt configured for room room-J1" in report
        exited = await run.until(
            lambda ev: [e for e in ev if e["kind"] == "child_exited" and e["path"] == "root/agent"],
            "the leaf's exit",
        )
        assert exited[0]["code"] == 1 and exited[0]["reason"] == "crash"
        assert "BrokenConfiguration: no prompt configured for room room-J1" in exited[0]["detail"]
        await run.until(  # restarted by its supervisor, registered anew
            lambda ev: len([e for e in ev if e["kind"] == "child_started"]) >= 2, "the restart"
        )


async def test_job_processes_that_keep_failing_never_look_healthy(tmp_path: Path) -> None:
    """Every job process dies before it is ready: the host ends after 3 in a row, each time,
    and the supervisor gives up by its intensity. The run ends; nothing looks healthy."""
    app = APPS / "unimportable_in_jobs.py"
    async with hosted(tmp_path, app, intensity=1) as (run, _stand_in):
        code = await run.ended()
    ends = [
        e for e in run.events() if e["path"] == "root/agent" and e["kind"] in ("child_exited", "start_failed")
    ]
    assert code in (1, 3), run.tail()  # the root gave up (or, had the first start failed, could not start)
    assert len(ends) >= 1
    for end in ends:
        assert "3 job failures in a row" in end["detail"], end
        assert "ended before it was ready (exit code 1)" in end["detail"], end
