"""A LiveKit Agents app with bugs, picked by the job's room name, each done once per job (a
marker file in $FAULTS_DIR) so that the restarted job runs clean:

- ``freeze-*``: after greeting, its session loop blocks in a synchronous call;
- ``leak-*``: after greeting, it keeps 400 MB it never frees.

Otherwise it is the sample app (prewarm loads the VAD; offline providers)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobProcess, get_job_context
from livekit.plugins import silero

from otp_agents.voice.agents_plugins import FliteTTS, RuleLLM, SphinxSTT

server = AgentServer()
_kept: list[bytearray] = []


def prewarm(proc: JobProcess) -> None:
    proc.userdata["vad"] = silero.VAD.load()


server.setup_fnc = prewarm


def freeze_the_session_loop() -> None:
    time.sleep(3600)


def leak_memory() -> None:
    for _ in range(40):
        _kept.append(bytearray(os.urandom(1)) * (10 * 1024 * 1024))


def first_time(job_id: str) -> bool:
    marker = Path(os.environ["FAULTS_DIR"]) / job_id
    if marker.exists():
        return False
    marker.touch()
    return True


class Greeter(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Greet the caller.")

    async def on_enter(self) -> None:
        await self.session.generate_reply(instructions="Greet the caller.")
        job = get_job_context().job
        if job.room.name.startswith("freeze-") and first_time(job.id):
            asyncio.get_running_loop().call_later(0.5, freeze_the_session_loop)
        elif job.room.name.startswith("leak-") and first_time(job.id):
            leak_memory()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    session: AgentSession[None] = AgentSession(
        vad=ctx.proc.userdata["vad"], stt=SphinxSTT(), llm=RuleLLM(), tts=FliteTTS()
    )
    await session.start(agent=Greeter(), room=ctx.room)
    await ctx.connect()
