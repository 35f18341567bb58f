"""The voice pipeline on real audio through the real offline components: flite speaks the
caller, Silero VAD and pocketsphinx listen, the rule agents answer, flite speaks the agent.

Conversations run on the virtual clock (the caller's audio waits while a reply is produced), so
what happens does not depend on this machine's speed; timing is measured in bench/, not here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import numpy as np
import pytest

from otp_agents.voice.agent import Session, default_agents
from otp_agents.voice.audio import FRAME_SAMPLES, SAMPLE_RATE, Reframer, rms_dbfs
from otp_agents.voice.denoise import NoiseSuppressor
from otp_agents.voice.local_io import WavSink
from otp_agents.voice.pipeline import PipelineSettings
from otp_agents.voice.providers import ProviderError, ProviderStats, RetryPolicy
from otp_agents.voice.tts import FliteTTS

from .voice_helpers import FAST_RETRY, caller, channels, hold_call, listen, needs_tts

pytestmark = [pytest.mark.anyio, needs_tts]


async def test_question_in_spoken_answer_out(tmp_path: Path) -> None:
    wav = caller(tmp_path, "My favorite color is green.\nWhat is my favorite color?\n")
    call = await hold_call(tmp_path, wav)
    assert call.said("user_said") == ["my favorite color is green", "what is my favorite color"]
    assert call.said() == ["Got it. Your favorite color is green.", "Your favorite color is green."]
    # The agent's side of the recording is speech: the real VAD finds it, the real STT reads it.
    _, agent = channels(call.out)
    heard = await listen(agent)
    assert len(heard) >= 2, heard
    words = " ".join(text for _, _, text in heard)
    assert "favorite color" in words and "green" in words, heard
    # Each answer starts after its question ended: never over the caller.
    turns = call.of("turn")
    assert len(turns) == 2
    for turn in turns:
        assert turn.value is not None and turn.value >= call.pipeline.settings.min_endpointing_delay - 0.05


async def test_barge_in_stops_the_agent_and_keeps_what_was_heard(tmp_path: Path) -> None:
    wav = caller(tmp_path, "Tell me a story.\npause 4\nStop.\n")
    call = await hold_call(tmp_path, wav)
    interrupted = call.of("interrupted")
    assert len(interrupted) == 1
    assert interrupted[0].value is not None and interrupted[0].value > 5  # most of the story dropped
    story = [m for m in call.conversation.history if m.role == "assistant" and m.interrupted]
    assert len(story) == 1 and story[0].text.startswith("Once upon a time")
    assert "many years" not in story[0].text  # the end was never heard
    assert call.said()[-1] == "Okay, I stopped."
    # In the recording the agent goes quiet within the interruption time of the caller's "stop".
    _, agent = channels(call.out)
    cut = interrupted[0].t
    after = agent[int((cut + 0.05) * SAMPLE_RATE) : int((cut + 0.6) * SAMPLE_RATE)]
    assert rms_dbfs(after) < -60
    before = agent[int((cut - 1.0) * SAMPLE_RATE) : int((cut - 0.6) * SAMPLE_RATE)]
    assert rms_dbfs(before) > -40


async def test_short_speech_does_not_interrupt(tmp_path: Path) -> None:
    wav = caller(tmp_path, "Tell me a story.\npause 4\nOkay.\npause 25\n")
    settings = PipelineSettings(retry=FAST_RETRY, min_interruption_duration=1.5)
    call = await hold_call(tmp_path, wav, settings=settings)
    assert call.of("interrupted") == []
    assert any("many years" in m.text for m in call.conversation.history if m.role == "assistant")


@pytest.mark.parametrize(("delay", "turns"), [(1.2, 1), (0.1, 2)])
async def test_endpointing_delay_decides_whether_a_pause_ends_the_turn(
    tmp_path: Path, delay: float, turns: int
) -> None:
    wav = caller(tmp_path, "My favorite color is\npause 0.7\ngreen.\n")
    call = await hold_call(
        tmp_path, wav, settings=PipelineSettings(retry=FAST_RETRY, min_endpointing_delay=delay)
    )
    said = call.said("user_said")
    assert len(said) == turns, said
    if turns == 1:
        assert said == ["my favorite color is green"]
        assert call.conversation.userdata["color"] == "green"
    else:
        assert said[0].startswith("my favorite color is") and "green" not in said[0]
        assert "green" in said[1]


async def test_handoff_keeps_user_data_and_applies_the_context_policy(tmp_path: Path) -> None:
    wav = caller(
        tmp_path,
        voice="slt",
        script="Hello, my name is Anna.\nMy favorite color is green.\nPlease transfer me to support.\n"
        "pause 7\nWhat is my favorite color?\n",
    )
    call = await hold_call(tmp_path, wav)
    convo = call.conversation
    assert convo.agent == "support"
    name = convo.userdata.get("name")
    assert name and convo.userdata["color"] == "green"
    handoffs = call.of("handoff")
    assert [h.text for h in handoffs] == ["receptionist -> support"]
    # The support agent greets with what the receptionist learnt, then answers from it.
    assert f"This is support. Hello {name}. I see your favorite color is green." in call.said()
    assert call.said()[-1] == "Your favorite color is green."
    # keep last 4: the greeting exchange fell out of the history, the hand-off is noted
    texts = [m.text for m in convo.history]
    assert not any(t.startswith("hello my name is") for t in texts)
    assert "handed off from receptionist to support" in texts


class _Flaky:
    """A real TTS whose calls number ``failing`` fail with a retryable error (call 1 renders
    the fallback line at start)."""

    def __init__(self, failing: set[int]) -> None:
        self.inner = FliteTTS()
        self.name = "flaky-flite"
        self.failing = failing
        self.calls = 0

    async def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        self.calls += 1
        if self.calls in self.failing:
            raise ProviderError(self.name, "server", "503 from the voice service", retryable=True)
        return await self.inner.synthesize(text)


async def test_provider_failing_twice_then_succeeding_is_retried_with_the_default_policy(
    tmp_path: Path,
) -> None:
    wav = caller(tmp_path, "What is my favorite color?\n")
    flaky = _Flaky(failing={2, 3})
    stats = ProviderStats()
    call = await hold_call(tmp_path, wav, tts=[flaky], stats=stats, settings=PipelineSettings())
    assert flaky.calls == 4  # the fallback line at start, then the answer: failed, failed, spoken
    assert stats.errors[("flaky-flite", "server")] == 2
    assert call.said() == ["You have not told me your favorite color yet."]
    assert call.of("fallback") == []


class _BrokenAgent:
    name = "receptionist"

    def __init__(self) -> None:
        self.calls = 0

    async def reply(self, text: str, session: Session) -> AsyncIterator[str]:
        self.calls += 1
        raise ProviderError("llm", "rate_limit", "429 too many requests", retryable=True)
        yield ""  # pragma: no cover - makes this an async generator

    def greeting(self, session: Session) -> str | None:
        return None


async def test_agent_failing_twice_then_succeeding(tmp_path: Path) -> None:
    class Twice(_BrokenAgent):
        async def reply(self, text: str, session: Session) -> AsyncIterator[str]:
            self.calls += 1
            if self.calls <= 2:
                raise ProviderError("llm", "timeout", "upstream timeout", retryable=True)
            yield "Third time lucky."

    agent = Twice()
    stats = ProviderStats()
    wav = caller(tmp_path, "What time is it?\n")
    call = await hold_call(tmp_path, wav, agents={"receptionist": agent}, stats=stats)
    assert agent.calls == 3
    assert stats.errors[("llm", "timeout")] == 2
    assert call.said() == ["Third time lucky."]


async def test_provider_failing_for_good_gives_the_spoken_fallback_line(tmp_path: Path) -> None:
    agent = _BrokenAgent()
    stats = ProviderStats()
    wav = caller(tmp_path, "What time is it?\n")
    call = await hold_call(tmp_path, wav, agents={"receptionist": agent}, stats=stats)
    assert agent.calls == 1 + FAST_RETRY.retries
    assert stats.errors[("llm", "rate_limit")] == 1 + FAST_RETRY.retries
    assert len(call.of("fallback")) == 1
    _, agent_side = channels(call.out)
    words = " ".join(t for _, _, t in await listen(agent_side))
    assert "sorry" in words and "trouble" in words, words


async def test_every_tts_down_still_speaks_the_prerendered_fallback(tmp_path: Path) -> None:
    """Voices that work at start (the fallback line is rendered) and then die."""
    wav = caller(tmp_path, "What time is it?\n")
    stats = ProviderStats()
    dying = _Flaky(failing=set(range(2, 100)))
    call = await hold_call(tmp_path, wav, tts=[dying], stats=stats)
    assert stats.errors[("flaky-flite", "server")] == 1 + FAST_RETRY.retries
    assert len(call.of("provider_failed")) == 1
    assert call.conversation.turns == 1
    _, agent_side = channels(call.out)
    words = " ".join(t for _, _, t in await listen(agent_side))
    assert "sorry" in words, words


async def test_speech_starts_on_the_first_sentence(tmp_path: Path) -> None:
    """The second sentence is only written once the first one's audio is queued."""
    queued_before_second: list[float] = []

    class Slow:
        name = "receptionist"

        async def reply(self, text: str, session: Session) -> AsyncIterator[str]:
            yield "First sentence here. "
            with anyio.move_on_after(5):
                await first_queued.wait()
            queued_before_second.append(call_sink[0].queued if call_sink else 0.0)
            yield "And the second one."

        def greeting(self, session: Session) -> str | None:
            return None

    call_sink: list[WavSink] = []
    first_queued = anyio.Event()
    from otp_agents.voice import pipeline as pipeline_mod

    real_queue = pipeline_mod.VoicePipeline._queue

    async def spy(self: pipeline_mod.VoicePipeline, reply: object, sentence: str, audio: np.ndarray) -> None:
        await real_queue(self, reply, sentence, audio)  # type: ignore[arg-type]
        assert isinstance(self.sink, WavSink)
        call_sink[:] = [self.sink]
        first_queued.set()

    pipeline_mod.VoicePipeline._queue = spy  # type: ignore[method-assign,assignment]
    try:
        wav = caller(tmp_path, "What time is it?\n")
        call = await hold_call(tmp_path, wav, agents={"receptionist": Slow()})
    finally:
        pipeline_mod.VoicePipeline._queue = real_queue  # type: ignore[method-assign]
    assert len(queued_before_second) == 1 and queued_before_second[0] > 0.3
    assert call.said() == ["First sentence here. And the second one."]


