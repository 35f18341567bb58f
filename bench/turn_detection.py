"""Turn latency with the audio end-of-turn model (voice/eot.py) against silence-only endpointing.

Callers are spoken by flite in several voices. Two sets of caller turns, each turn followed by
6 s of quiet (longer than any wait, so every turn ends on its own):

* complete: a finished sentence ("My name is Alice.");
* paused: a sentence with a pause of about 0.8 s in the middle ("I want to book a table for ...
  four people."): 0.4 s between the two renderings, whose own quiet edges add about 0.4 s;
  answering at the pause cuts the caller off.

Each is run through the real pipeline (Silero VAD, pocketsphinx, flite) on the virtual clock,
with each endpointing configuration. Reported per configuration:

* latency: from the end of the caller's speech to the turn being taken (conversation time; the
  agent's reply comes on top), median, mean and 90th percentile, over complete turns, and how
  many complete turns waited the max delay (judged unfinished);
* cut-ins: paused sentences answered at their pause (split into two turns), as a share;
* model time: wall time of one end-of-turn prediction on this machine (it runs in a thread,
  so it delays the turn only when it is longer than the min delay).

    .venv/bin/python bench/turn_detection.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from otp_agents.voice.agent import Conversation, Session
from otp_agents.voice.eot import LocalEOT, TurnModel, TurnSettings
from otp_agents.voice.local_io import WavInput, WavSink
from otp_agents.voice.pipeline import PipelineEvent, PipelineSettings, VoicePipeline
from otp_agents.voice.samples import render_script
from otp_agents.voice.stt import PocketSphinxSTT
from otp_agents.voice.tts import EspeakTTS, FliteTTS
from otp_agents.voice.vad import SileroVAD

COMPLETE = [
    "My name is Alice.",
    "What is the weather like today?",
    "Can I get a cheeseburger please.",
    "I would like to make a reservation.",
    "Nothing else, thanks.",
    "Please transfer me to support.",
    "My favorite color is green.",
    "At seven in the evening.",
]
PAUSED = [
    ("I want to book a table for", "four people."),
    ("My favorite color is", "green."),
    ("Can I get a", "large coffee please."),
    ("I would like to order", "two burgers."),
    ("The reservation is for", "seven tonight."),
    ("My name is", "Alice."),
    ("I was thinking that", "we could come later."),
    ("And then", "a side of fries."),
]
VOICES = ["kal16", "slt", "rms", "awb"]
CONFIGS: dict[str, tuple[float, bool]] = {  # name: (min delay, end-of-turn model)
    "silence 0.5 s": (0.5, False),
    "silence 1.0 s": (1.0, False),
    "eot, min 0.5 s / max 3.0 s": (0.5, True),
    "eot, min 0.3 s / max 3.0 s": (0.3, True),
}


class Okay:
    name = "okay"

    async def reply(self, text: str, session: Session) -> AsyncIterator[str]:
        yield "Okay."

    def greeting(self, session: Session) -> str | None:
        return None


class TimedEOT:
    """The real model, with each prediction's wall time kept."""

    def __init__(self, model: LocalEOT, times: list[float]) -> None:
        self.model, self.times = model, times
        self.name, self.window = model.name, model.window

    async def probability(self, samples: np.ndarray) -> float:
        t0 = time.perf_counter()
        try:
            return await self.model.probability(samples)
        finally:
            self.times.append(time.perf_counter() - t0)


def script(lines: list[str]) -> str:
    return "".join(f"{line}\npause 6\n" for line in lines)


async def run_call(wav: Path, out: Path, min_delay: float, model: TurnModel | None) -> list[PipelineEvent]:
    events: list[PipelineEvent] = []
    turn = TurnSettings(max_endpointing_delay=3.0)
    settings = PipelineSettings(min_endpointing_delay=min_delay, allow_interruptions=False, turn=turn)
    pipeline = VoicePipeline(
        vad=SileroVAD(),
        stt=PocketSphinxSTT(),
        tts=[FliteTTS(), EspeakTTS()],
        agents={"okay": Okay()},
        conversation=Conversation(agent="okay"),
        sink=WavSink(out, user_channel=False),
        settings=settings,
        on_event=events.append,
        virtual_clock=True,
        turn_model=model,
    )
    await pipeline.run(WavInput(wav, realtime=False))
    await pipeline.sink.aclose()
    return events


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def measure(quick: bool) -> dict[str, Any]:
    voices = VOICES[:1] if quick else VOICES
    complete = COMPLETE[:2] if quick else COMPLETE
    paused = PAUSED[:2] if quick else PAUSED
    times: list[float] = []
    model = TimedEOT(LocalEOT(), times)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="otp-turns-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "complete.txt").write_text(script(complete))
        (tmp / "paused.txt").write_text(script([f"{a}\npause 0.4\n{b}" for a, b in paused]))
        for name, (min_delay, eot) in CONFIGS.items():
            latencies: list[float] = []
            cut = 0
            for voice in voices:
                for kind in ("complete", "paused"):
                    wav = render_script(tmp / f"{kind}.txt", tmp / "wav", voice=voice, gap=0.0)
                    events = await run_call(wav, tmp / "out.wav", min_delay, model if eot else None)
                    ends = [e.value for e in events if e.kind == "user_turn_end" and e.value is not None]
                    if kind == "complete":
                        latencies += ends
                    else:
                        cut += max(0, len(ends) - len(paused))
            results[name] = {
                "min_delay": min_delay,
                "eot": eot,
                "turns": len(latencies),
                "latency_median_s": round(statistics.median(latencies), 3),
                "latency_p90_s": round(pct(latencies, 0.9), 3),
                "latency_mean_s": round(statistics.fmean(latencies), 3),
                "waited_max": sum(1 for x in latencies if x > 2.0),
                "cut_ins": cut,
                "paused_turns": len(paused) * len(voices),
            }
            print(name, results[name], flush=True)
    results["model_time_ms"] = {
        "n": len(times),
        "median": round(1000 * statistics.median(times), 1),
        "p99": round(1000 * pct(times, 0.99), 1),
    }
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one voice, two turns of each kind (smoke)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    results = anyio.run(measure, args.quick)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
