"""The LiveKit dispatcher against a protocol-level stand-in server (tests/livekit_standin.py:
LiveKit's agent worker protocol over a WebSocket, *not* a LiveKit server). The tree runs as a
real `otp-agents run` process; jobs run workers/job_probe.py, whose behaviour the room name picks.

asyncio only: the stand-in is an aiohttp server."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from livekit.protocol import agent as lk
from livekit.protocol import models

from otp_agents.voice.dispatch import Dispatcher
from otp_agents.voice.dispatch_state import Backoff, Rejected

from .helpers import ROOT
from .livekit_standin import KEY, SECRET, StandIn, serving

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


TREE = f"""
id = "root"
intensity = 5
period = 30

[[children]]
id = "jobs"
strategy = "simple_one_for_one"
intensity = 5
period = 10
  [[children.children]]
  id = "job"
  module = "workers.job_probe:main"
  restart = "temporary"
  shutdown = 2
  cwd = "{ROOT}"

[[children]]
id = "dispatcher"           # after the jobs: stopped first, so it drains while calls still run
module = "workers.livekit_dispatcher:main"
args = ["--jobs", "root/jobs", "--max-jobs", "2", "--status-interval", "0.2"]
shutdown = 4
cwd = "{ROOT}"
"""


@contextmanager
def tree(
    tmp: Path, url: str, secret: str = SECRET, key: str = KEY, text: str = TREE
) -> Iterator[subprocess.Popen[bytes]]:
    path = tmp / "livekit.toml"
    path.write_text(text)
    env = {**os.environ, "LIVEKIT_URL": url, "LIVEKIT_API_KEY": key, "LIVEKIT_API_SECRET": secret}
    proc = subprocess.Popen(
        [sys.executable, "-m", "otp_agents.cli", "run", str(path), "--state-dir", str(tmp / "state")],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


async def test_registration_jobs_load_failure_reconnect_and_drain(tmp_path: Path) -> None:
    async with serving() as lk_server:
        with tree(tmp_path, lk_server.url) as proc:
            s: StandIn = lk_server
            register = await s.wait(lambda: s.of("register"))
            assert register[0].type == lk.JT_ROOM

            # a job starts under the dynamic supervisor and is reported running
            assert await s.offer("J1", "ok-1")
            await s.wait(lambda: "JS_RUNNING" in s.job_status("J1"))

            # a job whose agent crashes (temporary child: not restarted) is reported failed, with why
            assert await s.offer("J2", "fail-2")
            await s.wait(lambda: "JS_FAILED" in s.job_status("J2"))
            failed = [u for u in s.of("update_job") if u.job_id == "J2" and u.status == lk.JS_FAILED]
            assert "exit code 3" in failed[0].error

            # availability follows real load: 2 jobs of max 2 -> refused
            assert await s.offer("J3", "ok-3")
            await s.wait(lambda: "JS_RUNNING" in s.job_status("J3"))
            assert not await s.offer("J4", "ok-4")
            full = await s.wait(lambda: [u for u in s.of("update_worker") if u.load >= 1.0])
            assert full[-1].status == lk.WS_FULL and full[-1].job_count == 2

            # the server terminates a job: its child is stopped, the job succeeded
            await s.terminate("J1")
            await s.wait(lambda: "JS_SUCCESS" in s.job_status("J1"))
            # a call that ends by itself (exit 0) succeeded too
            assert await s.offer("J5", "done-5")
            await s.wait(lambda: "JS_SUCCESS" in s.job_status("J5"))

            # the connection drops: the dispatcher reconnects and registers again; jobs go on
            await s.drop()
            await s.wait(lambda: len(s.of("register")) >= 2)
            assert s.connections >= 2
            migrated = await s.wait(lambda: s.of("migrate_job"))
            assert list(migrated[0].job_ids) == ["J3"]  # the call still running here is claimed
            assert "JS_SUCCESS" not in s.job_status("J3") and "JS_FAILED" not in s.job_status("J3")

            # shutdown drains: no new jobs, then the running one is given time to finish
            proc.send_signal(signal.SIGTERM)
            await s.wait(lambda: [u for u in s.of("update_worker") if u.draining])
            assert proc.wait(timeout=30) == 0


async def test_a_bad_secret_is_refused_and_retried_with_backoff(tmp_path: Path) -> None:
    async with serving() as lk_server:
        with tree(tmp_path, lk_server.url, secret="not-the-secret-0123456789abcdefgh"):
            await lk_server.wait(lambda: lk_server.rejected >= 2)
            assert lk_server.of("register") == []


def test_reconnect_backoff_grows_is_capped_and_jittered() -> None:
    b = Backoff(initial=0.5, factor=2.0, cap=30.0, jitter=0.25)
    rng = random.Random(3)
    for attempt, base in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (7, 30.0), (20, 30.0)):
        delays = [b.delay(attempt, rng) for _ in range(50)]
        assert all(base * 0.75 <= d <= base * 1.25 for d in delays)
        assert len({round(d, 6) for d in delays}) > 1  # jittered, not in step


REAL = all(os.environ.get(v) for v in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"))


@pytest.mark.skipif(
    not REAL, reason="needs a LiveKit server: set LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET"
)
async def test_against_a_real_server_an_explicit_dispatch_starts_a_job(tmp_path: Path) -> None:
    """Registers with the real server, asks it (server API) to dispatch a job to our agent name,
    and sees the job's child started under the dynamic supervisor."""
    from livekit import api

    name = f"otp-agents-test-{os.getpid()}"
    text = TREE.replace('"--max-jobs", "2"', f'"--max-jobs", "2", "--agent-name", "{name}"')
    url, key, secret = (os.environ[v] for v in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"))
    status_cmd = [
        sys.executable,
        "-m",
        "otp_agents.cli",
        "status",
        "--json",
        "--state-dir",
        str(tmp_path / "state"),
    ]
    with tree(tmp_path, url, secret=secret, key=key, text=text) as proc:
        lkapi = api.LiveKitAPI(url, key, secret)
        try:
            await anyio.sleep(3)  # registration
            request = api.CreateAgentDispatchRequest(agent_name=name, room=f"ok-{name}")
            await lkapi.agent_dispatch.create_dispatch(request)
            with anyio.fail_after(30):
                while True:
                    await anyio.sleep(0.5)
                    out = await anyio.run_process(status_cmd, check=False)
                    if out.returncode == 0 and b"root/jobs/" in out.stdout:
                        break
        finally:
            await lkapi.aclose()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


async def answers_to(dispatcher: Dispatcher, jobs: list[str]) -> list[lk.AvailabilityResponse]:
    """The dispatcher's availability answers to requests for ``jobs``, all sent at once (what it
    would send on its WebSocket, kept here)."""
    sent: list[lk.AvailabilityResponse] = []

    async def keep(msg: lk.WorkerMessage) -> None:
        sent.append(msg.availability)

    dispatcher._send = keep  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        dispatcher._tg = tg
        for job in jobs:
            tg.start_soon(dispatcher._answer, lk.Job(id=job, room=models.Room(name=f"room-{job}")))
        while len(sent) < len(jobs):  # noqa: ASYNC110 - the answers are this task group's own
            await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    return sent


ACCEPT = SimpleNamespace(name="", identity="", metadata="", attributes=None)  # LiveKit's accept fields


def dispatcher_for(decide: Any, max_jobs: int = 2) -> Dispatcher:
    return Dispatcher(
        url="ws://127.0.0.1:1",
        token=lambda: "",
        control_socket="/nonexistent",
        jobs_supervisor="root/jobs",
        job_args=lambda launch: [],
        max_jobs=max_jobs,
        load_threshold=1.0,
        decide=decide,
    )


async def test_a_burst_of_requests_is_never_accepted_beyond_max_jobs() -> None:
    async def slow_accept(job: Any) -> Any:
        await anyio.sleep(0.1)  # the app's handler takes its time: the slots are held meanwhile
        return None if job.room.name.endswith("-x") else ACCEPT

    d = dispatcher_for(slow_accept)
    answers = await answers_to(d, [f"J{i}" for i in range(5)])
    assert sum(a.available for a in answers) == 2
    assert all(a.participant_attributes.get("lk.agent.name") == "" for a in answers if a.available)


async def test_an_accepted_job_never_assigned_gives_its_slot_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import otp_agents.voice.dispatch as dispatch

    monkeypatch.setattr(dispatch, "ASSIGNMENT_TIMEOUT", 0.2)

    async def accept(job: Any) -> Any:
        return ACCEPT

    d = dispatcher_for(accept, max_jobs=1)
    sent: list[lk.AvailabilityResponse] = []

    async def keep(msg: lk.WorkerMessage) -> None:
        sent.append(msg.availability)

    d._send = keep  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        d._tg = tg
        await d._answer(lk.Job(id="A", room=models.Room(name="a")))
        await d._answer(lk.Job(id="B", room=models.Room(name="b")))  # full: A holds the slot
        while "A" in d.jobs:  # noqa: ASYNC110 - its expiry is this task group's own task
            await anyio.sleep(0.05)
        await d._answer(lk.Job(id="C", room=models.Room(name="c")))  # A was never assigned
        tg.cancel_scope.cancel()
    assert [a.available for a in sent] == [True, False, True]


async def test_the_apps_reject_with_terminate_is_passed_on() -> None:
    async def reject(job: Any) -> Any:
        return Rejected(terminate=True)

    (answer,) = await answers_to(dispatcher_for(reject), ["J1"])
    assert not answer.available and answer.terminate
