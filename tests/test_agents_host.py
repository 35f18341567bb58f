"""An unmodified LiveKit Agents app hosted as a supervised leaf (``workers/agents_host.py``),
driven offline through the agents console transport: :class:`ConsoleCall` plays the caller
(flite speech in, the agent's audio out, real time), the app runs its own AgentSession with
Silero VAD, pocketsphinx, a rule LLM and flite. The supervisor runs in this process on both
backends; the leaf itself is asyncio, as LiveKit Agents requires.

The real-server test runs only when LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET are set:
no LiveKit server can be installed on the machines this suite runs on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from otp_agents.errors import StartError
from otp_agents.events import EventBus, Kind
from otp_agents.runtime.tree import running
from otp_agents.spec.load import from_dict

from .helpers import ROOT, Recorder, tree_of, worker
from .voice_helpers import listen, needs_tts

pytest.importorskip("livekit.agents")

from otp_agents.voice.agents_console import WIRE_RATE, CallLog, ConsoleCall
from otp_agents.voice.audio import SAMPLE_RATE, resample
from otp_agents.voice.samples import speak_flite

pytestmark = [pytest.mark.anyio, needs_tts]

SAMPLE_APP = "workers/livekit_agents_app/agent.py"
APPS = ROOT / "tests" / "agents_apps"
CALL = 60.0  # failure bound for a step of a call in real time; never a speed claim


def host(app: str | Path, *args: str, **spec: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"restart": "transient", "shutdown": 10, "start_timeout": 60}
    return worker("agent", "workers.agents_host:main", args=[str(app), *args], **(options | spec))


@asynccontextmanager
async def console_tree(app: str | Path, **spec: Any) -> AsyncIterator[tuple[ConsoleCall, Recorder]]:
    call = ConsoleCall()
    async with anyio.create_task_group() as tg:
        address = await tg.start(call.serve)
        config = {
            "id": "root",
            "intensity": 3,
            "period": 60,
            "children": [host(app, "--console", address, **spec)],
        }
        async with tree_of(config) as (_tree, rec):
            yield call, rec
        tg.cancel_scope.cancel()


def listening(log: CallLog) -> bool:
    return bool(log.replies) and log.states[-1:] == ["AS_LISTENING"]


async def say(call: ConsoleCall, text: str) -> None:
    await call.wait_for(listening, CALL)
    await call.say(speak_flite(text, "kal16"), SAMPLE_RATE)


async def test_unmodified_app_answers_a_spoken_question_end_to_end() -> None:
    async with console_tree(SAMPLE_APP) as (call, rec):
        await call.wait_for(lambda log: len(log.said) >= 1, CALL)  # the greeting from on_enter
        await say(call, "My name is Alice.")
        await call.wait_for(lambda log: len(log.said) >= 2, CALL)
        await call.wait_for(lambda log: len(log.replies) >= 2, CALL)
        assert rec.of(Kind.HANG) == []
        assert rec.of(Kind.CHILD_EXITED) == []
    log = call.log
    assert "alice" in " ".join(log.heard).lower()  # the app's own STT heard the caller
    assert "alice" in log.said[1].lower()  # its LLM answered that turn
    # and what came back over the console transport is that answer, spoken
    spoken = await listen(resample(log.replies[1].audio, WIRE_RATE, SAMPLE_RATE))
    assert spoken and "alice" in " ".join(words for _s, _e, words in spoken).lower()
    assert log.connections == 1


async def test_killed_host_is_restarted_and_takes_the_call_again() -> None:
    async with console_tree(SAMPLE_APP) as (call, rec):
        started = await rec.wait_kind(Kind.CHILD_STARTED, "root/agent")
        await call.wait_for(lambda log: len(log.said) >= 1, CALL)
        assert started.pid is not None
        os.kill(started.pid, signal.SIGKILL)
        exited = await rec.wait_kind(Kind.CHILD_EXITED, "root/agent")
        assert exited.signal == "SIGKILL"
        with anyio.fail_after(CALL):
            again = await rec.wait_for(
                lambda e: e.kind is Kind.CHILD_STARTED and e.path == "root/agent" and e.pid != started.pid
            )
        await call.wait_for(lambda log: log.connections == 2 and len(log.said) >= 2, CALL)  # greeted anew
        await say(call, "My name is Bob.")
        await call.wait_for(lambda log: any("bob" in line.lower() for line in log.said), CALL)
        assert again.pid is not None and again.pid != started.pid


async def test_a_session_loop_stuck_in_a_blocking_call_is_dumped_and_replaced() -> None:
    """LiveKit's own process layer only logs a blocked loop; here the heartbeat runs through the
    session's loop, so the supervisor sees the hang, dumps every thread, and restarts the leaf."""
    health = {"ping_interval": 0.5, "ping_timeout": 3.0, "dump_timeout": 1.0}
    async with console_tree(APPS / "freezing_agent.py", health=health) as (call, rec):
        await call.wait_for(lambda log: len(log.said) >= 1, CALL)
        with anyio.fail_after(CALL):
            await rec.wait_kind(Kind.HANG, "root/agent")
            taken = await rec.wait_kind(Kind.DUMP_TAKEN, "root/agent")
            await rec.wait_for(lambda e: e.kind is Kind.CHILD_STARTED and e.path == "root/agent", 0)
            restarted = await rec.wait_for(
                lambda e: (
                    e.kind is Kind.CHILD_STARTED
                    and e.path == "root/agent"
                    and len(rec.of(Kind.CHILD_STARTED, "root/agent")) >= 2
                )
            )
        assert taken.file is not None
        stacks = await anyio.Path(taken.file).read_text()
        assert "freeze_the_session_loop" in stacks  # the stuck thread's stack, caught before the kill
        assert restarted.pid is not None


