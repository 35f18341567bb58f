"""The reply machinery of the voice pipeline: a committed turn becomes a transcript (STT,
retried), the agent's streamed text, each sentence synthesized (TTS, retried, then the next TTS)
and queued on the sink, while the history keeps what the caller actually heard."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import anyio
import numpy as np

from otp_agents.voice.agent import Agent, ChatMessage, Conversation, Session, switch_agent
from otp_agents.voice.audio import (
    AudioSink,
    frame_of,
    resample,
)
from otp_agents.voice.providers import ProviderError, ProviderStats, call
from otp_agents.voice.stt import STT
from otp_agents.voice.tts import TTS
from otp_agents.voice.turns import PipelineEvent, PipelineSettings, Reply, Said, Utterance

PUSH_SECONDS = 0.1  # synthesized audio goes to the sink in pieces this long (barge-in granularity)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class Replies:
    """Mixed into :class:`~otp_agents.voice.pipeline.VoicePipeline`: the state it shares with the
    frame loop is declared here."""

    settings: PipelineSettings
    stt: STT
    tts: list[TTS]
    agents: Mapping[str, Agent]
    sink: AudioSink
    conversation: Conversation
    stats: ProviderStats
    virtual_clock: bool
    now: float
    _on_event: Callable[[PipelineEvent], None]
    _on_turn: Callable[[Conversation], Awaitable[None]] | None
    _replies: list[Reply]
    _audible: list[Reply]
    _pushed_total: float
    _carry: Utterance | None
    _idle: anyio.Event
    _turn_lock: anyio.Lock
    _fallback_audio: np.ndarray | None

    async def _respond(self, reply: Reply) -> None:
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

    async def _transcript(self, utt: Utterance) -> tuple[str, ProviderError | None]:
        parts: list[str] = []
        for u in (utt.before, utt):
            if u is None:
                continue
            await u.transcript.wait()
            if u.error is not None:
                return "", u.error
            parts.append(u.text.strip())
        return " ".join(p for p in parts if p), None

    async def _turn(self, reply: Reply, timing: dict[str, float | str], t0: float) -> None:
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
        self, reply: Reply, chunks: AsyncIterator[str], agent: str, timing: dict[str, float | str]
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
            err = exc if isinstance(exc, ProviderError) else as_provider_error(agent, exc)
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

    async def _speak(self, reply: Reply, sentence: str, timing: dict[str, float | str]) -> None:
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

    async def _say_fallback(self, reply: Reply) -> None:
        self._emit("fallback", text=self.settings.fallback_line)
        assert self._fallback_audio is not None
        first = len(reply.spoken)
        await self._queue(reply, self.settings.fallback_line, self._fallback_audio)
        self._record(reply, first, self.conversation.agent)

    async def _queue(self, reply: Reply, sentence: str, audio: np.ndarray) -> None:
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

    def _record(self, reply: Reply, first: int, agent: str) -> None:
        """Sentences ``first:`` of the reply become one assistant message."""
        if reply.interrupted or first >= len(reply.spoken):
            return
        text = " ".join(sentence for sentence, _ in reply.spoken[first:])
        message = ChatMessage("assistant", text, agent=agent)
        self.conversation.history.append(message)
        reply.said.append(Said(message, first, len(reply.spoken)))
        self._emit("agent_said", text=text, agent=agent)

    def _amend(self, reply: Reply, played_until: float) -> list[str]:
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

    def _retract_user(self, reply: Reply) -> None:
        message = reply.user_message
        if message is None:
            return
        history = self.conversation.history
        index = next((i for i, m in enumerate(history) if m is message), None)
        if index is not None:
            del history[index]
            self.conversation.turns -= 1
        reply.user_message = None

    def _report_turn(self, reply: Reply, timing: dict[str, float | str]) -> None:
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


def as_provider_error(agent: str, exc: Exception) -> ProviderError:
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
