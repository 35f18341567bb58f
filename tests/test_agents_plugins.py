"""The offline engines as LiveKit Agents plugins: flite speech recognised by pocketsphinx through
the plugin interfaces, the rule LLM's memory read back from the chat context, and one
AgentSession (Silero VAD, both plugins, the rule LLM) holding a two-turn spoken conversation."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="livekit-agents is not installed")

from livekit import rtc
from livekit.agents import Agent, AgentSession, ConversationItemAddedEvent, function_tool, llm
from livekit.agents.voice import io

from otp_agents.voice.agents_plugins import FliteTTS, RuleLLM, SphinxSTT
from otp_agents.voice.audio import pcm

from .voice_helpers import needs_tts

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    # livekit-agents runs on asyncio only (tasks, queues and events of the running loop).
    # This overrides the conftest fixture that runs every test on asyncio and trio.
    return "asyncio"


@pytest.fixture(scope="module")
def sphinx() -> SphinxSTT:
    return SphinxSTT()  # the model takes ~0.5 s to load: one for the module


async def spoken(text: str, voice: FliteTTS | None = None) -> list[rtc.AudioFrame]:
    tts = voice or FliteTTS()
    return [ev.frame async for ev in tts.synthesize(text)]


def reshaped(frames: list[rtc.AudioFrame], channels: int) -> list[rtc.AudioFrame]:
    """The same audio with every channel a copy of the first."""
    out = []
    for f in frames:
        data = np.repeat(pcm(f), channels)
        out.append(rtc.AudioFrame(data.tobytes(), f.sample_rate, channels, f.samples_per_channel))
    return out


# --- speech: FliteTTS -> SphinxSTT -----------------------------------------------------------


@needs_tts
@pytest.mark.parametrize(("rate", "channels"), [(16_000, 1), (48_000, 1), (24_000, 2)])
async def test_flite_speech_is_recognised(sphinx: SphinxSTT, rate: int, channels: int) -> None:
    voice = FliteTTS(sample_rate=rate)
    frames = await spoken("My favorite color is green.", voice)
    assert frames and {(f.sample_rate, f.num_channels) for f in frames} == {(rate, 1)}
    assert 1.0 < sum(f.duration for f in frames) < 4.0
    event = await sphinx.recognize(reshaped(frames, channels))
    assert event.type == "final_transcript"
    heard = event.alternatives[0]
    assert heard.language == "en"
    assert {"favorite", "color", "green"} <= set(heard.text.split()), heard.text


@needs_tts
async def test_espeak_speaks_when_flite_is_missing(
    sphinx: SphinxSTT, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_which: Callable[[str], str | None] = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd: None if cmd == "flite" else real_which(cmd))
    voice = FliteTTS()
    assert voice.provider == "espeak-ng" and voice.sample_rate == 16_000
    frames = await spoken("My favorite color is green.", voice)
    assert {f.sample_rate for f in frames} == {16_000}  # espeak-ng's 22050 Hz, resampled
    text = (await sphinx.recognize(frames)).alternatives[0].text
    assert {"color", "green"} <= set(text.split()), text  # sphinx hears espeak-ng less well


@needs_tts
async def test_blank_text_and_empty_audio(sphinx: SphinxSTT) -> None:
    assert await spoken("   ") == []
    event = await sphinx.recognize([])
    assert event.alternatives[0].text == ""


# --- RuleLLM ---------------------------------------------------------------------------------


async def answer(chat: llm.ChatContext, model: RuleLLM | None = None) -> tuple[str, int]:
    """The reply's text and how many chunks it came in."""
    chunks = []
    async with (model or RuleLLM()).chat(chat_ctx=chat) as stream:
        chunks = [c.delta.content async for c in stream if c.delta and c.delta.content]
    return "".join(chunks).strip(), len(chunks)


def chat(*turns: tuple[llm.ChatRole, str]) -> llm.ChatContext:
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="system", content="You are a helpful voice assistant.")
    for role, text in turns:
        ctx.add_message(role=role, content=text)
    return ctx


async def test_rule_llm_remembers_a_name_from_the_chat_context() -> None:
    first = chat(("user", "Hi, my name is Alice."))
    assert await answer(first) == ("Nice to meet you, alice.", 1)
    later = chat(
        ("user", "Hi, my name is Alice."),
        ("assistant", "Nice to meet you, alice."),
        ("user", "My favorite color is blue."),
        ("assistant", "Got it."),
        ("user", "What is my name?"),
    )
    assert await answer(later) == ("Your name is alice.", 1)
    assert await answer(chat(("user", "What is my name?"))) == ("You have not told me your name.", 1)


