"""The two audio ends a room gives the voice pipeline: the caller's track in
(:class:`RoomAudioInput`) and the agent's voice out (:class:`RoomAudioOutput`)."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import numpy as np
from livekit import rtc

from otp_agents.voice.audio import SAMPLE_RATE, frame_of, pcm, resample

STANDARD = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
SIP = rtc.ParticipantKind.PARTICIPANT_KIND_SIP
AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
DEFAULT_KINDS: tuple[rtc.ParticipantKind.ValueType, ...] = (STANDARD, SIP)

AGENT_TRACK_NAME = "agent-voice"
# Big enough that a whole reply synthesized faster than real time fits: ``push`` must not wait
# for playout. A full queue costs sample_rate * 2 bytes per second (48 kHz: ~5.8 MB per minute).
DEFAULT_QUEUE_MS = 60_000


class RoomAudioInput:
    """:class:`~otp_agents.voice.audio.AudioInput` over a track: 16 kHz mono frames, resampled
    natively by the SDK so the pipeline's edge has nothing left to do.

    Takes any ``rtc.Track`` (a remote one in use, a local one in tests: no server needed).
    """

    def __init__(self, track: rtc.Track, *, sample_rate: int = SAMPLE_RATE) -> None:
        self.track = track
        self.sample_rate = sample_rate
        self._stream = rtc.AudioStream.from_track(track=track, sample_rate=sample_rate, num_channels=1)
        self._closed = False

    async def frames(self) -> AsyncGenerator[rtc.AudioFrame, None]:
        """Frames as they arrive; ends when the track ends or :meth:`aclose` is called."""
        async for event in self._stream:
            yield event.frame

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._stream.aclose()


class RoomAudioOutput:
    """:class:`~otp_agents.voice.audio.AudioSink` onto a published track.

    An ``rtc.AudioSource`` with a queue long enough for a whole reply plays the audio out in real
    time, so ``push`` returns at once and barge-in is ``clear()``. Audio at another rate is
    resampled buffer by buffer (stateless, so nothing is held back at the end of an utterance);
    producers that can should push at :attr:`sample_rate`.
    """

    def __init__(
        self,
        sample_rate: int = 48_000,
        *,
        queue_size_ms: int = DEFAULT_QUEUE_MS,
        track_name: str = AGENT_TRACK_NAME,
    ) -> None:
        self.sample_rate = sample_rate
        self.track_name = track_name
        self.source = rtc.AudioSource(sample_rate, 1, queue_size_ms=queue_size_ms)
        self.track: rtc.LocalAudioTrack | None = None
        self._closed = False

    async def publish(self, room: rtc.Room) -> rtc.LocalTrackPublication:
        """Publish the source as the agent's microphone track in ``room``."""
        self.track = rtc.LocalAudioTrack.create_audio_track(self.track_name, self.source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        return await room.local_participant.publish_track(self.track, options)

    def local_track(self) -> rtc.LocalAudioTrack:
        """An unpublished track on the source (to listen to the output without a room)."""
        if self.track is None:
            self.track = rtc.LocalAudioTrack.create_audio_track(self.track_name, self.source)
        return self.track

    async def push(self, frame: rtc.AudioFrame) -> None:
        if frame.num_channels != 1:
            raise ValueError(f"expected mono audio, got {frame.num_channels} channels")
        if frame.sample_rate != self.sample_rate:
            samples: np.ndarray = resample(pcm(frame), frame.sample_rate, self.sample_rate)
            frame = frame_of(samples, self.sample_rate)
        await self.source.capture_frame(frame)

    def clear(self) -> float:
        dropped = self.source.queued_duration
        self.source.clear_queue()
        return dropped

    @property
    def queued(self) -> float:
        return self.source.queued_duration

    def advance(self, seconds: float) -> None:
        """Nothing to do: the source plays on the wall clock."""

    async def wait_for_playout(self) -> None:
        """Until everything queued has been played (or cleared)."""
        await self.source.wait_for_playout()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.source.clear_queue()
        await self.source.aclose()
