"""The caller's end of LiveKit Agents' console transport, for running an unmodified agent offline.

``python -m livekit.agents console agent.py --connect-addr HOST:PORT`` (and the host leaf,
``workers/agents_host.py``) connects to a TCP server and exchanges 4-byte big-endian
length-prefixed ``AgentSessionMessage`` protobufs (``livekit.protocol.agent_pb.agent_session``):

- to the agent: ``audio_input`` frames (48 kHz mono int16, the microphone) and
  ``audio_playback_finished`` once a flushed reply has been played out;
- from the agent: ``audio_output`` frames, ``audio_playback_flush`` (the reply is complete),
  ``audio_playback_clear`` (the agent was interrupted: drop what is unplayed) and session
  ``event`` messages (state changes, transcripts, conversation items).

:class:`ConsoleCall` is that server: a microphone that streams silence in real time and the
caller's utterances when asked, a speaker that "plays" each reply on the wall clock before
acknowledging it, and a log of what the agent heard and said. It accepts one agent connection at
a time and takes the next one when it goes, so a restarted agent picks the call up again.
"""

from __future__ import annotations

import contextlib
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import anyio
import numpy as np
from anyio.abc import SocketListener, SocketStream, TaskStatus
from livekit.protocol.agent_pb import agent_session as pb

from otp_agents.errors import OtpAgentsError
from otp_agents.voice.audio import resample

WIRE_RATE = 48_000
FRAME_SAMPLES = WIRE_RATE // 100  # 10 ms
MAX_MESSAGE = 1 << 20
_HEADER = struct.Struct(">I")
_SILENCE = bytes(FRAME_SAMPLES * 2)
_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)


class ConsoleProtocolError(OtpAgentsError, ValueError):
    """The agent sent something that is not a console transport message."""


@dataclass
class Reply:
    """One flushed agent reply as the caller heard it."""

    audio: np.ndarray  # int16 at WIRE_RATE
    interrupted: bool = False

    @property
    def seconds(self) -> float:
        return len(self.audio) / WIRE_RATE


@dataclass
class CallLog:
    heard: list[str] = field(default_factory=list)  # final user transcripts, as the agent heard them
    said: list[str] = field(default_factory=list)  # assistant conversation items
    replies: list[Reply] = field(default_factory=list)
    states: list[str] = field(default_factory=list)  # agent states in order
    connections: int = 0
    errors: list[str] = field(default_factory=list)  # malformed messages; each cost one connection
    tools: list[ToolCall] = field(default_factory=list)  # function tools the app ran, in order
    handoffs: list[tuple[str, str]] = field(default_factory=list)  # (from agent, to agent)
    session_errors: list[str] = field(default_factory=list)  # errors the session reported
    # When (time.monotonic, on this side) each reply's first audio arrived, and each time the
    # agent said the caller started speaking: what a benchmark times turns and lag by.
    reply_started: list[float] = field(default_factory=list)
    user_speaking: list[float] = field(default_factory=list)
    end_of_turn: list[EndOfTurn] = field(default_factory=list)  # the turn detector's verdicts
    # LiveKit's per-message latencies (seconds: transcription_delay, end_of_turn_delay, llm_node_ttft,
    # tts_node_ttfb, e2e_latency...), by the message's role
    timings: list[tuple[str, dict[str, float]]] = field(default_factory=list)


