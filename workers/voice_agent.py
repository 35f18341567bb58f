"""A voice-agent leaf: one conversation, one supervised process.

Point a tree at it with ``module = "workers.voice_agent:main"``. It loads its models (VAD, STT,
the TTS voices and the pre-rendered fallback line), says Ready, then holds the conversation:

* offline, from a script the caller "says" (``--conversation FILE``, spoken by flite) or a WAV
  (``--input FILE``), writing ``call.wav`` (stereo: caller left, agent right, the call as heard),
  ``transcript.txt`` and ``events.jsonl`` under ``--out``;
* or in a LiveKit room (``--room NAME``; LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET).

After every turn it checkpoints the conversation (history, shared user data, current agent,
the room binding and the conversation time) to its supervisor. Restarted after a crash it gets
that checkpoint back and goes on where it was: the next reply remembers. Asked to drain, it
finishes the turn in progress and exits 0 (its supervisor restarts it and it resumes); at the
end of the conversation it clears its checkpoint and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec

from otp_agents.voice.agent import Agent, Conversation, default_agents
from otp_agents.voice.audio import AudioInput, AudioSink
from otp_agents.voice.eot import LocalEOT, TurnSettings
from otp_agents.voice.inference import RemoteSTT
from otp_agents.voice.llm_agent import ChatCompletionsAgent
from otp_agents.voice.local_io import WavInput, WavSink
from otp_agents.voice.pipeline import PipelineEvent, PipelineSettings, VoicePipeline
from otp_agents.voice.providers import ProviderError, ProviderStats
from otp_agents.voice.samples import render_script
from otp_agents.voice.stt import STT, PocketSphinxSTT
from otp_agents.voice.tts import EspeakTTS, FliteTTS, render_ahead
from otp_agents.voice.vad import SileroVAD, VADSettings
from otp_agents.worker import Worker, run

CHECKPOINT_VERSION = 1


class VoiceCheckpoint(msgspec.Struct):
    """What survives a crash of this leaf."""

    conversation: Conversation
    position: float  # conversation time (s) when taken
    wall: float  # time.time() when taken: a live caller kept talking while we were down
    incarnation: int = 1
    room: str | None = None
    participant: str | None = None
    version: int = CHECKPOINT_VERSION


DEFAULT_VOICE = "kal16"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="voice_agent", description=__doc__.splitlines()[0] if __doc__ else None)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--conversation", type=Path, help="script of what the caller says (spoken by flite)")
    src.add_argument("--input", type=Path, help="WAV file of the caller")
    src.add_argument("--room", help="LiveKit room to join (needs LIVEKIT_URL/_API_KEY/_API_SECRET)")
    p.add_argument("--out", type=Path, default=Path("voice-out"), help="where call.wav and transcripts go")
    p.add_argument("--caller-voice", default="slt", help="flite voice of a --conversation caller")
    p.add_argument("--voice", default=DEFAULT_VOICE, help="the agent's flite voice (espeak-ng is the backup)")
    p.add_argument("--agent", default="receptionist", help="the agent that answers first")
    p.add_argument(
        "--llm-url", help="an OpenAI-compatible chat-completions server: it becomes the receptionist"
    )
    p.add_argument("--llm-model", default="gpt-4o-mini")
    p.add_argument("--llm-key-env", default="OPENAI_API_KEY", help="environment variable holding its API key")
    p.add_argument("--virtual-clock", action="store_true", help="replies take no conversation time")
    p.add_argument("--endpointing", type=float, default=0.5, help="min endpointing delay (s)")
    p.add_argument("--max-endpointing", type=float, default=3.0, help="wait after an unlikely end (s)")
    p.add_argument(
        "--turn-detector",
        choices=("eot", "silence"),
        default="silence",
        help="end of turn: silence alone, or LiveKit's audio end-of-turn model (eot) on top",
    )
    p.add_argument("--interruption", type=float, default=0.5, help="min speech that interrupts the agent (s)")
    p.add_argument("--no-interruptions", action="store_true")
    p.add_argument("--noise-suppression", action="store_true")
    p.add_argument(
        "--inference",
        nargs="?",
        const="inference",
        default=None,
        metavar="SERVICE",
        help="recognise speech in the shared inference process (looked up as SERVICE, default 'inference')",
    )
    p.add_argument(
        "--no-local-fallback", action="store_true", help="with --inference: never recognise locally"
    )
    p.add_argument(
        "--begin-at", type=float, default=0.0, help="start the call at this time.time() (fleet tests)"
    )
    p.add_argument(
        "--crash-after-turn", type=int, default=0, help="demo: SIGKILL ourselves after this turn, once"
    )
    p.add_argument("--identity", default=None, help="our participant identity in the room")
    p.add_argument("--job", default=None, help="the LiveKit job id this call serves (set by the dispatcher)")
    p.add_argument("--listen-to", default=None, help="participant identity to listen to")
    p.add_argument("--allow-agents", action="store_true", help="may listen to other agents")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    return p.parse_args(argv)


class Leaf:
    def __init__(self, worker: Worker, args: argparse.Namespace) -> None:
        self.worker = worker
        self.args = args
        self.out: Path = args.out / args.job if args.job else args.out  # one directory per job
        self.out.mkdir(parents=True, exist_ok=True)
        self.resumed = self._load_checkpoint()
        self.incarnation = self.resumed.incarnation + 1 if self.resumed else 1
        self.stats = ProviderStats(on_error=self._on_provider_error)
        self.send, self.receive = anyio.create_memory_object_stream[PipelineEvent | ProviderError](1000)
        self.pipeline: VoicePipeline | None = None
        self.room: str | None = args.room
        self.participant: str | None = args.listen_to
        mode = "a" if self.resumed else "w"
        self.transcript = open(self.out / "transcript.txt", mode, buffering=1)  # noqa: SIM115
        self.events = open(self.out / "events.jsonl", mode, buffering=1)  # noqa: SIM115

    # -- checkpoints ------------------------------------------------------------------------------

    def _load_checkpoint(self) -> VoiceCheckpoint | None:
        raw = self.worker.resumed
        if not raw:
            return None
        try:
            ckpt = msgspec.msgpack.decode(raw, type=VoiceCheckpoint)
        except msgspec.DecodeError as exc:
            sys.stderr.write(f"voice_agent: ignoring an unreadable checkpoint ({exc}); starting afresh\n")
            return None
        if ckpt.version != CHECKPOINT_VERSION or ckpt.conversation.agent not in default_agents():
            sys.stderr.write("voice_agent: ignoring a checkpoint of another version; starting afresh\n")
            return None
        return ckpt

    async def checkpoint(self, conversation: Conversation) -> None:
        assert self.pipeline is not None
        ckpt = VoiceCheckpoint(
            conversation=conversation,
            position=round(self.pipeline.now, 3),
            wall=time.time(),
            incarnation=self.incarnation,
            room=self.room,
            participant=self.participant,
        )
        data = msgspec.msgpack.encode(ckpt)
        limit = self.worker.checkpoint_max
        while limit and len(data) > limit and ckpt.conversation.history:
            # Too big: the oldest history goes first; user data and the binding always stay.
            ckpt.conversation = msgspec.structs.replace(
                ckpt.conversation, history=ckpt.conversation.history[1:]
            )
            data = msgspec.msgpack.encode(ckpt)
        with contextlib.suppress(ValueError):
            await self.worker.checkpoint(data)

    async def after_turn(self, conversation: Conversation) -> None:
        await self.checkpoint(conversation)
        n = self.args.crash_after_turn
        if n and self.resumed is None and conversation.turns >= n:
            self.log_line(f"-- crashing on purpose after turn {conversation.turns} (demo) --")
            os.kill(os.getpid(), signal.SIGKILL)

    # -- events -------------------------------------------------------------------------------------

    def _on_provider_error(self, exc: ProviderError) -> None:
        with contextlib.suppress(anyio.WouldBlock):
            self.send.send_nowait(exc)

    def on_event(self, event: PipelineEvent) -> None:
        self.events.write(json.dumps(msgspec.to_builtins(event)) + "\n")
        if event.kind == "user_said":
            self.log_line(f"[{event.t:7.2f}] caller: {event.text}")
        elif event.kind == "agent_said":
            self.log_line(f"[{event.t:7.2f}] {event.agent}: {event.text}")
        elif event.kind == "interrupted":
            self.log_line(f"[{event.t:7.2f}] (caller interrupted; heard only: {event.text!r})")
        elif event.kind == "handoff":
            self.log_line(f"[{event.t:7.2f}] (hand-off {event.text})")
        elif event.kind == "fallback":
            self.log_line(f"[{event.t:7.2f}] (fallback line)")
        with contextlib.suppress(anyio.WouldBlock):
            self.send.send_nowait(event)

    def log_line(self, line: str) -> None:
        self.transcript.write(line + "\n")

    async def report_events(self) -> None:
        async for item in self.receive:
            if isinstance(item, ProviderError):
                await self.worker.report("voice_provider_errors", 1, provider=item.provider, kind=item.kind)
            elif item.kind == "turn" and item.value is not None:
                await self.worker.report("voice_turn_latency_seconds", item.value)
                await self.worker.report("voice_turns", 1)

    # -- the call -----------------------------------------------------------------------------------

    def stt(self) -> STT:
        service = self.args.inference
        if not service:
            return PocketSphinxSTT()

        def fell_back(problem: str) -> None:
            self.log_line(f"-- inference unavailable ({problem}): recognised locally --")

        return RemoteSTT(
            lambda: self.worker.lookup(service),
            timeout=5.0,
            fallback=None if self.args.no_local_fallback else PocketSphinxSTT,
            on_fallback=fell_back,
        )

    def agents(self) -> dict[str, Agent]:
        agents: dict[str, Agent] = dict(default_agents())
        if self.args.llm_url:
            agents["receptionist"] = ChatCompletionsAgent(
                "receptionist",
                self.args.llm_url,
                self.args.llm_model,
                api_key=os.environ.get(self.args.llm_key_env),
            )
        return agents

    def settings(self) -> PipelineSettings:
        a = self.args
        return PipelineSettings(
            min_endpointing_delay=a.endpointing,
            min_interruption_duration=a.interruption,
            allow_interruptions=not a.no_interruptions,
            noise_suppression=a.noise_suppression,
            vad=VADSettings(),
            turn=TurnSettings(max_endpointing_delay=a.max_endpointing),
        )

    def start_position(self) -> float:
        if self.resumed is None:
            return 0.0
        if self.args.virtual_clock:
            return self.resumed.position
        # A live caller does not wait for us: skip what they said while we were down.
        return self.resumed.position + max(0.0, time.time() - self.resumed.wall)

    def open_sink(self) -> WavSink:
        if self.resumed is None:
            (self.out / "call.wav").unlink(missing_ok=True)  # a new call, a new recording
        return WavSink(self.out / "call.wav", user_channel=True)

    async def open_input(self, sink: WavSink, start: float) -> AudioInput:
        a = self.args
        path = a.input or await anyio.to_thread.run_sync(
            lambda: render_script(a.conversation, self.out, voice=a.caller_voice)
        )
        # The recording follows the call's clock: silence for the time we were down, or (on the
        # virtual clock, which resumes where the checkpoint was) cut back to that point.
        sink.writer.seek_to(start)
        return WavInput(path, realtime=not a.virtual_clock, start_at=start)

    async def join_room(self, lkroom: Any, env: Any) -> Any:
        identity = self.args.identity or f"agent-{self.worker.path.rsplit('/', 1)[-1]}"
        listen_to = self.participant or (self.resumed.participant if self.resumed else None)
        session = await lkroom.join(
            env,
            self.args.room,
            identity,
            listen_to=listen_to,
            allow_agents=self.args.allow_agents,
            connect_timeout=self.args.connect_timeout,
        )
        self.participant = session.participant.identity
        return session

    async def serve(self) -> int:
        vad = SileroVAD()
        stt = self.stt()
        conversation = self.resumed.conversation if self.resumed else Conversation(agent=self.args.agent)
        if self.args.room:
            from otp_agents.voice import room as lkroom

            env = lkroom.LiveKitEnv.from_environ()  # a missing variable fails before Ready
        else:
            local_sink = self.open_sink()
        pipeline = VoicePipeline(
            vad=vad,
            stt=stt,
            tts=[FliteTTS(self.args.voice), EspeakTTS()],
            agents=self.agents(),
            conversation=conversation,
            sink=_Placeholder() if self.args.room else local_sink,
            settings=self.settings(),
            on_event=self.on_event,
            on_turn=self.after_turn,
            stats=self.stats,
            virtual_clock=self.args.virtual_clock,
            turn_model=LocalEOT() if self.args.turn_detector == "eot" else None,
        )
        self.pipeline = pipeline
        await pipeline.prepare()  # renders the fallback line: the TTS voices work
        await self.worker.ready()
        sink: AudioSink = local_sink if not self.args.room else pipeline.sink
        room_session: Any = None
        finished = False
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.report_events)
            in_call = anyio.Event()

            async def watch_stop() -> None:
                await self.worker.wait_stopping()
                if self.worker.draining and in_call.is_set():
                    pipeline.drain()  # finish the turn in progress, then return
                else:  # a stop, or a drain before the call began: leave now, checkpoint kept
                    tg.cancel_scope.cancel()

            tg.start_soon(watch_stop)
            try:
                if self.args.room:
                    room_session = await self.join_room(lkroom, env)
                    source, sink = room_session.input, room_session.output
                    pipeline.sink = sink
                else:
                    await self.worker.log(
                        f"call in {self.out}/: call.wav (caller left, agent right), transcript.txt"
                    )
                wait = self.args.begin_at - time.time()
                if wait > 0 and self.resumed is None:
                    await anyio.sleep(min(wait, 300.0))  # calls of a fleet test start together
                start = self.start_position()  # after loading: a live caller went on meanwhile
                pipeline.now = start
                if not self.args.room:
                    source = await self.open_input(local_sink, start)
                    pipeline.taps.append(local_sink.user_frame)
                if self.resumed:
                    self.log_line(
                        f"-- resumed (incarnation {self.incarnation}) at {start:.2f}s with "
                        f"{len(conversation.history)} messages, agent {conversation.agent} --"
                    )
                self.events.write(
                    json.dumps({"kind": "input_started", "t": start, "wall": time.time()}) + "\n"
                )
                if self.resumed:
                    await self.worker.report("resumed_listening", 1)  # the supervisor times the gap
                in_call.set()
                await pipeline.run(source)
                finished = pipeline.completed
                # How far behind real time the input fell: at its worst, and at the end.
                late, lag = getattr(source, "late", None), getattr(source, "lag", None)
                done = {
                    "kind": "input_finished",
                    "t": pipeline.now,
                    "wall": time.time(),
                    "late": late,
                    "lag": lag,
                }
                self.events.write(json.dumps(done) + "\n")
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    if finished:
                        await self.worker.clear_checkpoint()
                        self.log_line("-- conversation over --")
                    elif in_call.is_set():
                        await self.checkpoint(pipeline.conversation)
                    await sink.aclose()
                    if room_session is not None:
                        await room_session.aclose()
            tg.cancel_scope.cancel()
        return 0


class _Placeholder:
    """The sink before the room is joined (nothing plays before that)."""

    sample_rate = 48_000
    queued = 0.0

    async def push(self, frame: Any) -> None:
        return None

    def clear(self) -> float:
        return 0.0

    def advance(self, seconds: float) -> None:
        return None

    async def aclose(self) -> None:
        return None


def preload() -> None:
    """For a zygote (``preload = ["workers.voice_agent:preload"]``): this module imported, the
    recogniser's model loaded and warmed on the fallback line, the line rendered with the default
    voice. A forked leaf (a restarted call above all) then does none of it before it listens."""
    from otp_agents.voice import stt
    from otp_agents.voice.audio import SAMPLE_RATE, resample

    try:
        samples, rate = render_ahead(FliteTTS(DEFAULT_VOICE), PipelineSettings().fallback_line)
    except (OSError, subprocess.SubprocessError, ProviderError):
        stt.preload()  # no flite here: the leaf falls back to espeak-ng at its start, as ever
        return
    stt.preload(warm=resample(samples, rate, SAMPLE_RATE))


async def main(worker: Worker) -> None:
    args = parse_args(worker.args)
    leaf = Leaf(worker, args)
    try:
        await leaf.serve()
    finally:
        leaf.send.close()
        leaf.receive.close()
        leaf.transcript.close()
        leaf.events.close()


if __name__ == "__main__":
    run(main)