async def test_noise_suppression_keeps_speech_and_refuses_wrong_frames(tmp_path: Path) -> None:
    ns = NoiseSuppressor()
    with pytest.raises(ValueError, match="10 ms frames"):
        ns.process(np.zeros(FRAME_SAMPLES - 1, dtype=np.int16))  # would abort the process in the APM
    wav = caller(tmp_path, "What is my favorite color?\n")
    settings = PipelineSettings(retry=FAST_RETRY, noise_suppression=True)
    call = await hold_call(tmp_path, wav, settings=settings)
    assert call.said("user_said") == ["what is my favorite color"]


def test_reframer_cuts_exact_frames() -> None:
    r = Reframer(160)
    out = r.push(np.arange(100, dtype=np.int16)) + r.push(np.arange(300, dtype=np.int16))
    assert [len(f) for f in out] == [160, 160]
    tail = r.flush()
    assert len(tail) == 1 and len(tail[0]) == 160 and tail[0][80:].max() == 0


def test_retry_policy_delays_grow_and_jitter_stays_bounded() -> None:
    import random

    policy = RetryPolicy()
    assert (policy.retries, policy.base_delay, policy.factor) == (3, 1.0, 2.0)
    rng = random.Random(7)
    for attempt, base in ((1, 1.0), (2, 2.0), (3, 4.0)):
        for _ in range(50):
            d = policy.delay(attempt, rng)
            assert base * (1 - policy.jitter) <= d <= base * (1 + policy.jitter)


