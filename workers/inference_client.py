"""A load generator for the shared inference process: recognises one WAV again and again
through :class:`RemoteSTT`, writing one JSON line per request (outcome, source, elapsed) to
``--log``. Used by the tests and the benchmark of the inference process.

``module = "workers.inference_client:main"``, args: ``WAV --log FILE [--requests N]
[--interval S] [--timeout S] [--fallback] [--parallel K]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anyio

from otp_agents.voice.audio import SAMPLE_RATE, resample
from otp_agents.voice.inference import RemoteSTT
from otp_agents.voice.local_io import read_wav
from otp_agents.voice.providers import ProviderError
from otp_agents.voice.stt import PocketSphinxSTT
from otp_agents.worker import Worker, run


async def main(worker: Worker) -> None:
    p = argparse.ArgumentParser(prog="inference_client")
    p.add_argument("wav", type=Path)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--fallback", action="store_true", help="recognise locally when the server fails")
    p.add_argument("--parallel", type=int, default=1, help="requests in flight at once")
    p.add_argument("--service", default="inference")
    args = p.parse_args(worker.args)
    samples, rate = read_wav(args.wav)
    audio = resample(samples, rate, SAMPLE_RATE)
    fallbacks: list[str] = []
    stt = RemoteSTT(
        lambda: worker.lookup(args.service),
        timeout=args.timeout,
        fallback=PocketSphinxSTT if args.fallback else None,
        on_fallback=fallbacks.append,
    )
    await worker.ready()
    out = args.log.open("a", buffering=1)
    limiter = anyio.Semaphore(args.parallel)

    async def one(n: int) -> None:
        async with limiter:
            started = time.monotonic()
            local_before = stt.fell_back
            record: dict[str, object] = {"n": n, "start": time.time()}
            try:
                record["text"] = await stt.recognize(audio)
                record["ok"] = True
                record["source"] = "local" if stt.fell_back > local_before else "server"
            except ProviderError as exc:
                record.update(ok=False, kind=exc.kind, error=str(exc))
            record["elapsed"] = round(time.monotonic() - started, 4)
            out.write(json.dumps(record) + "\n")

    try:
        async with anyio.create_task_group() as tg:
            for n in range(args.requests):
                if worker.stopping:
                    break
                tg.start_soon(one, n)
                await anyio.sleep(args.interval)
    finally:
        out.close()


if __name__ == "__main__":
    run(main)
