"""The offline engines as LiveKit Agents (1.8) plugins, so an unmodified ``entrypoint(ctx)`` runs
with no network and no API keys::

    session = AgentSession(
        vad=silero.VAD.load(),
        stt=agents_plugins.SphinxSTT(),
        llm=agents_plugins.RuleLLM(),
        tts=agents_plugins.FliteTTS(),
    )

:class:`SphinxSTT` and :class:`FliteTTS` are non-streaming: AgentSession puts its VAD in front
of the first (``OTP_AGENTS_STT_STREAMING=1`` makes it stream, see :mod:`.agents_stt`) and its
sentence splitter in front of the second.
:class:`RuleLLM` answers by the rules of :mod:`.agent` and keeps no state: what it remembers
it reads back from the chat context.

Needs ``livekit-agents`` (not a dependency of the package; import this module only where it is
installed).
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

import numpy as np
from livekit import rtc
from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectOptions,
    APIError,
    LanguageCode,
    NotGivenOr,
    llm,
    stt,
    tts,
    utils,
)

from otp_agents.voice.agent import Conversation, RuleAgent, Session, echo, memory_rules
from otp_agents.voice.audio import SAMPLE_RATE, pcm, resample
from otp_agents.voice.providers import ProviderError
from otp_agents.voice.stt import PocketSphinxSTT
from otp_agents.voice.tts import EspeakTTS
from otp_agents.voice.tts import FliteTTS as FliteEngine

ENV_STREAMING = "OTP_AGENTS_STT_STREAMING"  # "1": the recogniser streams (see SphinxSTT)
Events = Literal["metrics_collected", "error"]  # the base classes' own events; we add none


class SphinxSTT(stt.STT[Events]):
    """pocketsphinx with the US English model from its wheel, on whole utterances behind the
    session's VAD; with ``OTP_AGENTS_STT_STREAMING=1`` streaming instead, each utterance decoded
    while the caller speaks (:mod:`.agents_stt`)."""

    def __init__(self, *, language: str = "en") -> None:
        self._streaming = os.environ.get(ENV_STREAMING) == "1"
        super().__init__(capabilities=stt.STTCapabilities(streaming=self._streaming, interim_results=False))
        self._language = language
        self._engine = PocketSphinxSTT()  # loads the model (~0.5 s): build it before the call

    @property
    def provider(self) -> str:
        return "pocketsphinx"

    @property
    def model(self) -> str:
        return "en-us"

    def stream(
        self,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> stt.RecognizeStream:
        if not self._streaming:
            return super().stream(language=language, conn_options=conn_options)
        from otp_agents.voice import agents_stt

        lang = language if utils.is_given(language) else self._language
        return agents_stt.stream(self, self._engine, lang, conn_options)  # type: ignore[no-any-return]

    async def _recognize_impl(
        self,
        buffer: utils.AudioBuffer,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> stt.SpeechEvent:
        text = ""
        if buffer:  # an empty list has nothing to say (and combine_audio_frames rejects it)
            frame = rtc.combine_audio_frames(buffer)
            samples = pcm(frame)
            if frame.num_channels > 1:
                samples = samples.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
            text = await self._engine.recognize(resample(samples, frame.sample_rate, SAMPLE_RATE))
        lang = LanguageCode(language if utils.is_given(language) else self._language)
        return stt.SpeechEvent(
            type=stt.SpeechEventType.FINAL_TRANSCRIPT,
            request_id=utils.shortuuid("sphinx_"),
            alternatives=[stt.SpeechData(language=lang, text=text)],
        )


class FliteTTS(tts.TTS[Events]):
    """Debian's flite (espeak-ng when flite is not installed), resampled to ``sample_rate``."""

    def __init__(self, *, voice: str = "kal16", sample_rate: int = SAMPLE_RATE) -> None:
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=False), sample_rate=sample_rate, num_channels=1
        )
        flite = FliteEngine(voice)
        self._engine: FliteEngine | EspeakTTS = flite if flite.available() else EspeakTTS()

    @property
    def provider(self) -> str:
        return self._engine.name

    @property
    def model(self) -> str:
        return self._engine.voice

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        return _FliteStream(self, text, conn_options)


class _FliteStream(tts.ChunkedStream):
    def __init__(self, owner: FliteTTS, text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=owner, input_text=text, conn_options=conn_options)
        self._owner = owner

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        rate = self._owner.sample_rate
        output_emitter.initialize(
            request_id=utils.shortuuid("flite_"), sample_rate=rate, num_channels=1, mime_type="audio/pcm"
        )
        if not self.input_text.strip():
            return
        try:
            samples, produced = await self._owner._engine.synthesize(self.input_text)
        except ProviderError as e:
            raise APIError(str(e), retryable=e.retryable) from e
        output_emitter.push(resample(samples, produced, rate).tobytes())
        output_emitter.flush()


def _hello(session: Session) -> str:
    name = session.userdata.get("name")
    return f"Hello {name}! How can I help you?" if name else "Hello! How can I help you today?"


def memory_agent() -> RuleAgent:
    """The default rules of :class:`RuleLLM`: the receptionist's memory rules, no hand-offs."""
    return RuleAgent("rules", memory_rules(), echo, greeting=_hello)


class RuleLLM(llm.LLM[Events]):
    """A deterministic stand-in for an LLM: the last user message is answered by ``agent``'s
    rules, after the earlier user messages have been replayed through them to rebuild what they
    remember. A chat that does not end with a user message (a ``generate_reply(instructions=...)``
    greeting) gets the agent's greeting. Tools are ignored."""

    def __init__(self, *, agent: RuleAgent | None = None) -> None:
        super().__init__()
        self.agent = agent or memory_agent()

    @property
    def provider(self) -> str:
        return "otp-agents"

    @property
    def model(self) -> str:
        return self.agent.name

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> llm.LLMStream:
        return _RuleStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class _RuleStream(llm.LLMStream):
    def __init__(
        self,
        owner: RuleLLM,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool],
        conn_options: APIConnectOptions,
    ) -> None:
        super().__init__(owner, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options)
        self._agent = owner.agent

    async def _run(self) -> None:
        turns = [
            (m.role, m.text_content or "")
            for m in self._chat_ctx.messages()
            if m.role in ("user", "assistant")
        ]
        question = turns.pop()[1] if turns and turns[-1][0] == "user" else None
        session = Session(Conversation(agent=self._agent.name))
        for role, text in turns:
            if role == "user":
                async for _ in self._agent.reply(text, session):
                    pass
        if question is None:
            greeting = self._agent.greeting(session) or _hello(session)
            sentences = [s + " " for s in re.split(r"(?<=[.!?])\s+", greeting.strip()) if s]
        else:
            sentences = [s async for s in self._agent.reply(question, session)]
        request_id = utils.shortuuid("rules_")
        for sentence in sentences:
            delta = llm.ChoiceDelta(role="assistant", content=sentence)
            self._event_ch.send_nowait(llm.ChatChunk(id=request_id, delta=delta))