async def test_rule_llm_streams_one_chunk_per_sentence() -> None:
    text, chunks = await answer(chat(("user", "Tell me a story.")))
    assert text.startswith("Once upon a time") and chunks == 7


async def test_rule_llm_greets_when_no_user_message_is_waiting() -> None:
    assert await answer(chat()) == ("Hello! How can I help you today?", 2)
    after = chat(("user", "my name is bob"), ("assistant", "Nice to meet you, bob."))
    after.add_message(role="system", content="Greet the user again.")  # generate_reply(instructions=)
    assert (await answer(after))[0] == "Hello bob! How can I help you?"


async def test_rule_llm_takes_and_ignores_tools() -> None:
    @function_tool
    async def weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    stream = RuleLLM().chat(
        chat_ctx=chat(("user", "What is the weather in Paris?")),
        tools=[weather],
        parallel_tool_calls=False,
        tool_choice="auto",
        extra_kwargs={"temperature": 0.0},
    )
    response = await stream.collect()
    assert response.text == "I cannot see outside, but I hope it is sunny." and not response.tool_calls


# --- a whole AgentSession --------------------------------------------------------------------


class Caller(io.AudioInput):
    def __init__(self) -> None:
        super().__init__(label="caller")
        self.queue: asyncio.Queue[rtc.AudioFrame] = asyncio.Queue()

    async def __anext__(self) -> rtc.AudioFrame:
        return await self.queue.get()

    async def say(self, frames: list[rtc.AudioFrame]) -> None:
        """The speech in 10 ms frames with 1.2 s of silence after it, a few times real time."""
        speech = pcm(rtc.combine_audio_frames(frames))
        rate = frames[0].sample_rate
        samples = np.concatenate([speech, np.zeros(rate * 12 // 10, np.int16)])
        step = rate // 100
        for i in range(0, len(samples), step):
            part = samples[i : i + step]
            self.queue.put_nowait(rtc.AudioFrame(part.tobytes(), rate, 1, len(part)))
            await asyncio.sleep(0.002)


class Speaker(io.AudioOutput):
    """Plays instantly: each segment is reported played as soon as it is flushed."""

    def __init__(self) -> None:
        super().__init__(label="speaker", capabilities=io.AudioOutputCapabilities(pause=False))
        self.seconds = 0.0
        self._segment = 0.0

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        self._segment += frame.duration
        self.seconds += frame.duration

    def flush(self) -> None:
        super().flush()
        self.on_playback_finished(playback_position=self._segment, interrupted=False)
        self._segment = 0.0

    def clear_buffer(self) -> None:
        self.on_playback_finished(playback_position=self._segment, interrupted=True)
        self._segment = 0.0


@needs_tts
@pytest.mark.timeout(60)
async def test_an_agent_session_talks_offline(sphinx: SphinxSTT) -> None:
    silero = pytest.importorskip("livekit.plugins.silero")
    caller, speaker = Caller(), Speaker()
    caller_voice = FliteTTS(voice="rms")
    replies: list[str] = []
    replied = asyncio.Event()

    def on_item(ev: ConversationItemAddedEvent) -> None:
        if isinstance(ev.item, llm.ChatMessage) and ev.item.role == "assistant":
            replies.append((ev.item.text_content or "").strip())
            replied.set()

    async def turn(text: str) -> str:
        replied.clear()
        await caller.say(await spoken(text, caller_voice))
        await asyncio.wait_for(replied.wait(), 15)
        return replies[-1]

    session: AgentSession[None] = AgentSession(
        vad=silero.VAD.load(), stt=sphinx, llm=RuleLLM(), tts=FliteTTS()
    )
    async with session:
        session.input.audio = caller
        session.output.audio = speaker
        session.on("conversation_item_added", on_item)
        await session.start(Agent(instructions="You are a test agent."))
        await session.generate_reply(instructions="Greet the caller.")
        await asyncio.wait_for(replied.wait(), 15)
        assert replies == ["Hello! How can I help you today?"]
        assert await turn("My name is Alice.") == "Nice to meet you, alice."
        assert await turn("What is my name?") == "Your name is alice."
    users = [m.text_content for m in session.history.messages() if m.role == "user"]
    assert users == ["my name is alice", "what is my name"]
    assert speaker.seconds > 3.0  # the three replies were spoken
