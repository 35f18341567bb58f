"""A LiveKit Agents app that uses the worker options an operator's app would: an agent name,
a request handler (rejects rooms named ``no-*``; accepts others as a participant of its own
naming, with attributes), and per-job memory bounds. Otherwise the sample app."""

from __future__ import annotations

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobProcess, JobRequest
from livekit.plugins import silero

from otp_agents.voice.agents_plugins import FliteTTS, RuleLLM, SphinxSTT

server = AgentServer(job_memory_warn_mb=700, job_memory_limit_mb=1500)


def prewarm(proc: JobProcess) -> None:
    proc.userdata["vad"] = silero.VAD.load()


server.setup_fnc = prewarm


async def on_request(req: JobRequest) -> None:
    if req.room.name.startswith("no-"):
        await req.reject()
        return
    await req.accept(identity=f"picky-{req.room.name}", name="Picky", attributes={"tier": "gold"})


class Receptionist(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Be brief.")

    async def on_enter(self) -> None:
        self.session.generate_reply(instructions="Greet the caller.")


@server.rtc_session(agent_name="picky", on_request=on_request)
async def entrypoint(ctx: JobContext) -> None:
    session: AgentSession[None] = AgentSession(
        vad=ctx.proc.userdata["vad"], stt=SphinxSTT(), llm=RuleLLM(), tts=FliteTTS()
    )
    await session.start(agent=Receptionist(), room=ctx.room)
    await ctx.connect()
