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
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from aiohttp import web

pytest.importorskip("livekit.agents")

from livekit.protocol import agent as lk

from otp_agents.voice.agents_console import ConsoleCall
from otp_agents.voice.audio import SAMPLE_RATE
from otp_agents.voice.samples import speak_flite

from .agents_helpers import (
    APPS,
    BOUND,
    EXAMPLES,
    JOBS,
    SAMPLE,
    Events,
    Hosted,
    Pool,
    exits,
    greeted,
    pool,
    pool_tree,
    say,
)
from .helpers import ROOT, run_cli
from .livekit_standin import serving
from .loopback_http import serve_app
from .voice_helpers import needs_tts

pytestmark = [pytest.mark.anyio, needs_tts, pytest.mark.timeout(600)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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
        await calls["J1"].wait_for(lambda log: log.connections == 2, BOUND)  # resumed: no new greeting
        await say(calls["J1"], "My name is Bob.")
        assert "bob" in calls["J1"].log.said[-1].lower()
        # the other calls were never touched: one start each, no exit, still talking
        for job in ("J2", "J3"):
            assert len(p.started(job)) == 1 and exits(p.run.events(), leaves[job]["path"]) == []
        await say(calls["J3"], "My name is Carol.")
        assert "carol" in calls["J3"].log.said[-1].lower()
        assert "JS_FAILED" not in p.stand_in.job_status("J1")


async def test_a_stuck_job_is_dumped_naming_the_apps_frame_and_a_leaking_one_is_replaced(
    tmp_path: Path,
) -> None:
    faults = tmp_path / "faults"
    faults.mkdir()
    health = (
        'health = { ping_interval = 0.5, ping_timeout = 3.0, dump_timeout = 1.0, memory_metric = "uss", '
        "memory_interval = 0.5, memory_limit_mb = 250, memory_grace = 1 }"
    )
    app = APPS / "faulty_agent.py"
    async with pool(tmp_path, app, max_jobs=3, extra=health, env={"FAULTS_DIR": str(faults)}) as (p, tg):
        healthy = await p.call("OK", tg)
        stuck = await p.call("F1", tg, "freeze-1")
        leaking = await p.call("L1", tg, "leak-1")
        first = {job: await p.leaf(job) for job in ("OK", "F1", "L1")}
        for call in (healthy, stuck, leaking):
            await call.wait_for(greeted, BOUND)

        # stuck in a blocking call: missed pongs, a dump naming the app's function, a kill, a restart
        frozen = first["F1"]["path"]
        hang = await p.run.until(
            lambda ev: [e for e in ev if e["kind"] == "hang" and e["path"] == frozen], "hang"
        )
        dump = await p.run.until(
            lambda ev: [e for e in ev if e["kind"] == "dump_taken" and e["path"] == frozen], "dump"
        )
        stacks = await anyio.Path(dump[0]["file"]).read_text()
        assert hang and "freeze_the_session_loop" in stacks and "faulty_agent.py" in stacks
        await p.leaf("F1", 2)
        await stuck.wait_for(lambda log: log.connections == 2, BOUND)
        await say(stuck, "My name is Bob.")  # the restarted job takes the call again
        assert "bob" in stuck.log.said[-1].lower()

        # leaking: the memory breaker kills it (after a dump) and it comes back
        leaked = first["L1"]["path"]
        killed = await p.run.until(
            lambda ev: [e for e in ev if e["kind"] == "health_kill" and e["path"] == leaked], "memory kill"
        )
        assert killed[0]["reason"] == "memory"
        await p.leaf("L1", 2)
        await leaking.wait_for(lambda log: log.connections == 2, BOUND)
        await say(leaking, "My name is Alice.")
        assert "alice" in leaking.log.said[-1].lower()

        # the healthy call was never touched, and still talks
        assert len(p.started("OK")) == 1 and exits(p.run.events(), first["OK"]["path"]) == []
        await say(healthy, "My name is Dave.")
        assert "dave" in healthy.log.said[-1].lower()
        assert not [e for e in p.run.events() if e["kind"] in ("supervisor_stopped", "intensity_exceeded")]


async def test_the_apps_own_options_and_a_drain_that_lets_the_call_finish(tmp_path: Path) -> None:
    """agent_name, the request handler (reject; accept as its own identity, with attributes) and
    per-job memory come from the app; SIGTERM drains: no new jobs, the running call goes on
    until the caller hangs up, then the tree stops by itself."""
    async with pool(tmp_path, APPS / "picky_agent.py", max_jobs=2) as (p, tg):
        register = p.stand_in.of("register")[0]
        assert register.agent_name == "picky"
        await p.call("N1", tg, "no-1", accepted=False)
        call = await p.call("Y1", tg, "yes-1")
        answer = next(a for a in p.stand_in.of("availability") if a.job_id == "Y1")
        assert answer.participant_identity == "picky-yes-1" and answer.participant_name == "Picky"
        assert answer.participant_attributes["tier"] == "gold"
        leaf = await p.leaf("Y1")
        assert "agent picky-yes-1 caller caller-Y1" in p.stderr() or any(
            "agent picky-yes-1" in (e.get("detail") or "") for e in p.run.events()
        )
        await call.wait_for(greeted, BOUND)
        found = [r for r in await status_rows(tmp_path) if r["path"] == leaf["path"]]
        assert found and "Y1" in json.dumps(found[0]) and "yes-1" in json.dumps(found[0])
        assert found[0]["memory_limit_mb"] == 1500  # the app's job_memory_limit_mb, applied per job

        p.run.proc.send_signal(signal.SIGTERM)
        await p.stand_in.wait(lambda: [u for u in p.stand_in.of("update_worker") if u.draining], BOUND)
        assert not await p.stand_in.offer("Y2", "yes-2")  # draining: no new job
        await say(call, "My name is Bob.")  # the running call goes on
        assert "bob" in call.log.said[-1].lower()
        p.hang_up("Y1")
        await p.stand_in.wait(lambda: "JS_SUCCESS" in p.stand_in.job_status("Y1"), BOUND)
        assert await p.run.ended() == 0
        assert "Task was destroyed but it is pending" not in p.stderr()
        assert "no running event loop" not in p.stderr()


def zygote_starts(events: Events) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "child_started" and e["path"] == "root/agents/zygote"]


