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
from dataclasses import dataclass
from datetime import timedelta

import anyio
from livekit import api, rtc
from livekit.rtc._ffi_client import FfiClient

from otp_agents.livekit_env import (
    KEY_VAR,
    SECRET_VAR,
    URL_VAR,
    LiveKitEnv,
    RoomConfigError,
    RoomError,
    normalize_url,
)
from otp_agents.voice.room_audio import DEFAULT_KINDS, RoomAudioInput, RoomAudioOutput
from otp_agents.voice.room_members import describe_wanted, pick_participant, wait_audio_track

__all__ = ["KEY_VAR", "SECRET_VAR", "URL_VAR", "LiveKitEnv", "RoomConfigError", "RoomError", "normalize_url"]

logger = logging.getLogger(__name__)


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
    waiting_for = describe_wanted(listen_to, DEFAULT_KINDS, allow_agents)
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