async def test_default_agents_hand_off_both_ways() -> None:
    from otp_agents.voice.agent import ContextPolicy, Conversation

    agents = default_agents()
    assert set(agents) == {"receptionist", "support"}
    there = Session(Conversation(agent="receptionist"))
    said = "".join([c async for c in agents["receptionist"].reply("please transfer me to support", there)])
    assert said.strip() == "Transferring you to support."
    assert there.pending == ("support", ContextPolicy("last", 4))
    back = Session(Conversation(agent="support"))
    said = "".join([c async for c in agents["support"].reply("take me back to reception", back)])
    assert (
        said.strip() == "Sending you back." and back.pending is not None and back.pending[0] == "receptionist"
    )


async def test_caller_going_on_while_the_agent_thinks_keeps_all_their_words(tmp_path: Path) -> None:
    """Real time: the turn is committed at a pause, the caller goes on while the agent is still
    thinking; the cut-off words open the next turn instead of being lost."""

    class Thoughtful:
        name = "receptionist"

        def __init__(self) -> None:
            self.inner = default_agents()["receptionist"]

        async def reply(self, text: str, session: Session) -> AsyncIterator[str]:
            await anyio.sleep(2.0)  # long enough for the caller to go on
            async for chunk in self.inner.reply(text, session):
                yield chunk

        def greeting(self, session: Session) -> str | None:
            return None

    wav = caller(tmp_path, "My favorite color is\npause 0.6\ngreen.\n")
    settings = PipelineSettings(retry=FAST_RETRY, min_endpointing_delay=0.1, min_interruption_duration=0.3)
    call = await hold_call(
        tmp_path, wav, settings=settings, agents={"receptionist": Thoughtful()}, realtime=True
    )
    assert len(call.of("interrupted")) == 1
    users = [m.text for m in call.conversation.history if m.role == "user"]
    assert len(users) == 1 and users[0].startswith("my favorite color is") and "green" in users[0], users
    assert call.conversation.turns == 1


