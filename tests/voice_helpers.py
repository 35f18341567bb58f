"""Shared pieces of the voice tests: callers spoken by flite, a pipeline over real components,
and a listener that checks the agent's side of a call is speech (VAD + STT)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from otp_agents.voice.agent import Agent, Conversation, default_agents
from otp_agents.voice.audio import SAMPLE_RATE
from otp_agents.voice.eot import TurnModel
from otp_agents.voice.local_io import WavInput, WavSink
from otp_agents.voice.pipeline import PipelineEvent, PipelineSettings, VoicePipeline
from otp_agents.voice.providers import ProviderStats, RetryPolicy
from otp_agents.voice.samples import render_script
from otp_agents.voice.stt import STT, PocketSphinxSTT
from otp_agents.voice.tts import TTS, EspeakTTS, FliteTTS
from otp_agents.voice.vad import SileroVAD, SpeechDetector

needs_tts = pytest.mark.skipif(
    (shutil.which("flite") is None or shutil.which("espeak-ng") is None)
    and not os.environ.get("OTP_AGENTS_REQUIRE_VOICE"),  # CI sets it: a missing voice fails there
    reason="needs Debian's flite and espeak-ng (make system-deps installs them)",
)

FAST_RETRY = RetryPolicy(retries=3, base_delay=0.02, factor=2.0, jitter=0.1, timeout=10.0)


def caller(tmp: Path, script: str, voice: str = "rms", gap: float = 3.0) -> Path:
    path = tmp / "script.txt"
    path.write_text(script)
    return render_script(path, tmp, voice=voice, gap=gap)


@dataclass
class Call:
    pipeline: VoicePipeline
    events: list[PipelineEvent] = field(default_factory=list)
    out: Path = Path()

    def of(self, kind: str) -> list[PipelineEvent]:
        return [e for e in self.events if e.kind == kind]

    def said(self, who: str = "agent_said") -> list[str]:
        return [e.text for e in self.of(who)]

    @property
    def conversation(self) -> Conversation:
        return self.pipeline.conversation


async def hold_call(
    tmp: Path,
    wav: Path,
    *,
    settings: PipelineSettings | None = None,
    agents: dict[str, Agent] | None = None,
    tts: Sequence[TTS] | None = None,
    stats: ProviderStats | None = None,
    start_agent: str = "receptionist",
    stt: STT | None = None,
    realtime: bool = False,
    turn_model: TurnModel | None = None,
) -> Call:
    """Run one conversation through the real offline stack, on the virtual clock unless
    ``realtime``."""
    out = tmp / "call.wav"
    sink = WavSink(out, user_channel=True)
    call = Call(pipeline=None, out=out)  # type: ignore[arg-type]
    pipeline = VoicePipeline(
        vad=SileroVAD(),
        stt=stt or PocketSphinxSTT(),
        tts=list(tts) if tts is not None else [FliteTTS(), EspeakTTS()],
        agents=agents if agents is not None else dict(default_agents()),
        conversation=Conversation(agent=start_agent),
        sink=sink,
        settings=settings or PipelineSettings(retry=FAST_RETRY),
        on_event=call.events.append,
        stats=stats,
        virtual_clock=not realtime,
        turn_model=turn_model,
    )
    call.pipeline = pipeline
    pipeline.taps.append(sink.user_frame)
    await pipeline.run(WavInput(wav, realtime=realtime))
    await sink.aclose()
    return call


def channels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(caller, agent) of a stereo call recording."""
    import wave

    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 2 and w.getframerate() == SAMPLE_RATE
        raw = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    both = raw.reshape(-1, 2)
    return both[:, 0].copy(), both[:, 1].copy()


async def listen(samples: np.ndarray) -> list[tuple[float, float, str]]:
    """Speech segments in ``samples`` (start, end, words), found by the real VAD and STT."""
    detector = SpeechDetector(SileroVAD())
    stt = PocketSphinxSTT()
    edges = detector.push(samples, len(samples) / SAMPLE_RATE)
    segments: list[tuple[float, float, str]] = []
    start: float | None = None
    for edge in edges:
        if edge.edge.value == "start":
            start = edge.at
        elif start is not None:
            segments.append((start, edge.at, ""))
            start = None
    if start is not None:
        segments.append((start, len(samples) / SAMPLE_RATE, ""))
    heard = []
    for a, b, _ in segments:
        lo, hi = max(0, int((a - 0.3) * SAMPLE_RATE)), int((b + 0.3) * SAMPLE_RATE)
        heard.append((a, b, await stt.recognize(samples[lo:hi])))
    return heard
