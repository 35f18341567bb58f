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

from otp_agents.voice.agent import Agent, ChatMessage, Conversation, Session, check_agents, switch_agent
from otp_agents.voice.audio import (
    FRAME_SAMPLES,
    FRAME_SECONDS,
    SAMPLE_RATE,
    AudioInput,
    AudioSink,
    ToPipeline,
    frame_of,
    resample,
)
from otp_agents.voice.denoise import NoiseSuppressor
from otp_agents.voice.providers import ProviderError, ProviderStats, RetryPolicy, call
from otp_agents.voice.stt import STT, STTStream
from otp_agents.voice.tts import TTS
from otp_agents.voice.vad import Edge, SpeechDetector, SpeechEdge, VADModel, VADSettings

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
    before: _Utterance | None = None  # words of a turn that was cut off before it was answered


_SttCommand = tuple[str, "_Utterance | np.ndarray"]  # ("open", utt) | ("audio", samples) | ("finish", utt)


@dataclass
class _Said:
    """One assistant message of a reply and the sentences of ``_Reply.spoken`` it covers."""

    message: ChatMessage
    first: int
    end: int


@dataclass
class _Reply:
    utterance: _Utterance
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    spoken: list[tuple[str, float]] = field(default_factory=list)  # (sentence, seconds) queued
    start: float | None = None  # where its audio begins on the sink's cumulative timeline (s)
    pushed: float = 0.0  # seconds of audio queued so far
    said: list[_Said] = field(default_factory=list)
    user_message: ChatMessage | None = None
    first_audio: float | None = None
    interrupted: bool = False

    def heard_sentences(self, played_until: float) -> int:
        """How many of its sentences had begun playing when the sink reached ``played_until``."""
        if self.start is None:
            return 0
        played = played_until - self.start
        n, t = 0, 0.0
        for _, seconds in self.spoken:
            if t >= played:
                break
            n += 1
            t += seconds
        return n


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
        self._replies: list[_Reply] = []  # reply tasks alive (producing, or waiting their turn)
        self._audible: list[_Reply] = []  # replies with audio in the sink, oldest first
        self._pushed_total = 0.0  # seconds ever queued on the sink: a timeline to place replies on
        self._carry: _Utterance | None = None  # a turn cut off before its answer: joins the next
        self._idle = anyio.Event()
        self._idle.set()
        self._turn_lock = anyio.Lock()
        self._draining = False
        self._drain_requested = anyio.Event()
        self.drained = False  # run() returned because of a drain, not because the input ended
        self.completed = False  # the input ended and the last turn was answered and played
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
        self._drain_requested.set()

    @property
    def agent_speaking(self) -> bool:
        return bool(self._replies) or self.sink.queued > 0

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
                with anyio.CancelScope() as reading:
                    tg.start_soon(self._watch_drain, reading)
                    async for frame in source.frames():
                        for samples in self._in.push(frame):
                            await self._step(samples)
                        if self._draining and not self.in_turn:
                            break
                if self._draining and not self.in_turn:
                    self.drained = True
                else:
                    await self._finish()
            finally:
                tg.cancel_scope.cancel()
                self._stt_send.close()
                self._stt_receive.close()
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    await source.aclose()

    async def _watch_drain(self, reading: anyio.CancelScope) -> None:
        """A drain must not wait for the next input frame (a muted caller sends none)."""
        await self._drain_requested.wait()
        while self.in_turn:  # noqa: ASYNC110 - the turn's state changes in many places
            await anyio.sleep(0.05)
        reading.cancel()

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
        """End of input: feed silence until the turn in progress is answered and played (in real
        time unless on the virtual clock). Gives up, leaving ``completed`` False, only after
        ``drain_playout_limit`` seconds with no reply being produced."""
        silence = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        idle_budget = (
            self.settings.drain_playout_limit + self.settings.min_endpointing_delay
        ) / FRAME_SECONDS
        hard_budget = 4 * idle_budget  # a reply stuck in retries ends here at the latest
        steps = idle_steps = 0
        while self.in_turn and idle_steps < idle_budget and steps < hard_budget:
            if not self.virtual_clock:
                await anyio.sleep(FRAME_SECONDS)
            await self._step(silence)
            steps += 1
            idle_steps = 0 if self._replies else idle_steps + 1
        self.completed = not self.in_turn

    def _feed(self, utt: _Utterance, samples: np.ndarray) -> None:
        if utt.size >= self.settings.max_utterance * SAMPLE_RATE:
            return
        utt.samples.append(samples)
        utt.size += len(samples)
        self._to_stt(("audio", samples))

    def _to_stt(self, command: _SttCommand) -> None:
        try:
            self._stt_send.send_nowait(command)
        except anyio.WouldBlock:
            # STT is minutes behind (a provider stuck in retries): this audio is lost to the
            # stream; the utterance keeps its copy for ``recognize``.
            if command[0] != "audio":
                raise

    def _on_edge(self, edge: SpeechEdge) -> None:
        if edge.edge is Edge.START:
            if self._utterance is not None and self._endpoint_at is not None:
                self._endpoint_at = None  # a pause, not the end of the turn: keep listening
                self._utterance.ended = None
            elif self._utterance is None:
                utt = _Utterance(started=edge.at)
                self._utterance = utt
                self._to_stt(("open", utt))
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
        played_until = self._pushed_total - dropped
        heard: list[str] = []
        for reply in [*self._audible, *self._replies]:
            if reply.interrupted:
                continue
            reply.interrupted = True
            reply.scope.cancel()
            if reply.first_audio is None and reply.utterance is not None:
                # Cut off before it said anything: the caller was still talking. Their words
                # so far open the next turn instead of being lost.
                self._carry = reply.utterance
                self._retract_user(reply)
            heard += self._amend(reply, played_until)
        self._audible.clear()
        self._emit("interrupted", value=round(dropped, 3), text=" ".join(heard))
        if self._on_turn is not None and heard:
            assert self._tg is not None
            self._tg.start_soon(self._save)

    def _commit(self) -> None:
        utt = self._utterance
        assert utt is not None
        self._utterance, self._endpoint_at = None, None
        utt.before, self._carry = self._carry, None
        self._to_stt(("finish", utt))
        self._emit("user_turn_end", value=round(self.now - (utt.ended or self.now), 3))
        reply = _Reply(utt)
        self._replies.append(reply)
        self._idle = anyio.Event()
        assert self._tg is not None
        self._tg.start_soon(self._respond, reply)

    # -- STT, one utterance at a time, in order ---------------------------------------------------

    async def _stt_worker(self) -> None:
        stream: STTStream | None = None
        broken = False
        async for kind, item in self._stt_receive:
            if kind == "open":
                if stream is not None:
                    await stream.aclose()
                stream, broken = self.stt.stream(), False
            elif kind == "audio" and isinstance(item, np.ndarray) and stream is not None and not broken:
                try:
                    await stream.push(item)
                except Exception as exc:  # the retry re-runs the whole utterance from its own copy
                    broken = True
                    err = exc if isinstance(exc, ProviderError) else _as_provider_error(self.stt.name, exc)
                    self.stats.record(err)
                    await stream.aclose()
            elif kind == "finish" and isinstance(item, _Utterance):
                await self._transcribe(item, None if broken else stream)
                stream = None

    async def _transcribe(self, utt: _Utterance, stream: STTStream | None) -> None:
        pending = [stream]

        async def attempt() -> str:
            s, pending[0] = pending[0], None
            if s is not None:
                try:
                    return await s.finish()
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await s.aclose()
                    raise
            audio = np.concatenate(utt.samples) if utt.samples else np.zeros(0, dtype=np.int16)
            return await self.stt.recognize(audio)

        try:
            utt.text = await call(self.stt.name, attempt, self.settings.retry, self.stats)
        except ProviderError as exc:
            utt.error = exc
        finally:
            if pending[0] is not None:
                with anyio.CancelScope(shield=True):
                    await pending[0].aclose()
            utt.transcript.set()

    # -- a reply -----------------------------------------------------------------------------------

    async def _respond(self, reply: _Reply) -> None:
        committed_wall = time.monotonic()
        timing: dict[str, float | str] = {}
        try:
            async with self._turn_lock:
                with reply.scope:
                    await self._turn(reply, timing, committed_wall)
                self._report_turn(reply, timing)
                if self._on_turn is not None and (reply.said or reply.user_message is not None):
                    await self._save()
        finally:
            self._replies.remove(reply)
            if not self._replies:
                self._idle.set()

    async def _save(self) -> None:
        assert self._on_turn is not None
        with anyio.CancelScope(shield=True):
            await self._on_turn(self.conversation)

    async def _transcript(self, utt: _Utterance) -> tuple[str, ProviderError | None]:
        parts: list[str] = []
        for u in (utt.before, utt):
            if u is None:
                continue
            await u.transcript.wait()
            if u.error is not None:
                return "", u.error
            parts.append(u.text.strip())
        return " ".join(p for p in parts if p), None

    async def _turn(self, reply: _Reply, timing: dict[str, float | str], t0: float) -> None:
        text, error = await self._transcript(reply.utterance)
        timing["stt_s"] = round(time.monotonic() - t0, 4)
        if error is not None:
            self._emit("provider_failed", text=str(error), fields={"provider": error.provider})
            await self._say_fallback(reply)
            return
        if not text:
            self._emit("empty_transcript")
            return
        convo = self.conversation
        reply.user_message = ChatMessage("user", text)
        convo.history.append(reply.user_message)
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
        await self._speak_stream(reply, stream, agent.name, timing)
        if session.pending is None:
            return
        to, policy = session.pending
        if to not in self.agents:
            self._emit("handoff_refused", text=f"no agent named {to!r}", agent=agent.name)
            return
        switch_agent(convo, to, policy)
        self._emit("handoff", text=f"{agent.name} -> {to}", agent=to, fields={"keep": policy.keep})
        try:
            greeting = self.agents[to].greeting(Session(convo))
        except Exception as exc:  # an agent's bug costs its greeting, not the call
            self._emit("provider_failed", text=f"{to}.greeting: {exc!r}", fields={"provider": to})
            greeting = None
        if greeting:
            await self._speak_stream(reply, _one(greeting), to, timing)

    async def _agent_stream(self, agent: Agent, text: str, session: Session) -> AsyncIterator[str]:
        """The agent's reply, retried until its first chunk arrives (a reply that fails
        half-way is not retried: the user would hear it twice)."""

        async def first_chunk() -> tuple[str, AsyncIterator[str]]:
            it = agent.reply(text, session).__aiter__()
            try:
                return await it.__anext__(), it
            except StopAsyncIteration:
                return "", it
            except BaseException:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await _close(it)
                raise

        head, rest = await call(agent.name, first_chunk, self.settings.retry, self.stats)
        return _chain(head, rest)

    async def _speak_stream(
        self, reply: _Reply, chunks: AsyncIterator[str], agent: str, timing: dict[str, float | str]
    ) -> None:
        """Speak complete sentences as they arrive; the history gets what was said."""
        first = len(reply.spoken)
        pending = ""
        failed = False
        timeout = self.settings.retry.timeout
        try:
            while True:
                try:
                    with anyio.fail_after(timeout) if timeout else contextlib.nullcontext():
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                pending += chunk
                *done, pending = _SENTENCE_END.split(pending)
                for sentence in done:
                    if sentence.strip():
                        await self._speak(reply, sentence.strip(), timing)
        except Exception as exc:  # the agent failed half-way: keep what was said, then say so
            err = exc if isinstance(exc, ProviderError) else _as_provider_error(agent, exc)
            if not isinstance(exc, ProviderError):
                self.stats.record(err)
            self._emit("provider_failed", text=str(err), fields={"provider": err.provider})
            failed = True
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await _close(chunks)
        if not failed and pending.strip():
            await self._speak(reply, pending.strip(), timing)
        self._record(reply, first, agent)
        if failed:
            await self._say_fallback(reply)

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
        first = len(reply.spoken)
        await self._queue(reply, self.settings.fallback_line, self._fallback_audio)
        self._record(reply, first, self.conversation.agent)

    async def _queue(self, reply: _Reply, sentence: str, audio: np.ndarray) -> None:
        rate = self.sink.sample_rate
        step = int(rate * PUSH_SECONDS)
        if reply.first_audio is None:
            reply.first_audio = self.now
            reply.start = self._pushed_total
            played = self._pushed_total - self.sink.queued
            self._audible = [
                r
                for r in self._audible
                if not r.interrupted and (r in self._replies or (r.start or 0.0) + r.pushed > played + 1e-6)
            ]
            self._audible.append(reply)
        reply.spoken.append((sentence, len(audio) / rate))
        for i in range(0, len(audio), step):
            piece = audio[i : i + step]
            await self.sink.push(frame_of(piece, rate))
            reply.pushed += len(piece) / rate
            self._pushed_total += len(piece) / rate

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

    # -- the history -------------------------------------------------------------------------------

    def _record(self, reply: _Reply, first: int, agent: str) -> None:
        """Sentences ``first:`` of the reply become one assistant message."""
        if reply.interrupted or first >= len(reply.spoken):
            return
        text = " ".join(sentence for sentence, _ in reply.spoken[first:])
        message = ChatMessage("assistant", text, agent=agent)
        self.conversation.history.append(message)
        reply.said.append(_Said(message, first, len(reply.spoken)))
        self._emit("agent_said", text=text, agent=agent)

    def _amend(self, reply: _Reply, played_until: float) -> list[str]:
        """A barge-in: the history keeps what the caller heard of ``reply``, marked interrupted.
        Returns the sentences heard."""
        heard = reply.heard_sentences(played_until)
        history = self.conversation.history
        covered = 0
        for said in reply.said:
            covered = said.end
            index = next((i for i, m in enumerate(history) if m is said.message), None)
            if index is None:
                continue
            kept = [s for s, _ in reply.spoken[said.first : min(said.end, heard)]]
            if not kept:
                del history[index]
            elif heard < said.end:
                history[index] = ChatMessage(
                    "assistant", " ".join(kept), agent=said.message.agent, interrupted=True
                )
        if heard > covered:  # heard but not yet in the history: the reply was cut mid-stream
            text = " ".join(s for s, _ in reply.spoken[covered:heard])
            history.append(ChatMessage("assistant", text, agent=self.conversation.agent, interrupted=True))
        return [s for s, _ in reply.spoken[:heard]]

    def _retract_user(self, reply: _Reply) -> None:
        message = reply.user_message
        if message is None:
            return
        history = self.conversation.history
        index = next((i for i, m in enumerate(history) if m is message), None)
        if index is not None:
            del history[index]
            self.conversation.turns -= 1
        reply.user_message = None

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


def _as_provider_error(agent: str, exc: Exception) -> ProviderError:
    if isinstance(exc, TimeoutError):
        return ProviderError(agent, "timeout", "the reply stream stalled", retryable=False)
    return ProviderError(agent, "crash", f"{type(exc).__name__}: {exc}", retryable=False)


async def _close(it: AsyncIterator[str]) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        await aclose()


async def _chain(head: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        if head:
            yield head
        async for chunk in rest:
            yield chunk
    finally:
        await _close(rest)


async def _one(text: str) -> AsyncIterator[str]:
    yield text
