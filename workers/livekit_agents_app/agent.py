"""A LiveKit Agents app as its authors would write it: an AgentServer, an ``entrypoint(ctx)``,
an AgentSession with VAD, STT, LLM and TTS. It runs as it is under ``livekit.agents``'s own CLI
(``python agent.py console`` / ``start``) and, unmodified, under otp-agents' host leaf
(``workers/agents_host.py``). The providers are offline ones so it runs without network: swap
them for cloud plugins and nothing else changes.
"""

from __future__ import annotations

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobProcess, cli
from livekit.plugins import silero

from otp_agents.voice.agents_plugins import FliteTTS, RuleLLM, SphinxSTT

server = AgentServer()


def prewarm(proc: JobProcess) -> None:
    proc.userdata["vad"] = silero.VAD.load()


server.setup_fnc = prewarm


class Receptionist(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are the front desk of a small company. Be brief.")

    async def on_enter(self) -> None:
        self.session.generate_reply(instructions="Greet the caller.")


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    session: AgentSession[None] = AgentSession(
        vad=ctx.proc.userdata["vad"],
        stt=SphinxSTT(),
        llm=RuleLLM(),
        tts=FliteTTS(),
    )
    await session.start(agent=Receptionist(), room=ctx.room)
    await ctx.connect()


if __name__ == "__main__":
    cli.run_app(server)