async def start_failure(app: str | Path, *args: str) -> tuple[str, str]:
    """Start a tree whose only child is a host that cannot start: (the error, what the leaf said)."""
    bus = EventBus()
    rec = Recorder(bus)
    config = {"id": "root", "intensity": 0, "children": [host(app, *args)]}
    with anyio.fail_after(CALL), pytest.raises(StartError) as failed:
        async with running(from_dict(config), bus=bus):
            pass
    return str(failed.value), " ".join(e.detail or "" for e in rec.of(Kind.WORKER_LOG, "root/agent"))


async def test_app_file_without_an_agent_server_fails_to_start_naming_the_file() -> None:
    error, said = await start_failure(APPS / "no_server.py", "--console", "127.0.0.1:9")
    assert "root/agent" in error
    assert "no_server.py" in said and "AgentServer" in said


async def test_an_entrypoint_that_raises_fails_the_start_with_its_exception() -> None:
    """Not a 30 s wait for a session that never comes: the exception ends the leaf at once and
    is its exit reason, in the start error and in the event stream."""
    call = ConsoleCall()
    async with anyio.create_task_group() as tg:
        address = await tg.start(call.serve)
        error, said = await start_failure(APPS / "raising_agent.py", "--console", address)
        tg.cancel_scope.cancel()
    assert "root/agent" in error and "exit code 1" in error
    assert "BrokenConfiguration: no prompt configured for room console" in error
    assert "(raising_agent.py:14, in entrypoint)" in error
    assert "BrokenConfiguration" in said
    assert call.log.connections <= 1


async def test_unreachable_console_peer_is_a_start_failure_that_says_where() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there now
    error, said = await start_failure(SAMPLE_APP, "--console", f"127.0.0.1:{port}")
    assert "root/agent" in error
    assert f"127.0.0.1:{port}" in said and "unreachable" in said


async def test_caller_hanging_up_ends_the_leaf_cleanly() -> None:
    call = ConsoleCall()
    serving = anyio.CancelScope()

    async def serve(*, task_status: anyio.abc.TaskStatus[str]) -> None:
        with serving:
            await call.serve(task_status=task_status)

    async with anyio.create_task_group() as tg:
        address = await tg.start(serve)
        config = {"id": "root", "children": [host(SAMPLE_APP, "--console", address)]}
        async with tree_of(config) as (_tree, rec):
            await call.wait_for(lambda log: len(log.said) >= 1, CALL)
            serving.cancel()  # the caller's end closes
            with anyio.fail_after(CALL):
                exited = await rec.wait_kind(Kind.CHILD_EXITED, "root/agent")
            assert exited.code == 0 and exited.signal is None
            assert rec.of(Kind.RESTARTING, "root/agent") == []  # transient: a clean end is final


@pytest.mark.skipif(
    not all(os.environ.get(v) for v in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")),
    reason="needs a LiveKit server: set LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET",
)
async def test_real_server_registers_the_hosted_app() -> None:
    config = {"id": "root", "children": [host(SAMPLE_APP, "--server", restart="permanent")]}
    async with tree_of(config) as (_tree, rec):
        with anyio.fail_after(CALL):
            started = await rec.wait_kind(Kind.CHILD_STARTED, "root/agent")  # Ready = registered
        assert started.pid is not None
        assert rec.of(Kind.CHILD_EXITED, "root/agent") == []


def test_shipped_tree_runs_the_sample_app_against_a_scripted_caller(tmp_path: Path) -> None:
    """supervisors/agents.toml through the CLI, as the README runs it: ends by itself, exit 0."""
    text = (ROOT / "supervisors" / "agents.toml").read_text()
    tree = tmp_path / "agents.toml"
    tree.write_text(text.replace('"voice-out/', f'"{tmp_path}/voice-out/'))
    proc = subprocess.run(
        [sys.executable, "-m", "otp_agents.cli", "run", str(tree)],
        cwd=ROOT,
        capture_output=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    transcript = (tmp_path / "voice-out" / "front-desk" / "transcript.txt").read_text().lower()
    assert "agent heard: what is my name" in transcript
    assert "agent said: your name is alice." in transcript
