"""The pieces a conversation is made of, as the voice pipeline tracks them: its settings, the
events it reports, an utterance of the caller, and a reply of the agent (with what of it was
heard)."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import msgspec
import numpy as np

from otp_agents.voice.agent import ChatMessage
from otp_agents.voice.eot import TurnSettings
from otp_agents.voice.providers import ProviderError, RetryPolicy
from otp_agents.voice.vad import VADSettings


@dataclass(frozen=True)
class PipelineSettings:
    min_endpointing_delay: float = 0.5  # quiet after speech before the turn is taken as finished
    min_interruption_duration: float = 0.5  # speech over the agent that stops the agent
    allow_interruptions: bool = True
    noise_suppression: bool = False
    vad: VADSettings = field(default_factory=VADSettings)
    turn: TurnSettings = field(default_factory=TurnSettings)  # with a turn model (end of turn)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    fallback_line: str = "Sorry, I am having trouble right now. Please say that again."
    max_utterance: float = 30.0  # seconds of user audio kept per turn (for STT retries)
    drain_playout_limit: float = 30.0  # at most this much queued speech is played out at the end

    def check(self) -> None:
        if self.min_endpointing_delay < 0 or self.min_interruption_duration < 0:
            raise ValueError("endpointing and interruption durations must be >= 0")
        self.vad.check()
        self.turn.check(self.min_endpointing_delay)


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
class Utterance:
    started: float
    ended: float | None = None
    samples: list[np.ndarray] = field(default_factory=list)
    size: int = 0
    transcript: anyio.Event = field(default_factory=anyio.Event)
    text: str = ""
    error: ProviderError | None = None
    before: Utterance | None = None  # words of a turn that was cut off before it was answered


SttCommand = tuple[str, "Utterance | np.ndarray"]  # ("open", utt) | ("audio", samples) | ("finish", utt)


@dataclass
class Said:
    """One assistant message of a reply and the sentences of ``Reply.spoken`` it covers."""

    message: ChatMessage
    first: int
    end: int


@dataclass
class Reply:
    utterance: Utterance
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    spoken: list[tuple[str, float]] = field(default_factory=list)  # (sentence, seconds) queued
    start: float | None = None  # where its audio begins on the sink's cumulative timeline (s)
    pushed: float = 0.0  # seconds of audio queued so far
    said: list[Said] = field(default_factory=list)
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
