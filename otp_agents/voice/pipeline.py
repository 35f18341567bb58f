"""The voice pipeline: audio in -> (noise suppression) -> VAD -> STT -> agent -> TTS -> audio out.

Everything runs on the conversation clock, ``now``: the seconds of user audio consumed so far.
Each 10 ms input frame moves it on and lets the sink play 10 ms (so a WAV sink records exactly
what a caller would have heard, interruptions included).

A turn, step by step:

1. The VAD detector reports the start of speech; the audio from ``prefix_padding`` before it
   on goes to a new STT utterance.
2. Speech ends (``min_silence`` of quiet). The turn is committed ``min_endpointing_delay``
   seconds after the speech ended, unless the user speaks again first, in which case the same
   utterance simply goes on.
3. On commit a reply task starts: the transcript (STT, retried), the agent's streamed text,
   each complete sentence synthesized (TTS, retried, then the next TTS) and queued on the sink.
   The first sentence plays while the rest is still being written and synthesized.
4. If the user speaks for ``min_interruption_duration`` while the agent is speaking, the
   queued audio is dropped and the reply cancelled (barge-in); what was heard is kept in the
   history, marked interrupted.
5. A provider that keeps failing makes the agent say the fallback line.
6. After the reply (and any hand-off) ``on_turn`` gets the conversation, e.g. to checkpoint it.

With ``virtual_clock`` the input waits while a reply is being produced, as if STT, the agent and
TTS took no time: results do not depend on the machine's speed (tests, offline batch runs).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
import msgspec
import numpy as np

from .agent import Agent, ChatMessage, Conversation, Session, check_agents, switch_agent
from .audio import (
    FRAME_SAMPLES,
    FRAME_SECONDS,
    SAMPLE_RATE,
    AudioInput,
    AudioSink,
    ToPipeline,
    frame_of,
    resample,
)
from .denoise import NoiseSuppressor
from .providers import ProviderError, ProviderStats, RetryPolicy, call
from .stt import STT, STTStream
from .tts import TTS
from .vad import Edge, SpeechDetector, SpeechEdge, VADModel, VADSettings

PUSH_SECONDS = 0.1  # synthesized audio goes to the sink in pieces this long (barge-in granularity)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class PipelineSettings:
    min_endpointing_delay: float = 0.5  # quiet after speech before the turn is taken as finished
    min_interruption_duration: float = 0.5  # speech over the agent that stops the agent
    allow_interruptions: bool = True
    noise_suppression: bool = False
    vad: VADSettings = field(default_factory=VADSettings)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    fallback_line: str = "Sorry, I am having trouble right now. Please say that again."
    max_utterance: float = 30.0  # seconds of user audio kept per turn (for STT retries)
    drain_playout_limit: float = 30.0  # at most this much queued speech is played out at the end

    def check(self) -> None:
        if self.min_endpointing_delay < 0 or self.min_interruption_duration < 0:
            raise ValueError("endpointing and interruption durations must be >= 0")
        self.vad.check()


class PipelineEvent(msgspec.Struct, omit_defaults=True):
    """What happened, for transcripts, logs and metrics. ``t``: conversation time (s)."""

    kind: str
    t: float
    wall: float
    text: str = ""
    agent: str = ""
    value: float | None = None
    fields: dict[str, float | str] = {}


@dataclass
class _Utterance:
    started: float
    ended: float | None = None
    samples: list[np.ndarray] = field(default_factory=list)
    size: int = 0
    transcript: anyio.Event = field(default_factory=anyio.Event)
    text: str = ""
    error: ProviderError | None = None


_SttCommand = tuple[str, "_Utterance | np.ndarray"]  # ("open", utt) | ("audio", samples) | ("finish", utt)


@dataclass
class _Reply:
    utterance: _Utterance
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    spoken: list[tuple[str, float]] = field(default_factory=list)  # (sentence, seconds) queued
    pushed: float = 0.0  # seconds of audio queued so far
    messages: int = 0  # assistant messages this reply added to the history
    first_audio: float | None = None
    finished: bool = False
    interrupted: bool = False


class VoicePipeline:
    def __init__(
        self,
        *,
        vad: VADModel,
        stt: STT,
        tts: Sequence[TTS],
        agents: Mapping[str, Agent],
        conversation: Conversation,
        sink: AudioSink,
        settings: PipelineSettings | None = None,
        on_event: Callable[[PipelineEvent], None] | None = None,
        on_turn: Callable[[Conversation], Awaitable[None]] | None = None,
        stats: ProviderStats | None = None,
        virtual_clock: bool = False,
        start_time: float = 0.0,
    ) -> None:
        self.settings = settings or PipelineSettings()
        self.settings.check()
        check_agents(agents, conversation.agent)
        if not tts:
            raise ValueError("the pipeline needs at least one TTS provider")
        self.stt, self.tts, self.agents, self.sink = stt, list(tts), agents, sink
        self.conversation = conversation
        self.detector = SpeechDetector(vad, self.settings.vad)
        self.stats = stats or ProviderStats()
        self._on_event = on_event or (lambda e: None)
        self._on_turn = on_turn
        self.virtual_clock = virtual_clock
        self.now = start_time
        self.taps: list[Callable[[np.ndarray], None]] = []  # see every input frame (recorders)
        self._in = ToPipeline()
        self._denoise = NoiseSuppressor() if self.settings.noise_suppression else None
        pad = max(1, math.ceil(self.settings.vad.prefix_padding / FRAME_SECONDS))
        self._preroll: deque[np.ndarray] = deque(maxlen=pad)
        self._utterance: _Utterance | None = None
        self._endpoint_at: float | None = None
        self._barge_from: float | None = None
        self._reply: _Reply | None = None  # the reply being produced
        self._last_reply: _Reply | None = None  # the latest one (its audio may still play)
        self._replies = 0  # reply tasks alive
        self._idle = anyio.Event()
        self._idle.set()
        self._turn_lock = anyio.Lock()
        self._draining = False
        self.drained = False  # run() returned because of a drain, not because the input ended
        self._fallback_audio: np.ndarray | None = None
        self._stt_send, self._stt_receive = anyio.create_memory_object_stream[_SttCommand](10_000)
        self._tg: anyio.abc.TaskGroup | None = None

    # -- public -----------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Render the fallback line once, so it can be said even when every TTS is down."""
        audio = await self._synthesize(self.settings.fallback_line, count_errors=False)
        if audio is None:
            names = ", ".join(t.name for t in self.tts)
            raise RuntimeError(f"no TTS provider could speak ({names}); is flite or espeak-ng installed?")
        self._fallback_audio = audio
        # One pass of real speech through STT: the recogniser's running normalisation starts
        # from speech instead of nothing, so the caller's first words are not the worst heard.
        with contextlib.suppress(Exception):
            await self.stt.recognize(resample(audio, self.sink.sample_rate, SAMPLE_RATE))

    def drain(self) -> None:
        """Finish the current turn (reply spoken to the end), then make :meth:`run` return."""
        self._draining = True

    @property
    def agent_speaking(self) -> bool:
        return self._replies > 0 or self.sink.queued > 0

    @property
    def in_turn(self) -> bool:
        return self._utterance is not None or self.agent_speaking

    async def run(self, source: AudioInput) -> None:
        """Consume ``source`` until it ends (or a drain completes), then let the last turn
        finish and its reply play out."""
        if self._fallback_audio is None:
            await self.prepare()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._stt_worker)
            try:
                async for frame in source.frames():
                    for samples in self._in.push(frame):
                        await self._step(samples)
                    if self._draining and not self.in_turn:
                        self.drained = True
                        break
                else:
                    await self._finish()
            finally:
                tg.cancel_scope.cancel()
                self._stt_send.close()
                self._stt_receive.close()
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    await source.aclose()

    # -- the frame loop ---------------------------------------------------------------------------

    async def _step(self, samples: np.ndarray) -> None:
        if self.virtual_clock:
            await self._idle.wait()
        if self._denoise is not None:
            samples = self._denoise.process(samples)
        for tap in self.taps:
            tap(samples)
        self.sink.advance(FRAME_SECONDS)
        self.now += FRAME_SECONDS
        self._preroll.append(samples)
        if self._utterance is not None:
            self._feed(self._utterance, samples)
        for edge in self.detector.push(samples, self.now):
            self._on_edge(edge)
        if self._barge_from is not None and self.detector.speaking:
            self._maybe_interrupt()
        if (
            self._endpoint_at is not None
            and self.now >= self._endpoint_at - 1e-9
            and not self.detector.speaking
        ):
            self._commit()

    async def _finish(self) -> None:
        """End of input: feed silence until the turn in progress is answered and played."""
        silence = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        budget = int(
            (self.settings.drain_playout_limit + self.settings.min_endpointing_delay + 5) / FRAME_SECONDS
        )
        for _ in range(budget):
            if not self.in_turn:
                break
            if not self.virtual_clock and self._replies and self.sink.queued == 0:
                await anyio.sleep(FRAME_SECONDS)  # a reply is still being produced
            await self._step(silence)

    def _feed(self, utt: _Utterance, samples: np.ndarray) -> None:
        if utt.size >= self.settings.max_utterance * SAMPLE_RATE:
            return
        utt.samples.append(samples)
        utt.size += len(samples)
        self._stt_send.send_nowait(("audio", samples))

    def _on_edge(self, edge: SpeechEdge) -> None:
        if edge.edge is Edge.START:
            if self._utterance is not None and self._endpoint_at is not None:
                self._endpoint_at = None  # a pause, not the end of the turn: keep listening
                self._utterance.ended = None
            elif self._utterance is None:
                utt = _Utterance(started=edge.at)
                self._utterance = utt
                self._stt_send.send_nowait(("open", utt))
                for samples in self._preroll:
                    self._feed(utt, samples)
                self._emit("user_speech_started")
            if self.agent_speaking:
                self._barge_from = edge.at
        else:
            self._barge_from = None
            if self._utterance is not None:
                self._utterance.ended = edge.at
                self._endpoint_at = edge.at + self.settings.min_endpointing_delay

    def _maybe_interrupt(self) -> None:
        assert self._barge_from is not None
        if not self.agent_speaking:
            self._barge_from = None
            return
        if not self.settings.allow_interruptions:
            return
        if self.now - self._barge_from < self.settings.min_interruption_duration:
            return
        self._barge_from = None
        dropped = self.sink.clear()
        reply = self._reply or self._last_reply
        heard = ""
        if reply is not None and not reply.interrupted:
            reply.interrupted = True
            heard = self._heard(reply, dropped)
            reply.scope.cancel()
            self._amend(reply, heard)
        self._emit("interrupted", value=round(dropped, 3), text=heard)

    def _commit(self) -> None:
        utt = self._utterance
        assert utt is not None
        self._utterance, self._endpoint_at = None, None
        self._stt_send.send_nowait(("finish", utt))
        self._emit("user_turn_end", value=round(self.now - (utt.ended or self.now), 3))
        reply = _Reply(utt)
        self._replies += 1
        self._idle = anyio.Event()
        assert self._tg is not None
        self._tg.start_soon(self._respond, reply)

    # -- STT, one utterance at a time, in order ---------------------------------------------------

    async def _stt_worker(self) -> None:
        stream: STTStream | None = None
        broken: Exception | None = None
        async for kind, item in self._stt_receive:
            if kind == "open":
                if stream is not None:
                    await stream.aclose()
                stream, broken = self.stt.stream(), None
            elif kind == "audio" and isinstance(item, np.ndarray) and stream is not None and broken is None:
                try:
                    await stream.push(item)
                except Exception as exc:  # the retry below re-runs the whole utterance
                    broken = exc
            elif kind == "finish" and isinstance(item, _Utterance):
                await self._transcribe(item, stream if broken is None else None)
                stream = None

    async def _transcribe(self, utt: _Utterance, stream: STTStream | None) -> None:
        first = [stream]

        async def attempt() -> str:
            s, first[0] = first[0], None
            if s is not None:
                return await s.finish()
            audio = np.concatenate(utt.samples) if utt.samples else np.zeros(0, dtype=np.int16)
            return await self.stt.recognize(audio)

        try:
            utt.text = await call(self.stt.name, attempt, self.settings.retry, self.stats)
        except ProviderError as exc:
            utt.error = exc
        finally:
            if first[0] is not None:
                await first[0].aclose()
            utt.transcript.set()

    # -- a reply -----------------------------------------------------------------------------------

    async def _respond(self, reply: _Reply) -> None:
        committed_wall = time.monotonic()
        timing: dict[str, float | str] = {}
        try:
            async with self._turn_lock:
                self._reply = self._last_reply = reply
                with reply.scope:
                    await self._turn(reply, timing, committed_wall)
                reply.finished = True
                self._report_turn(reply, timing)
                if self._on_turn is not None and (reply.spoken or reply.utterance.text):
                    with anyio.CancelScope(shield=True):
                        await self._on_turn(self.conversation)
        finally:
            if self._reply is reply:
                self._reply = None
            self._replies -= 1
            if self._replies == 0:
                self._idle.set()

    async def _turn(self, reply: _Reply, timing: dict[str, float | str], t0: float) -> None:
        utt = reply.utterance
        await utt.transcript.wait()
        timing["stt_s"] = round(time.monotonic() - t0, 4)
        if utt.error is not None:
            self._emit("provider_failed", text=str(utt.error), fields={"provider": utt.error.provider})
            await self._say_fallback(reply)
            return
        text = utt.text.strip()
        if not text:
            self._emit("empty_transcript")
            return
        convo = self.conversation
        convo.history.append(ChatMessage("user", text))
        convo.turns += 1
        self._emit("user_said", text=text, agent=convo.agent)
        agent = self.agents[convo.agent]
        session = Session(convo)
        t_agent = time.monotonic()
        try:
            stream = await self._agent_stream(agent, text, session)
        except ProviderError as exc:
            self._emit("provider_failed", text=str(exc), fields={"provider": exc.provider})
            await self._say_fallback(reply)
            return
        timing["agent_s"] = round(time.monotonic() - t_agent, 4)
        said = await self._speak_stream(reply, stream, timing)
        self._said(reply, said, agent.name)
        self._emit("agent_said", text=said, agent=agent.name)
        if session.pending is not None:
            to, policy = session.pending
            if to not in self.agents:
                self._emit("handoff_refused", text=f"no agent named {to!r}", agent=agent.name)
                return
            switch_agent(convo, to, policy)
            self._emit("handoff", text=f"{agent.name} -> {to}", agent=to, fields={"keep": policy.keep})
            greeting = self.agents[to].greeting(Session(convo))
            if greeting:
                said = await self._speak_stream(reply, _one(greeting), timing)
                self._said(reply, said, to)
                self._emit("agent_said", text=said, agent=to)

    async def _agent_stream(self, agent: Agent, text: str, session: Session) -> AsyncIterator[str]:
        """The agent's reply, retried until its first chunk arrives (a reply that fails
        half-way is not retried: the user would hear it twice)."""

        async def first_chunk() -> tuple[str, AsyncIterator[str]]:
            it = agent.reply(text, session).__aiter__()
            try:
                return await it.__anext__(), it
            except StopAsyncIteration:
                return "", it

        head, rest = await call(agent.name, first_chunk, self.settings.retry, self.stats)
        return _chain(head, rest)

    async def _speak_stream(
        self, reply: _Reply, chunks: AsyncIterator[str], timing: dict[str, float | str]
    ) -> str:
        """Speak complete sentences as they arrive; returns what was said."""
        said: list[str] = []
        pending = ""
        try:
            async for chunk in chunks:
                pending += chunk
                *done, pending = _SENTENCE_END.split(pending)
                for sentence in done:
                    if sentence.strip():
                        await self._speak(reply, sentence.strip(), timing)
                        said.append(sentence.strip())
        except ProviderError as exc:  # the agent failed half-way: say so, keep what was said
            self._emit("provider_failed", text=str(exc), fields={"provider": exc.provider})
            await self._say_fallback(reply)
        if pending.strip():
            await self._speak(reply, pending.strip(), timing)
            said.append(pending.strip())
        return " ".join(said)

    async def _speak(self, reply: _Reply, sentence: str, timing: dict[str, float | str]) -> None:
        t0 = time.monotonic()
        audio = await self._synthesize(sentence)
        if "tts_s" not in timing:
            timing["tts_s"] = round(time.monotonic() - t0, 4)
        if audio is None:
            self._emit(
                "provider_failed", text=f"no TTS could say {sentence[:60]!r}", fields={"provider": "tts"}
            )
            audio = self._fallback_audio
            sentence = self.settings.fallback_line
        assert audio is not None
        await self._queue(reply, sentence, audio)

    async def _say_fallback(self, reply: _Reply) -> None:
        self._emit("fallback", text=self.settings.fallback_line)
        assert self._fallback_audio is not None
        await self._queue(reply, self.settings.fallback_line, self._fallback_audio)

    async def _queue(self, reply: _Reply, sentence: str, audio: np.ndarray) -> None:
        rate = self.sink.sample_rate
        step = int(rate * PUSH_SECONDS)
        if reply.first_audio is None:
            reply.first_audio = self.now
        reply.spoken.append((sentence, len(audio) / rate))

        for i in range(0, len(audio), step):
            await self.sink.push(frame_of(audio[i : i + step], rate))
        reply.pushed += len(audio) / rate

    async def _synthesize(self, text: str, *, count_errors: bool = True) -> np.ndarray | None:
        stats = self.stats if count_errors else ProviderStats()
        for tts in self.tts:

            async def attempt(tts: TTS = tts) -> tuple[np.ndarray, int]:
                return await tts.synthesize(text)

            try:
                samples, rate = await call(tts.name, attempt, self.settings.retry, stats)
            except ProviderError as exc:
                if count_errors:
                    self._emit("provider_gave_up", text=str(exc), fields={"provider": tts.name})
                continue
            return resample(samples, rate, self.sink.sample_rate)
        return None

    # -- bookkeeping -------------------------------------------------------------------------------

    def _heard(self, reply: _Reply, dropped: float) -> str:
        played = max(0.0, reply.pushed - dropped)
        heard, t = [], 0.0
        for sentence, seconds in reply.spoken:
            if t >= played:
                break
            heard.append(sentence)
            t += seconds
        return " ".join(heard)

    def _said(self, reply: _Reply, text: str, agent: str) -> None:
        if reply.interrupted:
            return
        self.conversation.history.append(ChatMessage("assistant", text, agent=agent))
        reply.messages += 1

    def _amend(self, reply: _Reply, heard: str) -> None:
        """A barge-in: the history keeps what the user heard of this reply, marked interrupted."""
        history = self.conversation.history
        if reply.messages and len(history) >= reply.messages:
            del history[-reply.messages :]
        reply.messages = 0
        if heard:
            history.append(ChatMessage("assistant", heard, agent=self.conversation.agent, interrupted=True))

    def _report_turn(self, reply: _Reply, timing: dict[str, float | str]) -> None:
        utt = reply.utterance
        if reply.first_audio is None or utt.ended is None:
            return
        latency = reply.first_audio - utt.ended
        self._emit("turn", value=round(latency, 4), agent=self.conversation.agent, fields=timing)

    def _emit(
        self,
        kind: str,
        *,
        text: str = "",
        agent: str = "",
        value: float | None = None,
        fields: dict[str, float | str] | None = None,
    ) -> None:
        self._on_event(
            PipelineEvent(
                kind=kind,
                t=round(self.now, 3),
                wall=time.time(),
                text=text,
                agent=agent,
                value=value,
                fields=fields or {},
            )
        )


async def _chain(head: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    if head:
        yield head
    async for chunk in rest:
        yield chunk


async def _one(text: str) -> AsyncIterator[str]:
    yield text
