"""The voice pipeline: audio in -> (noise suppression) -> VAD -> STT -> agent -> TTS -> audio out.

Everything runs on the conversation clock, ``now``: the seconds of user audio consumed so far.
Each 10 ms input frame moves it on and lets the sink play 10 ms (so a WAV sink records exactly
what a caller would have heard, interruptions included).

A turn, step by step:

1. The VAD detector reports the start of speech; the audio from ``prefix_padding`` before it
   on goes to a new STT utterance.
2. Speech ends (``min_silence`` of quiet). The turn is committed ``min_endpointing_delay``
   seconds after the speech ended, unless the user speaks again first, in which case the same
   utterance simply goes on. With a turn model (voice/eot.py) the end of speech is first scored
   for meaning: an unlikely end of turn waits ``max_endpointing_delay`` instead.
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
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence

import anyio
import numpy as np

from otp_agents.voice.agent import Agent, Conversation, check_agents
from otp_agents.voice.audio import (
    FRAME_SAMPLES,
    FRAME_SECONDS,
    SAMPLE_RATE,
    AudioInput,
    AudioSink,
    ToPipeline,
    resample,
)
from otp_agents.voice.denoise import NoiseSuppressor
from otp_agents.voice.eot import TurnModel, tail
from otp_agents.voice.providers import ProviderError, ProviderStats, call
from otp_agents.voice.replies import Replies, as_provider_error
from otp_agents.voice.stt import STT, STTStream
from otp_agents.voice.tts import TTS
from otp_agents.voice.turns import PipelineEvent, PipelineSettings, Reply, SttCommand, Utterance
from otp_agents.voice.vad import Edge, SpeechDetector, SpeechEdge, VADModel


class VoicePipeline(Replies):
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
        turn_model: TurnModel | None = None,
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
        self._utterance: Utterance | None = None
        self._endpoint_at: float | None = None
        self.turn_model = turn_model
        self._judged = anyio.Event()  # no end-of-turn prediction in flight
        self._judged.set()
        self._judging = 0  # the speech end being judged; a newer one makes older results moot
        self._barge_from: float | None = None
        self._replies: list[Reply] = []  # reply tasks alive (producing, or waiting their turn)
        self._audible: list[Reply] = []  # replies with audio in the sink, oldest first
        self._pushed_total = 0.0  # seconds ever queued on the sink: a timeline to place replies on
        self._carry: Utterance | None = None  # a turn cut off before its answer: joins the next
        self._idle = anyio.Event()
        self._idle.set()
        self._turn_lock = anyio.Lock()
        self._draining = False
        self._drain_requested = anyio.Event()
        self.drained = False  # run() returned because of a drain, not because the input ended
        self.completed = False  # the input ended and the last turn was answered and played
        self._fallback_audio: np.ndarray | None = None
        self._stt_send, self._stt_receive = anyio.create_memory_object_stream[SttCommand](10_000)
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
        # (A recogniser a zygote warmed that way has had it.)
        if getattr(self.stt, "warmed", False):
            return
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
            await self._judged.wait()
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
        wait = self.settings.min_endpointing_delay
        if self.turn_model is not None:
            wait = self.settings.turn.max_endpointing_delay
        idle_budget = (self.settings.drain_playout_limit + wait) / FRAME_SECONDS
        hard_budget = 4 * idle_budget  # a reply stuck in retries ends here at the latest
        steps = idle_steps = 0
        while self.in_turn and idle_steps < idle_budget and steps < hard_budget:
            if not self.virtual_clock:
                await anyio.sleep(FRAME_SECONDS)
            await self._step(silence)
            steps += 1
            idle_steps = 0 if self._replies else idle_steps + 1
        self.completed = not self.in_turn

    def _feed(self, utt: Utterance, samples: np.ndarray) -> None:
        if utt.size >= self.settings.max_utterance * SAMPLE_RATE:
            return
        utt.samples.append(samples)
        utt.size += len(samples)
        self._to_stt(("audio", samples))

    def _to_stt(self, command: SttCommand) -> None:
        try:
            self._stt_send.send_nowait(command)
        except anyio.WouldBlock:
            # STT is minutes behind (a provider stuck in retries): this audio is lost to the
            # stream; the utterance keeps its copy for ``recognize``.
            if command[0] != "audio":
                raise

    def _on_edge(self, edge: SpeechEdge) -> None:
        if edge.edge is Edge.START:
            if self._utterance is not None and self._utterance.ended is not None:
                self._endpoint_at = None  # a pause, not the end of the turn: keep listening
                self._utterance.ended = None
                self._judging += 1
            elif self._utterance is None:
                utt = Utterance(started=edge.at)
                self._utterance = utt
                self._to_stt(("open", utt))
                for samples in self._preroll:
                    self._feed(utt, samples)
                self._emit("user_speech_started")
            if self.agent_speaking:
                self._barge_from = edge.at
        else:
            self._barge_from = None
            if self._utterance is None:
                return
            self._utterance.ended = edge.at
            if self.turn_model is None:
                self._endpoint_at = edge.at + self.settings.min_endpointing_delay
            else:
                self._judging += 1
                self._judged = anyio.Event()
                assert self._tg is not None
                utt, model = self._utterance, self.turn_model
                self._tg.start_soon(self._judge, utt, model, self._judging, self._judged)

    async def _judge(self, utt: Utterance, model: TurnModel, judging: int, done: anyio.Event) -> None:
        """Score the end of speech; the turn ends after the min delay if it is likely over,
        after the max delay if not. A failed prediction falls back to the min delay."""
        try:
            p = await model.probability(tail(utt.samples, model.window))
        except Exception as exc:
            p = 1.0
            self._emit("end_of_turn_error", text=f"{model.name}: {exc}")
        finally:
            done.set()
        if judging != self._judging or self._utterance is not utt or utt.ended is None:
            return  # the caller went on speaking meanwhile
        likely = p >= self.settings.turn.threshold
        delay = self.settings.min_endpointing_delay if likely else self.settings.turn.max_endpointing_delay
        self._endpoint_at = utt.ended + delay
        self._emit("end_of_turn", value=round(p, 3), fields={"delay": delay})

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
        self._judging += 1
        utt.before, self._carry = self._carry, None
        self._to_stt(("finish", utt))
        self._emit("user_turn_end", value=round(self.now - (utt.ended or self.now), 3))
        reply = Reply(utt)
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
                    err = exc if isinstance(exc, ProviderError) else as_provider_error(self.stt.name, exc)
                    self.stats.record(err)
                    await stream.aclose()
            elif kind == "finish" and isinstance(item, Utterance):
                await self._transcribe(item, None if broken else stream)
                stream = None

    async def _transcribe(self, utt: Utterance, stream: STTStream | None) -> None:
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


__all__ = ["PipelineEvent", "PipelineSettings", "VoicePipeline"]
