"""Whom a voice leaf listens to in a LiveKit room: the participant named by ``--listen-to``, or
the first standard or SIP participant (another agent only when allowed), and its audio track,
however late either arrives."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar

import anyio
from livekit import rtc
from livekit.rtc.room import EventTypes

from otp_agents.livekit_env import (
    RoomError,
)
from otp_agents.voice.room_audio import AGENT, DEFAULT_KINDS

logger = logging.getLogger(__name__)


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


def describe_wanted(
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
    wanted = describe_wanted(identity, kinds, allow_agents)
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
