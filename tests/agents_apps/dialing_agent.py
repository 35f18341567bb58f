"""An outbound caller in the shape of LiveKit's outbound-call examples (a test input): the
entrypoint dials the callee over SIP with ``ctx.api.sip.create_sip_participant``, then talks.
Its one dial must stay one when its process dies mid-call."""

import json

from livekit import api
from livekit.agents import Agent, AgentServer, AgentSession, JobContext, inference


class Caller(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are calling from the clinic to confirm an appointment.")

    async def on_enter(self) -> None:
        self.session.generate_reply(instructions="say who you are and why you are calling")


server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    number = json.loads(ctx.job.metadata or "{}").get("phone_number", "+15550100")
    await ctx.api.sip.create_sip_participant(
        api.CreateSIPParticipantRequest(
            room_name=ctx.room.name,
            sip_trunk_id="ST_outbound",
            sip_call_to=number,
            participant_identity="callee",
            wait_until_answered=True,
        )
    )
    session: AgentSession[None] = AgentSession(
        stt=inference.STT("deepgram/nova-3"),
        llm=inference.LLM("openai/gpt-4.1-mini"),
        tts=inference.TTS("cartesia/sonic-3"),
    )
    await session.start(agent=Caller(), room=ctx.room)