async def status_rows(tmp: Path) -> list[dict[str, Any]]:
    """Every row of ``otp-agents status --json``, the tree flattened."""
    argv = [sys.executable, "-m", "otp_agents.cli", "status", "--json", "--state-dir", str(tmp / "state")]
    out = await anyio.run_process(argv, cwd=ROOT)
    return walk_rows(json.loads(out.stdout)["data"]["children"])


def walk_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        out.append(row)
        out.extend(walk_rows(row.get("children", [])))
    return out


async def test_a_reload_with_a_changed_app_runs_new_jobs_on_it_and_lets_running_ones_finish(
    tmp_path: Path,
) -> None:
    app = tmp_path / "app" / "agent.py"
    app.parent.mkdir()
    original = SAMPLE.read_text()
    marked = original.replace(
        "    await session.start(agent=Receptionist(), room=ctx.room)",
        '    logging.getLogger("app").warning("app version %s", VERSION)\n'
        "    await session.start(agent=Receptionist(), room=ctx.room)",
    ).replace("server = AgentServer()", "import logging\n\nVERSION = 1\nserver = AgentServer()")
    app.write_text(marked)
    async with pool(tmp_path, app, max_jobs=3) as (p, tg):
        old = await p.call("A1", tg)
        old_leaf = await p.leaf("A1")
        await old.wait_for(greeted, BOUND)
        app.write_text(marked.replace("VERSION = 1", "VERSION = 2"))
        reloaded = await anyio.run_process(
            [sys.executable, "-m", "otp_agents.cli", "reload", "--state-dir", str(tmp_path / "state")],
            cwd=ROOT,
        )
        assert b"zygote" in reloaded.stdout
        zygotes = await p.run.until(
            lambda ev: zygote_starts(ev) if len(zygote_starts(ev)) >= 2 else None, "the new zygote"
        )
        new = await p.call("B1", tg)
        await p.leaf("B1")
        await new.wait_for(greeted, BOUND)
        log = p.stderr()
        assert "job=A1 room=room-A1 app: app version 1" in log
        assert "job=B1 room=room-B1 app: app version 2" in log
        # the call on the old code went on, in the same process
        await say(old, "My name is Alice.")
        assert "alice" in old.log.said[-1].lower()
        assert exits(p.run.events(), old_leaf["path"]) == [] and len(p.started("A1")) == 1
        assert zygotes[0]["pid"] != zygotes[1]["pid"]  # the app's zygote was replaced