async def test_stt_stream_failure_is_counted_and_the_turn_recognized_again(tmp_path: Path) -> None:
    from otp_agents.voice.stt import PocketSphinxSTT

    class BrokenStream:
        def __init__(self, inner: PocketSphinxSTT) -> None:
            self.inner = inner

        async def push(self, samples: np.ndarray) -> None:
            raise ProviderError("sphinx-stream", "connection", "stream reset", retryable=True)

        async def finish(self) -> str:
            raise AssertionError("a broken stream is never finished")

        async def aclose(self) -> None:
            self.closed = True

    class FlakyStreamSTT(PocketSphinxSTT):
        name = "sphinx-stream"
        streams: list[BrokenStream] = []

        def stream(self) -> BrokenStream:  # type: ignore[override]
            s = BrokenStream(self)
            self.streams.append(s)
            return s

    stt = FlakyStreamSTT()
    stats = ProviderStats()
    wav = caller(tmp_path, "My favorite color is green.\nWhat is my favorite color?\n")
    call = await hold_call(tmp_path, wav, stt=stt, stats=stats)
    assert call.said() == ["Got it. Your favorite color is green.", "Your favorite color is green."]
    assert stats.errors[("sphinx-stream", "connection")] == 2
    assert all(getattr(s, "closed", False) for s in stt.streams)


async def test_barge_in_after_a_hand_off_keeps_the_hand_off_in_the_history(tmp_path: Path) -> None:
    """Talked over after the receptionist's last sentence, before support's greeting played:
    the history keeps the hand-off and what was heard, and drops the greeting nobody heard."""
    wav = caller(tmp_path, "Please transfer me to support.\npause 1.2\nStop.\n")
    call = await hold_call(tmp_path, wav)
    interrupted = call.of("interrupted")
    assert len(interrupted) == 1 and interrupted[0].text == "Transferring you to support."
    texts = [(m.role, m.agent, m.text) for m in call.conversation.history]
    assert call.conversation.agent == "support"
    assert ("assistant", "receptionist", "Transferring you to support.") in texts
    assert ("system", "support", "handed off from receptionist to support") in texts
    assert "This is support." in call.said()  # it was queued...
    assert not any(t == "This is support." for _, _, t in texts)  # ...but never heard
    assert texts[-1] == ("assistant", "support", "Okay, I stopped.")
