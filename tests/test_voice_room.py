"""The room edge of a voice leaf without a LiveKit server: settings, tokens, every way a connect
fails (with real sockets on 127.0.0.1), whom we listen to, and the audio path through the real
native SDK (source -> track -> stream). Two tests use a real server when LIVEKIT_* are set.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass

import anyio
import numpy as np
import pytest
from aiohttp import web
from anyio.abc import SocketAttribute, SocketStream
from livekit import api, rtc
from livekit.rtc._ffi_client import FfiClient

from otp_agents.voice.audio import AudioInput, AudioSink, pcm, rms_dbfs
from otp_agents.voice.room import (
    LiveKitEnv,
    RoomConfigError,
    RoomConnectError,
    RoomError,
    RoomSession,
    connect_room,
    join,
    mint_token,
)
from otp_agents.voice.room_audio import AGENT, SIP, STANDARD, RoomAudioInput, RoomAudioOutput
from otp_agents.voice.room_members import choose_participant, pick_participant

pytestmark = pytest.mark.anyio

KEY = "APIotpagentstest"
SECRET = "s3cr3t-" + "x" * 40
GOOD: Mapping[str, str] = {
    "LIVEKIT_URL": "wss://example.livekit.cloud",
    "LIVEKIT_API_KEY": KEY,
    "LIVEKIT_API_SECRET": SECRET,
}
PIPELINE_RATE = 16_000


@pytest.fixture
def anyio_backend() -> str:
    # livekit.rtc runs on asyncio only: its native side hands events over with
    # loop.call_soon_threadsafe, and Room/AudioSource/AudioStream capture the asyncio loop.
    # This overrides the conftest fixture that runs every test on asyncio and trio.
    return "asyncio"


def env_at(url: str, secret: str = SECRET) -> LiveKitEnv:
    return LiveKitEnv(url=url, api_key=KEY, api_secret=secret)


def ffi_subscribers() -> int:
    # Private, but it is the leak connect_room must avoid: a cancelled Room.connect leaves its
    # subscription to every native event in this process-wide list.
    return len(FfiClient.instance.queue._subscribers)


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("var", sorted(GOOD))
@pytest.mark.parametrize("value", [None, "", "   "])
def test_a_missing_or_empty_variable_is_named(var: str, value: str | None) -> None:
    environ = {k: v for k, v in GOOD.items() if k != var}
    if value is not None:
        environ[var] = value
    with pytest.raises(RoomConfigError, match=var) as caught:
        LiveKitEnv.from_environ(environ)
    assert "not set" in str(caught.value)
    assert all(other not in str(caught.value) for other in GOOD if other != var)


def test_every_missing_variable_is_named_at_once() -> None:
    with pytest.raises(RoomConfigError) as caught:
        LiveKitEnv.from_environ({"LIVEKIT_API_KEY": KEY})
    message = str(caught.value)
    assert "LIVEKIT_URL" in message and "LIVEKIT_API_SECRET" in message
    assert "LIVEKIT_API_KEY" not in message


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("ftp://example.com", "must start with ws://, wss://, http:// or https://"),
        ("example.livekit.cloud", "has no scheme"),
        ("localhost:7880", "has no scheme"),
        ("wss://", "has no host"),
        ("ws://:7880", "has no host"),
        ("ws://localhost:port", "bad port"),
        ("wss://example.com /x", "whitespace"),
    ],
)
def test_a_bad_url_is_named(url: str, complaint: str) -> None:
    with pytest.raises(RoomConfigError, match="LIVEKIT_URL") as caught:
        LiveKitEnv.from_environ({**GOOD, "LIVEKIT_URL": url})
    assert complaint in str(caught.value)


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("http://localhost:7880", "ws://localhost:7880"),
        ("https://example.livekit.cloud", "wss://example.livekit.cloud"),
        ("HTTPS://example.livekit.cloud/path", "wss://example.livekit.cloud/path"),
        ("ws://127.0.0.1:7880", "ws://127.0.0.1:7880"),
        ("wss://example.livekit.cloud", "wss://example.livekit.cloud"),
    ],
)
def test_http_urls_become_websocket_urls(given: str, used: str) -> None:
    assert LiveKitEnv.from_environ({**GOOD, "LIVEKIT_URL": given}).url == used


@pytest.mark.parametrize("var", ["LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"])
@pytest.mark.parametrize(("before", "after"), [("", "\n"), (" ", ""), ("\t", " ")])
def test_whitespace_in_key_or_secret_is_named(var: str, before: str, after: str) -> None:
    with pytest.raises(RoomConfigError, match=f"{var} contains whitespace"):
        LiveKitEnv.from_environ({**GOOD, var: before + GOOD[var] + after})


def test_whitespace_inside_the_key_is_named() -> None:
    with pytest.raises(RoomConfigError, match="LIVEKIT_API_KEY contains whitespace"):
        LiveKitEnv.from_environ({**GOOD, "LIVEKIT_API_KEY": "API otp"})


def test_a_short_secret_is_only_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # `livekit-server --dev` signs with devkey/secret: refusing it would break local development.
    with caplog.at_level(logging.WARNING, logger="otp_agents.voice.room"):
        env = LiveKitEnv.from_environ({**GOOD, "LIVEKIT_API_KEY": "devkey", "LIVEKIT_API_SECRET": "secret"})
    assert env.api_secret == "secret"
    assert "LIVEKIT_API_SECRET is 6 characters" in caplog.text


def test_the_secret_stays_out_of_the_repr() -> None:
    env = LiveKitEnv.from_environ(GOOD)
    assert SECRET not in repr(env) and KEY in repr(env)


# --- tokens -----------------------------------------------------------------------------------


def test_token_round_trip() -> None:
    env = LiveKitEnv.from_environ(GOOD)
    token = mint_token(env, "room-1", "agent-7", name="Agent Seven")
    claims = api.TokenVerifier(KEY, SECRET).verify(token)
    assert (claims.identity, claims.name, claims.kind) == ("agent-7", "Agent Seven", "agent")
    video = claims.video
    assert video is not None
    assert (video.room_join, video.room) == (True, "room-1")
    assert (video.can_publish, video.can_subscribe) == (True, True)


def test_a_non_agent_token_has_no_kind_and_another_secret_does_not_verify() -> None:
    token = mint_token(LiveKitEnv.from_environ(GOOD), "room-1", "caller", agent=False)
    assert api.TokenVerifier(KEY, SECRET).verify(token).kind == ""
    with pytest.raises(Exception, match="Signature verification failed"):
        api.TokenVerifier(KEY, "another-" + SECRET).verify(token)


def test_a_token_needs_a_room_and_an_identity() -> None:
    with pytest.raises(ValueError, match="room and an identity"):
        mint_token(LiveKitEnv.from_environ(GOOD), "", "agent")


# --- connecting: every failure, over loopback --------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """Accepts TCP connections and never says a word (a hung server, a wrong service)."""

    async def hold(stream: SocketStream) -> None:
        async with stream:
            await anyio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, hold)
            try:
                yield f"ws://127.0.0.1:{port}"
            finally:
                tg.cancel_scope.cancel()
    finally:
        await listener.aclose()


@dataclass
class StandIn:
    url: str
    paths: list[str]


@asynccontextmanager
async def stand_in_server() -> AsyncIterator[StandIn]:
    """Answers like a LiveKit server would to a token it cannot verify (401), and with a 500 to one
    it can (it speaks no signalling). The token comes as `Authorization: Bearer`."""
    seen = StandIn("", [])

    async def handle(request: web.Request) -> web.Response:
        seen.paths.append(request.path)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            api.TokenVerifier(KEY, SECRET).verify(token)
        except Exception as exc:  # whatever PyJWT finds wrong, the server says 401
            return web.Response(status=401, text=f"invalid token: {exc}")
        return web.Response(status=500, text="stand-in server speaks no signalling")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        seen.url = f"ws://127.0.0.1:{sock.getsockname()[1]}"
        await web.SockSite(runner, sock).start()
        try:
            yield seen
        finally:
            await runner.cleanup()


async def test_nothing_listening_is_connection_refused() -> None:
    url = f"ws://127.0.0.1:{closed_port()}"
    before = ffi_subscribers()
    with pytest.raises(RoomConnectError) as caught:
        await connect_room(env_at(url), "room", "agent", timeout=10)
    assert str(caught.value).startswith(f"nothing listening at {url} (connection refused)")
    assert ffi_subscribers() == before


async def test_a_server_that_never_answers_hits_our_timeout() -> None:
    before = ffi_subscribers()
    async with silent_server() as url:
        with pytest.raises(RoomConnectError) as caught:
            await connect_room(env_at(url), "room", "agent", timeout=1.0)
    assert str(caught.value).startswith(f"no answer from {url} within 1s")
    assert ffi_subscribers() == before  # the abandoned connect left no subscription behind


async def test_a_token_signed_with_another_secret_is_rejected() -> None:
    async with stand_in_server() as server:
        with pytest.raises(RoomConnectError) as caught:
            await connect_room(env_at(server.url, secret="wrong-" + SECRET), "room", "agent")
    message = str(caught.value)
    assert f"the server at {server.url} rejected the token" in message
    assert "401 Unauthorized" in message and "LIVEKIT_API_KEY / LIVEKIT_API_SECRET" in message
    assert server.paths and all(p.startswith("/rtc") for p in server.paths)


async def test_any_other_failure_carries_the_sdk_message() -> None:
    async with stand_in_server() as server:  # the token verifies; the server then fails
        with pytest.raises(RoomConnectError) as caught:
            await connect_room(env_at(server.url), "room", "agent")
    message = str(caught.value)
    assert message.startswith(f"could not connect to {server.url}: ")
    assert "500 Internal Server Error - stand-in server speaks no signalling" in message


# --- whom to listen to -------------------------------------------------------------------------


@dataclass(frozen=True)
class Someone:
    identity: str
    kind: rtc.ParticipantKind.ValueType


BOT = Someone("other-agent", AGENT)
USER = Someone("user", STANDARD)
PHONE = Someone("sip_+15550100", SIP)
EGRESS = Someone("recorder", rtc.ParticipantKind.PARTICIPANT_KIND_EGRESS)


def test_an_explicit_identity_wins_whatever_its_kind() -> None:
    assert choose_participant([USER, BOT], "other-agent") is BOT
    assert choose_participant([USER, PHONE], "sip_+15550100") is PHONE
    assert choose_participant([USER], "nobody") is None


def test_by_default_the_first_standard_or_sip_participant() -> None:
    assert choose_participant([EGRESS, BOT, PHONE, USER], None) is PHONE
    assert choose_participant([USER, PHONE], None) is USER
    assert choose_participant([EGRESS], None) is None
    assert choose_participant([], None) is None


def test_agents_only_when_allowed() -> None:
    assert choose_participant([BOT], None) is None
    assert choose_participant([BOT], None, kinds=(AGENT,)) is None  # the loop guard wins
    assert choose_participant([BOT, USER], None, allow_agents=True) is BOT
    assert choose_participant([EGRESS, USER], None, kinds=(SIP,)) is None


async def test_waiting_on_a_room_that_is_not_connected_says_so() -> None:
    with pytest.raises(RoomError, match="cannot wait for a participant of kind standard/sip"):
        await pick_participant(rtc.Room(), timeout=1)


# --- the audio path, through the native SDK without a server -----------------------------------


def sine(freq: float, seconds: float, rate: int) -> rtc.AudioFrame:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.5 * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
    return rtc.AudioFrame(samples.tobytes(), rate, 1, len(samples))


async def take(frames: AsyncIterator[rtc.AudioFrame], seconds: float) -> np.ndarray:
    """The next ``seconds`` of audio (counted in samples, not wall time)."""
    parts: list[np.ndarray] = []
    wanted = int(seconds * PIPELINE_RATE)
    got = 0
    async for frame in frames:
        assert (frame.sample_rate, frame.num_channels) == (PIPELINE_RATE, 1)
        parts.append(pcm(frame).copy())
        got += frame.samples_per_channel
        if got >= wanted:
            break
    return np.concatenate(parts)


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
    return float(np.argmax(spectrum)) * rate / len(samples)


@asynccontextmanager
async def loopback(output_rate: int = 48_000) -> AsyncIterator[tuple[RoomAudioOutput, RoomAudioInput]]:
    output = RoomAudioOutput(output_rate)
    input_ = RoomAudioInput(output.local_track())
    _sink: AudioSink = output  # mypy checks both ends against the pipeline's protocols
    _input: AudioInput = input_
    try:
        yield output, input_
    finally:
        await input_.aclose()
        await output.aclose()


@pytest.mark.parametrize("pushed_rate", [48_000, 24_000])
async def test_a_sine_comes_out_of_the_track_at_16k_as_a_sine(pushed_rate: int) -> None:
    async with loopback() as (output, input_), aclosing(input_.frames()) as frames:
        await output.push(sine(440, 1.0, pushed_rate))  # 24 kHz is resampled by push
        assert output.queued > 0.9  # push queued it all without waiting for playout
        received = await take(frames, 1.3)
    voiced = received[np.abs(received) > 1000]
    assert len(voiced) > 0.8 * PIPELINE_RATE
    assert rms_dbfs(received) > -20
    assert abs(dominant_hz(received, PIPELINE_RATE) - 440) < 5


async def test_clear_drops_what_is_queued() -> None:
    async with loopback() as (output, input_), aclosing(input_.frames()) as frames:
        await output.push(sine(440, 3.0, 48_000))
        assert output.queued > 2.9
        heard = await take(frames, 0.3)
        dropped = output.clear()
        assert output.queued == 0.0
        assert 2.0 < dropped < 3.0
        after = await take(frames, 1.5)
    assert rms_dbfs(heard) > -20
    # Had the queue played on, the second after clear would be the sine; allow up to 0.5 s for
    # frames already on their way (counted in samples, so a slow reader cannot fake silence).
    assert rms_dbfs(after[PIPELINE_RATE // 2 :]) == float("-inf")


async def test_closing_the_input_ends_its_frames() -> None:
    async with loopback() as (_output, input_):
        frames = input_.frames()
        await take(frames, 0.05)
        await input_.aclose()
        rest = [frame async for frame in frames]
    assert len(rest) < 10  # what was already queued, then the end


async def test_push_refuses_stereo() -> None:
    async with loopback() as (output, _input):
        stereo = rtc.AudioFrame(bytes(4 * 480), 48_000, 2, 480)
        with pytest.raises(ValueError, match="expected mono"):
            await output.push(stereo)


# --- a real server, when there is one ----------------------------------------------------------

real_server = pytest.mark.skipif(
    not all(os.environ.get(var) for var in GOOD),
    reason="needs a LiveKit server: set LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET",
)


def fresh_room_name() -> str:
    return f"otp-agents-test-{uuid.uuid4().hex[:8]}"


@real_server
async def test_connect_to_a_real_server_and_publish_the_agent_voice() -> None:
    env = LiveKitEnv.from_environ()
    room = await connect_room(env, fresh_room_name(), "otp-agents-test-agent")
    output = RoomAudioOutput()
    try:
        assert room.isconnected()
        publication = await output.publish(room)
        assert publication.sid and publication.source == rtc.TrackSource.SOURCE_MICROPHONE
        await output.push(sine(440, 0.5, 48_000))
        with pytest.raises(RoomError, match="a participant of kind standard/sip did not join"):
            await pick_participant(room, timeout=0.5)  # alone in a fresh room
    finally:
        await room.disconnect()
        await output.aclose()
    assert not room.isconnected()


@real_server
async def test_join_waits_for_a_caller_and_hears_it() -> None:
    env = LiveKitEnv.from_environ()
    room_name = fresh_room_name()
    sessions: list[RoomSession] = []

    async def agent() -> None:
        sessions.append(await join(env, room_name, "otp-agents-test-agent", participant_timeout=30))

    caller = rtc.Room()
    caller_voice = RoomAudioOutput()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)  # may join before or after the caller: both must work
            await caller.connect(env.url, mint_token(env, room_name, "otp-agents-test-caller", agent=False))
            await caller_voice.publish(caller)
            await caller_voice.push(sine(440, 5.0, 48_000))
        session = sessions[0]
        try:
            assert session.participant.identity == "otp-agents-test-caller"
            async with aclosing(session.input.frames()) as frames:
                received = await take(frames, 2.0)
        finally:
            await session.aclose()
    finally:
        await caller.disconnect()
        await caller_voice.aclose()
    assert len(received[np.abs(received) > 1000]) > 0.3 * PIPELINE_RATE
    assert abs(dominant_hz(received, PIPELINE_RATE) - 440) < 5