@dataclass(frozen=True)
class EndOfTurn:
    """One end-of-turn prediction: below ``threshold`` the app waits its longest endpointing
    delay for the caller to go on, above it its shortest."""

    at: float  # time.monotonic() on this side
    probability: float
    threshold: float
    inference: float  # seconds the turn detector took

    @property
    def complete(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON, as the LLM gave them
    output: str  # what the tool returned, as the LLM got it back


class ConsoleCall:
    """Serve one call to whichever agent process connects (see the module docstring)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.log = CallLog()
        self._changed = anyio.Event()
        self._mic: list[bytes] = []  # queued 10 ms frames of caller speech
        self._mic_drained = anyio.Event()
        self._stream: SocketStream | None = None
        self._send_lock = anyio.Lock()
        self._reply: list[bytes] = []
        self._playing_until = 0.0
        self._finish_scope: anyio.CancelScope | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def serve(self, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen on loopback and run calls until cancelled; reports ``host:port`` when bound."""
        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=0)
        async with listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started(self.address)
            while True:
                stream = await cast(SocketListener, listener.listeners[0]).accept()
                async with stream:
                    await self._connection(stream)

    async def say(self, samples: np.ndarray, rate: int) -> None:
        """Speak into the microphone (int16 mono at ``rate``); returns once it has all been sent."""
        wire = resample(samples, rate, WIRE_RATE).astype(np.int16)
        n = math.ceil(len(wire) / FRAME_SAMPLES)
        padded = np.zeros(n * FRAME_SAMPLES, dtype=np.int16)
        padded[: len(wire)] = wire
        self._mic.extend(padded[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES].tobytes() for i in range(n))
        self._mic_drained = anyio.Event()
        await self._mic_drained.wait()

    async def wait_for(self, condition: Callable[[CallLog], bool], timeout: float) -> None:  # noqa: ASYNC109
        """Wait until ``condition(log)`` holds; TimeoutError (with the log) if it doesn't in time."""
        with anyio.move_on_after(timeout):
            while not condition(self.log):
                await self._changed.wait()
            return
        raise TimeoutError(f"console call: condition not met in {timeout:.0f}s; log: {self.log}")

    def _note(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _connection(self, stream: SocketStream) -> None:
        self._stream = stream
        self.log.connections += 1
        self._reply = []
        self._note()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._microphone)
                try:
                    await self._receive(stream, tg)
                except _GONE:
                    pass  # the agent process went away: wait for the next one
                except ConsoleProtocolError as exc:
                    self.log.errors.append(str(exc))  # drop this agent, keep the call
                tg.cancel_scope.cancel()
        finally:
            self._stream = None
            self._note()

    async def _send(self, msg: pb.AgentSessionMessage) -> None:
        data = msg.SerializeToString()
        stream = self._stream
        if stream is None:
            return
        async with self._send_lock:
            await stream.send(_HEADER.pack(len(data)) + data)

    async def _microphone(self) -> None:
        """One frame every 10 ms on the wall clock; never bursts to catch up after a stall."""
        with contextlib.suppress(*_GONE):  # the receiving side notices too, and ends the connection
            await self._speak()

    async def _speak(self) -> None:
        start, sent = time.monotonic(), 0
        while True:
            if self._mic:
                data = self._mic.pop(0)
                if not self._mic:
                    self._mic_drained.set()
            else:
                data = _SILENCE
            frame = pb.AgentSessionMessage.ConsoleIO.AudioFrame(
                data=data, sample_rate=WIRE_RATE, num_channels=1, samples_per_channel=FRAME_SAMPLES
            )
            await self._send(pb.AgentSessionMessage(audio_input=frame))
            sent += 1
            delay = start + sent * 0.01 - time.monotonic()
            if delay < -0.2:  # we fell behind (a stalled loop): restart the schedule, don't burst
                start, sent = time.monotonic(), 0
            await anyio.sleep(max(0.0, delay))

    async def _receive(self, stream: SocketStream, tg: anyio.abc.TaskGroup) -> None:
        buf = bytearray()
        while True:
            while len(buf) < 4 or len(buf) < 4 + _HEADER.unpack_from(buf)[0]:
                if len(buf) >= 4 and _HEADER.unpack_from(buf)[0] > MAX_MESSAGE:
                    raise ConsoleProtocolError(f"console message of {_HEADER.unpack_from(buf)[0]} bytes")
                buf += await stream.receive()
            size = _HEADER.unpack_from(buf)[0]
            msg = pb.AgentSessionMessage()
            try:
                msg.ParseFromString(bytes(buf[4 : 4 + size]))
            except Exception as exc:  # protobuf's DecodeError
                raise ConsoleProtocolError(f"undecodable console message: {exc}") from exc
            del buf[: 4 + size]
            self._handle(msg, tg)

    def _handle(self, msg: pb.AgentSessionMessage, tg: anyio.abc.TaskGroup) -> None:
        kind = msg.WhichOneof("message")
        if kind == "audio_output":
            if not self._reply:
                self.log.reply_started.append(time.monotonic())
            self._reply.append(msg.audio_output.data)
        elif kind == "audio_playback_flush":
            audio = np.frombuffer(b"".join(self._reply), dtype=np.int16)
            self._reply = []
            reply = Reply(audio)
            self.log.replies.append(reply)
            self._playing_until = max(time.monotonic(), self._playing_until) + reply.seconds
            tg.start_soon(self._play_out, reply, self._playing_until)
            self._note()
        elif kind == "audio_playback_clear":
            self._reply = []
            if self._finish_scope is not None:
                self._finish_scope.cancel()
            if self.log.replies and self._playing_until > time.monotonic():
                self.log.replies[-1].interrupted = True
            self._playing_until = 0.0
            self._note()
        elif kind == "event":
            self._event(msg.event)

    async def _play_out(self, reply: Reply, until: float) -> None:
        with anyio.CancelScope() as scope:
            self._finish_scope = scope
            await anyio.sleep(max(0.0, until - time.monotonic()))
            finished = pb.AgentSessionMessage.ConsoleIO.AudioPlaybackFinished()
            await self._send(pb.AgentSessionMessage(audio_playback_finished=finished))

    def _event(self, event: pb.AgentSessionEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "user_input_transcribed" and event.user_input_transcribed.is_final:
            self.log.heard.append(event.user_input_transcribed.transcript)
        elif kind == "conversation_item_added" and event.conversation_item_added.item.HasField("message"):
            message = event.conversation_item_added.item.message
            if message.role == pb.ASSISTANT:
                self.log.said.append(" ".join(c.text for c in message.content if c.text))
            if message.HasField("metrics"):
                fields = message.metrics.ListFields()
                timing = {f.name: round(v, 4) for f, v in fields if isinstance(v, float)}
                self.log.timings.append((pb.ChatRole.Name(message.role), timing))
        elif kind == "conversation_item_added" and event.conversation_item_added.item.HasField(
            "agent_handoff"
        ):
            handoff = event.conversation_item_added.item.agent_handoff
            self.log.handoffs.append((handoff.old_agent_id, handoff.new_agent_id))
        elif kind == "function_tools_executed":
            done = event.function_tools_executed
            outputs = {o.call_id: o.output for o in done.function_call_outputs}
            for call in done.function_calls:
                self.log.tools.append(ToolCall(call.name, call.arguments, outputs.get(call.call_id, "")))
        elif kind == "error":
            self.log.session_errors.append(event.error.message)
        elif kind == "eot_prediction":
            eot = event.eot_prediction
            took = eot.inference_duration.seconds + eot.inference_duration.nanos / 1e9
            self.log.end_of_turn.append(EndOfTurn(time.monotonic(), eot.probability, eot.threshold, took))
        elif kind == "user_state_changed":
            if event.user_state_changed.new_state == pb.US_SPEAKING:
                self.log.user_speaking.append(time.monotonic())
        elif kind == "agent_state_changed":
            state = event.agent_state_changed.new_state
            self.log.states.append(pb.AgentState.Name(state))
        else:
            return
        self._note()
