"""A voice leaf's way into a LiveKit room: credentials, joining, choosing whom to listen to, and the
two audio ends (:class:`RoomAudioInput`, :class:`RoomAudioOutput`) the pipeline plugs into.

Everything here fails with a :class:`RoomError` whose message says what to fix, because the person
reading it is usually an operator looking at a supervisor log, not at a traceback: a missing
variable is named, a server that is not there is told apart from one that does not answer and
from one that rejects our credentials.

``livekit.rtc`` is built on asyncio (the native side delivers its callbacks with
``loop.call_soon_threadsafe``), so this module only works on the asyncio backend.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, TypeVar

import anyio
import numpy as np
from livekit import api, rtc
from livekit.rtc._ffi_client import FfiClient
from livekit.rtc.room import EventTypes

from otp_agents.livekit_env import (
    KEY_VAR,
    SECRET_VAR,
    URL_VAR,
    LiveKitEnv,
    RoomConfigError,
    RoomError,
    normalize_url,
)
from otp_agents.voice.audio import SAMPLE_RATE, frame_of, pcm, resample

__all__ = ["KEY_VAR", "SECRET_VAR", "URL_VAR", "LiveKitEnv", "RoomConfigError", "RoomError", "normalize_url"]

logger = logging.getLogger(__name__)

STANDARD = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
SIP = rtc.ParticipantKind.PARTICIPANT_KIND_SIP
AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
DEFAULT_KINDS: tuple[rtc.ParticipantKind.ValueType, ...] = (STANDARD, SIP)

AGENT_TRACK_NAME = "agent-voice"
# Big enough that a whole reply synthesized faster than real time fits: ``push`` must not wait
# for playout. A full queue costs sample_rate * 2 bytes per second (48 kHz: ~5.8 MB per minute).
DEFAULT_QUEUE_MS = 60_000


class RoomConnectError(RoomError):
    """Joining the room failed: nothing listening, no answer, credentials rejected, or other."""


def mint_token(
    env: LiveKitEnv,
    room: str,
    identity: str,
    *,
    name: str | None = None,
    ttl: timedelta = timedelta(hours=6),
    agent: bool = True,
) -> str:
    """A join token for ``room``: publish and subscribe, and kind "agent" unless ``agent=False``.

    The kind matters beyond display: other agents (and :func:`pick_participant` here) skip agent
    participants, which is what keeps two agents in one room from talking to each other forever.
    """
    if not room or not identity:
        raise ValueError(f"a join token needs a room and an identity (got {room=!r}, {identity=!r})")
    grants = api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True)
    token = (
        api.AccessToken(env.api_key, env.api_secret).with_identity(identity).with_grants(grants).with_ttl(ttl)
    )
    if name:
        token = token.with_name(name)
    if agent:
        token = token.with_kind("agent")
    return token.to_jwt()


# --- connecting -------------------------------------------------------------------------------


async def connect_room(
    env: LiveKitEnv,
    room_name: str,
    identity: str,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a hard bound every caller needs, named in the error
) -> rtc.Room:
    """Join ``room_name`` as ``identity`` (an agent) within ``timeout`` seconds, or raise
    :class:`RoomConnectError`.

    The timeout is our own: the SDK's ``connect_timeout`` bounds each signalling attempt but not
    the transport, so a server that accepts TCP and never answers takes the SDK 16-32 s (four
    attempts) to give up on.
    """
    token = mint_token(env, room_name, identity)
    room = rtc.Room()
    try:
        with anyio.fail_after(timeout):
            await room.connect(env.url, token, rtc.RoomOptions(auto_subscribe=True))
    except TimeoutError:
        _abandon(room)
        raise RoomConnectError(
            f"no answer from {env.url} within {timeout:g}s (is something else listening there, "
            "or is a firewall dropping the traffic?)"
        ) from None
    except rtc.ConnectError as exc:
        _abandon(room)
        raise RoomConnectError(_explain_connect_error(env.url, exc.message)) from None
    except BaseException:
        _abandon(room)
        if room.isconnected():
            with anyio.CancelScope(shield=True):
                await room.disconnect()
        raise
    return room


def _explain_connect_error(url: str, message: str) -> str:
    """Turn the SDK's message into advice. Measured with livekit 1.1.21 (after its retries):

    - closed port: "engine: signal failure: transport connection error: IO error: Connection
      refused (os error 111)"
    - silent server: "engine: signal failure: transport timed out"
    - bad token: "engine: signal failure: client error: 401 Unauthorized - <server's reason>"
      (403 Forbidden likewise); the SDK does not retry these.
    """
    if "Connection refused" in message:
        return f"nothing listening at {url} (connection refused): is the LiveKit server running?"
    if "timed out" in message:
        return f"no answer from {url}: the SDK gave up ({message})"
    if re.search(r"\b(401|403)\b|Unauthorized|Forbidden", message):
        detail = message.split("client error: ", 1)[-1]
        return (
            f"the server at {url} rejected the token ({detail}): check {KEY_VAR} / {SECRET_VAR} "
            "(and this machine's clock)"
        )
    return f"could not connect to {url}: {message}"


def _abandon(room: rtc.Room) -> None:
    """Drop what a connect that did not finish left behind.

    ``Room.connect`` subscribes the room to every native event before it asks to connect and only
    unsubscribes when the answer comes back with an error; cancelled while waiting (our timeout),
    it leaves that subscription in the process-wide FFI queue for good. The attribute is private,
    hence the getattr. The native side keeps trying on its own until its own timeout, and then
    reports to nobody.
    """
    queue = getattr(room, "_ffi_queue", None)
    if queue is not None and getattr(room, "_ffi_handle", None) is None:
        FfiClient.instance.queue.unsubscribe(queue)


# --- whom to listen to -------------------------------------------------------------------------


class Candidate(Protocol):
    """What :func:`choose_participant` looks at (an ``rtc.RemoteParticipant`` in real use)."""

    @property
    def identity(self) -> str: ...

    @property
    def kind(self) -> rtc.ParticipantKind.ValueType: ...


P = TypeVar("P", bound=Candidate)


def choose_participant(
    participants: Iterable[P],
    identity: str | None,
    kinds: Sequence[rtc.ParticipantKind.ValueType] = DEFAULT_KINDS,
    allow_agents: bool = False,
) -> P | None:
    """The participant to listen to, or None if none qualifies (yet).

    An explicit ``identity`` wins whatever its kind: the operator asked for it. Otherwise the first
    participant (in join order) whose kind is in ``kinds``; agents only with ``allow_agents``, even
    if ``kinds`` names them, because an agent answering an agent answers itself forever.
    """
    if identity is not None:
        return next((p for p in participants if p.identity == identity), None)
    allowed = set(kinds)
    if allow_agents:
        allowed.add(AGENT)
    else:
        allowed.discard(AGENT)
    return next((p for p in participants if p.kind in allowed), None)


def _kind_name(kind: rtc.ParticipantKind.ValueType) -> str:
    return rtc.ParticipantKind.Name(kind).removeprefix("PARTICIPANT_KIND_").lower()


def _describe_wanted(
    identity: str | None, kinds: Sequence[rtc.ParticipantKind.ValueType], allow_agents: bool
) -> str:
    if identity is not None:
        return f"participant {identity!r}"
    names = [_kind_name(k) for k in kinds if k != AGENT or allow_agents]
    if allow_agents and AGENT not in kinds:
        names.append("agent")
    return f"a participant of kind {'/'.join(names) or '(none allowed)'}"


def _disconnect_reason(reason: rtc.DisconnectReason.ValueType) -> str:
    try:
        return rtc.DisconnectReason.Name(reason).lower()
    except ValueError:
        return str(reason)


def _require_connected(room: rtc.Room, waiting_for: str) -> None:
    if not room.isconnected():
        raise RoomError(f"cannot wait for {waiting_for}: the room is not connected")


async def pick_participant(
    room: rtc.Room,
    *,
    identity: str | None = None,
    kinds: Sequence[rtc.ParticipantKind.ValueType] = DEFAULT_KINDS,
    allow_agents: bool = False,
    timeout: float | None = None,  # noqa: ASYNC109 - named in the error, which says what we waited for
) -> rtc.RemoteParticipant:
    """The participant to listen to (see :func:`choose_participant`), waiting for one to join if
    nobody present qualifies: for an outbound SIP call the callee joins after the agent does.

    ``timeout=None`` waits as long as the room stays connected.
    """
    wanted = _describe_wanted(identity, kinds, allow_agents)
    _require_connected(room, wanted)
    chosen = choose_participant(room.remote_participants.values(), identity, kinds, allow_agents)
    if chosen is not None:
        return chosen

    found: anyio.Event = anyio.Event()
    result: list[rtc.RemoteParticipant] = []
    gone: list[str] = []

    def on_joined(participant: rtc.RemoteParticipant) -> None:
        if not result and choose_participant((participant,), identity, kinds, allow_agents) is not None:
            result.append(participant)
            found.set()

    def on_disconnected(reason: rtc.DisconnectReason.ValueType) -> None:
        gone.append(_disconnect_reason(reason))
        found.set()

    room.on("participant_connected", on_joined)
    room.on("disconnected", on_disconnected)
    try:
        with anyio.fail_after(timeout):
            await found.wait()
    except TimeoutError:
        raise RoomError(f"{wanted} did not join room {room.name!r} within {timeout:g}s") from None
    finally:
        room.off("participant_connected", on_joined)
        room.off("disconnected", on_disconnected)
    if result:
        return result[0]
    raise RoomError(f"the room disconnected ({gone[0]}) while waiting for {wanted}")


async def wait_audio_track(
    room: rtc.Room,
    participant: rtc.RemoteParticipant,
    timeout: float | None = None,  # noqa: ASYNC109 - named in the error, like pick_participant's
) -> rtc.RemoteAudioTrack:
    """``participant``'s audio track, subscribed; waits for it to be published if need be (a SIP
    callee publishes when the call is answered, a browser when the user allows the microphone).

    A microphone track is preferred when there are several. ``timeout=None`` waits as long as the
    participant stays.
    """
    who = participant.identity
    wanted = f"an audio track from {who!r}"
    _require_connected(room, wanted)

    found: anyio.Event = anyio.Event()
    result: list[rtc.RemoteAudioTrack] = []
    failure: list[str] = []

    def fail(why: str) -> None:
        if not found.is_set():
            failure.append(why)
            found.set()

    def on_published(publication: rtc.RemoteTrackPublication, p: rtc.RemoteParticipant) -> None:
        if p.identity == who and publication.kind == rtc.TrackKind.KIND_AUDIO:
            publication.set_subscribed(True)  # a no-op with auto_subscribe, needed without

    def on_subscribed(
        track: rtc.Track, _publication: rtc.RemoteTrackPublication, p: rtc.RemoteParticipant
    ) -> None:
        if p.identity == who and isinstance(track, rtc.RemoteAudioTrack) and not found.is_set():
            result.append(track)
            found.set()

    def on_subscription_failed(p: rtc.RemoteParticipant, track_sid: str, error: str) -> None:
        if p.identity == who:
            fail(f"subscribing to track {track_sid} of {who!r} failed: {error}")

    def on_left(p: rtc.RemoteParticipant) -> None:
        if p.identity == who:
            fail(f"{who!r} left the room before publishing audio")

    def on_disconnected(reason: rtc.DisconnectReason.ValueType) -> None:
        fail(f"the room disconnected ({_disconnect_reason(reason)}) while waiting for {wanted}")

    handlers: dict[EventTypes, Callable[..., None]] = {
        "track_published": on_published,
        "track_subscribed": on_subscribed,
        "track_subscription_failed": on_subscription_failed,
        "participant_disconnected": on_left,
        "disconnected": on_disconnected,
    }
    for event, handler in handlers.items():
        room.on(event, handler)
    try:
        track = _audio_track_of(participant)
        if track is not None:
            return track
        with anyio.fail_after(timeout):
            await found.wait()
    except TimeoutError:
        raise RoomError(f"no audio track from {who!r} within {timeout:g}s") from None
    finally:
        for event, handler in handlers.items():
            room.off(event, handler)
    if result:
        return result[0]
    raise RoomError(failure[0])


def _audio_track_of(participant: rtc.RemoteParticipant) -> rtc.RemoteAudioTrack | None:
    """The subscribed audio track, microphone first; asks to subscribe to unsubscribed ones."""
    audio = [p for p in participant.track_publications.values() if p.kind == rtc.TrackKind.KIND_AUDIO]
    audio.sort(key=lambda p: p.source != rtc.TrackSource.SOURCE_MICROPHONE)
    for publication in audio:
        if isinstance(publication.track, rtc.RemoteAudioTrack):
            return publication.track
    for publication in audio:
        if not publication.subscribed:
            publication.set_subscribed(True)
    return None


# --- the two audio ends -----------------------------------------------------------------------


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


# --- all of it ---------------------------------------------------------------------------------


@dataclass
class RoomSession:
    """A joined room: whom we listen to, and the two audio ends."""

    room: rtc.Room
    participant: rtc.RemoteParticipant
    input: RoomAudioInput
    output: RoomAudioOutput

    async def aclose(self) -> None:
        """Stop listening, leave the room, release the source (safe to call twice)."""
        with anyio.CancelScope(shield=True):
            await self.input.aclose()
            await self.room.disconnect()
            await self.output.aclose()


async def join(
    env: LiveKitEnv,
    room_name: str,
    identity: str,
    *,
    listen_to: str | None = None,
    allow_agents: bool = False,
    connect_timeout: float = 10,
    participant_timeout: float | None = None,
) -> RoomSession:
    """Connect, publish the agent's voice, pick the participant to listen to and wait for its
    audio. ``participant_timeout`` bounds the wait for the participant and its track together.

    The voice is published before waiting so the room shows the agent as ready. Any failure
    leaves the room before raising.
    """
    room = await connect_room(env, room_name, identity, timeout=connect_timeout)
    output = RoomAudioOutput()
    waiting_for = _describe_wanted(listen_to, DEFAULT_KINDS, allow_agents)
    try:
        await output.publish(room)
        try:
            with anyio.fail_after(participant_timeout):
                participant = await pick_participant(room, identity=listen_to, allow_agents=allow_agents)
                waiting_for = f"an audio track from {participant.identity!r}"
                track = await wait_audio_track(room, participant)
        except TimeoutError:
            raise RoomError(
                f"waited {participant_timeout:g}s in room {room_name!r} for {waiting_for}, in vain"
            ) from None
        return RoomSession(room, participant, RoomAudioInput(track), output)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await room.disconnect()
            await output.aclose()
        raise
