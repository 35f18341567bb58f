"""Leaf: a caller on the LiveKit Agents console transport, for hosted apps run offline.

It serves :class:`~otp_agents.voice.agents_console.ConsoleCall` on loopback, publishes the
address under ``--service`` (an agents host leaf with ``--console-service`` finds it there, and
finds it again after a restart), speaks a conversation script with flite, one line per turn once
the agent is listening, and writes ``transcript.txt`` and ``agent.wav`` (16 kHz) to ``--out``.
Exits 0 when the script is done.

``module = "workers.console_caller:main"``, args: ``--script FILE --service NAME --out DIR
[--voice VOICE] [--turn-timeout S]``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import anyio
import numpy as np

from otp_agents.voice.agents_console import WIRE_RATE, CallLog, ConsoleCall
from otp_agents.voice.audio import SAMPLE_RATE, resample
from otp_agents.voice.local_io import WavWriter
from otp_agents.voice.samples import parse_script, speak_flite
from otp_agents.worker import Worker, run


def listening(log: CallLog) -> bool:
    return bool(log.replies) and log.states[-1:] == ["AS_LISTENING"]


def answered(log: CallLog, after: int) -> bool:
    return len(log.replies) > after


def write_out(out: Path, log: CallLog, lines: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = [f"caller said: {line}" for line in lines]
    text += [f"agent heard: {line}" for line in log.heard]
    text += [f"agent said: {line.strip()}" for line in log.said]
    text.append(f"agent connections: {log.connections}")
    (out / "transcript.txt").write_text("\n".join(text) + "\n")
    writer = WavWriter(out / "agent.wav.tmp", SAMPLE_RATE)
    gap = np.zeros(SAMPLE_RATE // 2, dtype=np.int16)
    for reply in log.replies:
        writer.write(resample(reply.audio, WIRE_RATE, SAMPLE_RATE))
        writer.write(gap)
    writer.close()
    (out / "agent.wav.tmp").replace(out / "agent.wav")


async def main(worker: Worker) -> None:
    p = argparse.ArgumentParser(prog="console_caller")
    p.add_argument("--script", type=Path, required=True)
    p.add_argument("--service", required=True, help="publish the console address under this name")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--voice", default="kal16")
    p.add_argument("--turn-timeout", type=float, default=60.0)
    args = p.parse_args(worker.args)
    items = parse_script(args.script.read_text(), str(args.script))
    said: list[str] = []
    audio = {
        line: await anyio.to_thread.run_sync(functools.partial(speak_flite, line, args.voice))
        for line in items
        if isinstance(line, str)
    }
    call = ConsoleCall()
    async with anyio.create_task_group() as tg:
        address = await tg.start(call.serve)
        await worker.publish(args.service, address)
        await worker.ready()
        for item in items:
            if worker.stopping:
                break
            if isinstance(item, float):
                await anyio.sleep(item)
                continue
            try:
                await call.wait_for(listening, args.turn_timeout)
                replies = len(call.log.replies)
                await call.say(audio[item], SAMPLE_RATE)
                said.append(item)
                await call.wait_for(functools.partial(answered, after=replies), args.turn_timeout)
            except TimeoutError:
                await worker.log(f"no answer from the agent within {args.turn_timeout:.0f}s to {item!r}")
            write_out(args.out, call.log, said)
        with anyio.move_on_after(args.turn_timeout):
            await call.wait_for(listening, args.turn_timeout)
        write_out(args.out, call.log, said)
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    run(main)
