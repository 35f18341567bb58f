"""A LiveKit Agents app with a bug: after greeting, its session loop blocks in a synchronous call
(the kind of mistake LiveKit's own "event loop blocked" warning is about). Used to show the host
leaf's heartbeat runs through the session's loop, so the supervisor dumps and replaces it."""

from __future__ import annotations

import asyncio
import time

from livekit.agents import Agent, AgentServer, AgentSession, JobContext
from livekit.plugins import silero

from otp_agents.voice.agents_plugins import FliteTTS, RuleLLM, SphinxSTT

server = AgentServer()


def freeze_the_session_loop() -> None:
    time.sleep(3600)


class Greeter(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Greet, then freeze.")

    async def on_enter(self) -> None:
        await self.session.generate_reply(instructions="Greet the caller.")
        asyncio.get_running_loop().call_later(0.5, freeze_the_session_loop)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    session: AgentSession[None] = AgentSession(
        vad=silero.VAD.load(), stt=SphinxSTT(), llm=RuleLLM(), tts=FliteTTS()
    )
    await session.start(agent=Greeter(), room=ctx.room)
    await ctx.connect()
