"""The shared inference server on its own: latency and throughput of speech recognition requests
at several concurrencies, against recognising in the caller's own process (one model per leaf).

A 2.6 s utterance spoken by flite is recognised ``--requests`` times:

* local: pocketsphinx in this process, one request at a time (what a leaf without the shared
  server does; it cannot do two at once, the decoder holds the GIL);
* shared: through :class:`InferenceServer` with ``--pool`` recogniser processes, over its Unix
  socket, with C requests in flight at once.

    .venv/bin/python bench/inference_throughput.py [--pool 2] [--requests 40] [--concurrency 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import anyio
import numpy as np

from otp_agents.health import memory
from otp_agents.voice.audio import SAMPLE_RATE
from otp_agents.voice.inference import InferResult, abstract_address, request_stt
from otp_agents.voice.inference_server import InferenceServer, ProcessRecognizer, listen
from otp_agents.voice.samples import speak_flite


def _pss_kb(pid: int) -> int:
    return memory.precise_bytes(pid, "pss") // 1024


def _summary(latencies: list[float], wall: float) -> dict[str, float]:
    q = statistics.quantiles(latencies, n=20, method="inclusive")
    return {
        "latency_median_ms": round(1000 * statistics.median(latencies), 1),
        "latency_p95_ms": round(1000 * q[18], 1),
        "throughput_rps": round(len(latencies) / wall, 2),
    }


async def measure(pool: int, requests: int, concurrencies: list[int]) -> dict[str, Any]:
    pad = np.zeros(SAMPLE_RATE // 4, dtype=np.int16)
    audio = np.concatenate((pad, speak_flite("What is my favorite color?", "rms"), pad))
    results: dict[str, Any] = {"audio_s": round(len(audio) / SAMPLE_RATE, 2), "pool": pool}

    from otp_agents.voice.recognizer_proc import sphinx_recognizer

    before = _pss_kb(os.getpid())
    local = sphinx_recognizer()
    local(audio.tobytes())
    results["local_model_pss_mb"] = round((_pss_kb(os.getpid()) - before) / 1024, 1)
    lat: list[float] = []
    t0 = time.monotonic()
    for _ in range(requests):
        t = time.monotonic()
        local(audio.tobytes())
        lat.append(time.monotonic() - t)
    results["local"] = _summary(lat, time.monotonic() - t0)

    recognizers = [ProcessRecognizer() for _ in range(pool)]
    for r in recognizers:
        await r.start()
    server = InferenceServer(list(recognizers), max_queue=1000)
    address = abstract_address("bench")
    listener = await listen(address)
    results["shared_pss_mb"] = round(
        sum(_pss_kb(r._proc.pid) for r in recognizers if r._proc is not None) / 1024, 1
    )
    shared: dict[str, Any] = {}
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(server.serve, listener)
        for c in concurrencies:
            lat = []
            limiter = anyio.Semaphore(c)

            async def one(lat: list[float] = lat, limiter: anyio.Semaphore = limiter) -> None:
                async with limiter:
                    t = time.monotonic()
                    reply = await request_stt(address, audio, 60.0)
                    assert isinstance(reply, InferResult), reply
                    lat.append(time.monotonic() - t)

            t0 = time.monotonic()
            async with anyio.create_task_group() as clients:
                for _ in range(requests):
                    clients.start_soon(one)
            shared[str(c)] = _summary(lat, time.monotonic() - t0)
        tg.cancel_scope.cancel()
    for r in recognizers:
        await r.aclose()
    results["shared_by_concurrency"] = shared
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pool", type=int, default=2)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", default="1,2,4,8")
    args = parser.parse_args()
    result = anyio.run(measure, args.pool, args.requests, [int(c) for c in args.concurrency.split(",")])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