class FlakyModel:
    """A stand-in for an OpenAI-compatible server (**not** a model): a short streamed answer,
    or HTTP 503 for every request while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.failed = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.json()
        if self.down:
            self.failed += 1
            return web.Response(status=503, text="upstream unavailable")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"choices": [{"delta": {"content": "Hello, I hear you."}}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


@asynccontextmanager
async def flaky_model() -> AsyncIterator[tuple[FlakyModel, str]]:
    model = FlakyModel()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", model.handle)
    async with serve_app(app) as port:
        yield model, f"http://127.0.0.1:{port}/v1"


async def until(condition: Any) -> None:
    """Poll ``condition`` (it reads state that two peers change: no single event to wait on)."""
    while not condition():  # noqa: ASYNC110
        await anyio.sleep(0.1)


async def keep_talking_until_failed(p: Pool, job: str, call: ConsoleCall) -> None:
    """Speak whenever the agent listens, until the job is reported failed (its session closes
    after a few turns whose LLM calls all failed)."""

    def failed() -> bool:
        return "JS_FAILED" in p.stand_in.job_status(job)

    def turn_over(seen: int) -> bool:
        states = call.log.states
        return failed() or ("AS_THINKING" in states[seen:] and states[-1:] == ["AS_LISTENING"])

    with anyio.fail_after(4 * BOUND):
        for _ in range(12):
            await until(lambda: failed() or call.log.states[-1:] == ["AS_LISTENING"])
            if failed():
                return
            seen = len(call.log.states)
            async with anyio.create_task_group() as speaking:  # the line drops if the job ends

                async def speak() -> None:
                    await call.say(speak_flite("What is the weather like today?", "kal16"), SAMPLE_RATE)
                    await until(lambda: turn_over(seen))  # noqa: B023
                    speaking.cancel_scope.cancel()

                async def ended() -> None:
                    await until(failed)
                    speaking.cancel_scope.cancel()

                speaking.start_soon(speak)
                speaking.start_soon(ended)
    assert failed(), f"job {job} was not reported failed"


async def test_a_provider_outage_fails_its_jobs_without_escalation_and_spares_the_others(
    tmp_path: Path,
) -> None:
    """LiveKit's basic_agent, its LLM an OpenAI-compatible server that goes down for at least
    30 s: each job that needs it ends failed, reported with the provider's error, and is not
    restarted; the pool's supervisor spends none of its intensity; a call that did not need the
    model meanwhile goes on, and talks once the model is back."""
    async with flaky_model() as (model, url):
        extra = f'llm_url = "{url}"'
        async with pool(tmp_path, EXAMPLES / "basic_agent.py", max_jobs=3, extra=extra) as (p, tg):
            quiet = await p.call("Q1", tg)
            await quiet.wait_for(greeted, BOUND)  # greeted by the model while it was up
            model.down = True
            down_since = anyio.current_time()
            callers = {job: await p.call(job, tg) for job in ("D1", "D2")}
            async with anyio.create_task_group() as talking:
                for job, call in callers.items():
                    talking.start_soon(keep_talking_until_failed, p, job, call)
            await anyio.sleep(max(0.0, 30 - (anyio.current_time() - down_since)))  # down >= 30 s
            model.down = False
            assert model.failed > 0
            for job in callers:
                failure = next(
                    u for u in p.stand_in.of("update_job") if u.job_id == job and u.status == lk.JS_FAILED
                )
                assert "job failed" in failure.error and "APIStatusError" in failure.error, failure.error
                assert len(p.started(job)) == 1  # not restarted
            events = p.run.events()
            assert not [e for e in events if e["kind"] in ("intensity_exceeded", "restarting")]
            assert not [e for e in events if e["kind"] == "supervisor_stopped"]
            # the quiet call was never touched, and talks now that the model is back
            assert len(p.started("Q1")) == 1 and "JS_FAILED" not in p.stand_in.job_status("Q1")
            await say(quiet, "Hello there.")
            assert "hear you" in quiet.log.said[-1].lower()


async def test_a_prewarm_that_starts_a_thread_is_refused_by_its_zygote_naming_it(tmp_path: Path) -> None:
    """A zygote forks: a thread started in the app's prewarm would be missing in every job. The
    tree does not start, and says which step started which thread."""
    async with serving() as stand_in:
        tree = tmp_path / "tree.toml"
        tree.write_text(pool_tree(stand_in, APPS / "threaded_prewarm.py", None, 2, "", {}))
        run = Hosted(
            run_cli(tree, tmp_path / "state", tmp_path / "events.jsonl", "asyncio", tmp_path / "err"),
            tmp_path / "events.jsonl",
            tmp_path / "err",
        )
        assert await run.ended() != 0
        said = run.tail()
        assert "the prewarm of" in said and "threaded_prewarm.py started a thread (metrics-pusher)" in said
        assert stand_in.of("register") == []


REAL = all(os.environ.get(v) for v in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"))


@pytest.mark.skipif(
    not REAL, reason="needs a LiveKit server: set LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET"
)
async def test_against_a_real_server_a_dispatched_job_runs_in_a_leaf_of_its_own(tmp_path: Path) -> None:
    """The same pool registered with a real LiveKit server: an explicit dispatch to its agent
    name becomes a leaf forked from the app's zygote, which joins the room; deleting the room
    ends the job, reported a success, and the leaf is not restarted."""
    from livekit import api

    name = f"otp-agents-pool-{os.getpid()}"
    url, key, secret = (os.environ[v] for v in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"))
    tree = tmp_path / "tree.toml"
    tree.write_text(pool_tree((url, key, secret), SAMPLE, None, 2, f'agent_name = "{name}"', {}))
    run = Hosted(
        run_cli(tree, tmp_path / "state", tmp_path / "events.jsonl", "asyncio", tmp_path / "err"),
        tmp_path / "events.jsonl",
        tmp_path / "err",
    )
    lkapi = api.LiveKitAPI(url, key, secret)
    room = f"room-{name}"
    try:
        await run.until(
            lambda ev: [e for e in ev if "registered as" in (e.get("detail") or "")], "registration"
        )
        await lkapi.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name=name, room=room))
        started = await run.until(
            lambda ev: [e for e in ev if "starting (forked from the app zygote)" in (e.get("detail") or "")],
            "the job's leaf",
        )
        assert f"room {room}" in started[0]["detail"] and started[0]["path"].startswith(JOBS + "/")
        await lkapi.room.delete_room(api.DeleteRoomRequest(room=room))
        ended = await run.until(lambda ev: exits(ev, started[0]["path"]), "the job's end")
        assert ended[0]["code"] == 0 and not (ended[0].get("detail") or "").startswith("job failed")
    finally:
        await lkapi.aclose()
        if run.proc.poll() is None:
            run.proc.send_signal(signal.SIGTERM)
            await run.ended()


async def test_a_jobs_inference_executor_runs_the_apps_runner_loaded_once_in_the_zygote(
    tmp_path: Path,
) -> None:
    """An app's inference runner (a turn detector plugin registers one for its model) is
    initialized in the zygote, its model shared by every job; a job's ``do_inference`` is
    answered in its own leaf."""
    async with pool(tmp_path, APPS / "inference_agent.py", max_jobs=2) as (p, _tg):
        assert await p.stand_in.offer("I1", "room-I1")
        leaf = await p.leaf("I1")
        said = await p.run.until(
            lambda _ev: re.findall(
                r"inference said b'PING loaded in (\d+)' in job process (\d+)", p.stderr()
            ),
            "the inference's answer",
        )
        zygote = zygote_starts(p.run.events())[0]["pid"]
        assert said[0] == (str(zygote), str(leaf["pid"]))
        await p.stand_in.terminate("I1")  # the server ends the job: its leaf stops, a success
        await p.stand_in.wait(lambda: "JS_SUCCESS" in p.stand_in.job_status("I1"), BOUND)


async def test_a_dispatcher_that_dies_mid_call_is_replaced_and_claims_the_running_call(
    tmp_path: Path,
) -> None:
    """The dispatcher is only the connection to LiveKit: killing it leaves the calls alone. Its
    replacement registers again, claims the running job (``MigrateJobRequest``, as LiveKit's
    worker does after a reconnect), and reports it when it ends."""
    async with pool(tmp_path, SAMPLE, max_jobs=2) as (p, tg):
        call = await p.call("M1", tg)
        leaf = await p.leaf("M1")
        await call.wait_for(greeted, BOUND)
        (dispatcher,) = [
            e
            for e in p.run.events()
            if e["kind"] == "child_started" and e["path"] == "root/agents/dispatcher"
        ]
        rows = await status_rows(tmp_path)
        args = next(r["args"] for r in rows if r["path"] == leaf["path"])
        ticket = anyio.Path(args[args.index("--ticket") + 1])
        assert await ticket.exists()
        os.kill(dispatcher["pid"], signal.SIGKILL)
        migrated = await p.stand_in.wait(lambda: p.stand_in.of("migrate_job"), BOUND)
        assert list(migrated[0].job_ids) == ["M1"] and len(p.stand_in.of("register")) == 2
        await say(call, "My name is Alice.")  # the call never noticed
        assert "alice" in call.log.said[-1].lower()
        assert exits(p.run.events(), leaf["path"]) == []
        p.hang_up("M1")
        await p.stand_in.wait(lambda: "JS_SUCCESS" in p.stand_in.job_status("M1"), BOUND)
        assert not await ticket.exists()  # its ticket (the room token) went with it
