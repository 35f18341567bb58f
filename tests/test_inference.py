"""The shared inference process: found through the supervisor, served directly, concurrent,
bounded (deadlines, back-pressure, hang-up cancels), and survived by its clients when killed."""

from __future__ import annotations

import itertools
import json
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from otp_agents.events import Kind
from otp_agents.voice.audio import SAMPLE_RATE
from otp_agents.voice.inference import InferFailed, InferResult, RemoteSTT, abstract_address, request_stt
from otp_agents.voice.inference_server import InferenceServer, ProcessRecognizer, listen
from otp_agents.voice.local_io import read_wav
from otp_agents.voice.samples import speak_flite
from otp_agents.voice.stt import PocketSphinxSTT
from otp_agents.wire.framing import FrameDecoder, encode

from .helpers import tree_of, worker
from .voice_helpers import needs_tts

pytestmark = [pytest.mark.anyio, needs_tts]

QUESTION = "What is my favorite color?"
HEARD = "what is my favorite color"


@pytest.fixture(scope="module")
def question() -> np.ndarray:
    pad = np.zeros(SAMPLE_RATE // 4, dtype=np.int16)
    return np.concatenate((pad, speak_flite(QUESTION, "rms"), pad))


def _wav(tmp: Path, samples: np.ndarray) -> Path:
    from otp_agents.voice.local_io import WavWriter

    path = tmp / "question.wav"
    w = WavWriter(path, SAMPLE_RATE)
    w.write(samples)
    w.close()
    assert len(read_wav(path)[0]) == len(samples)
    return path


def _log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


# -- in this process: the server's rules ----------------------------------------------------------

_started: list[ProcessRecognizer] = []


@pytest.fixture(autouse=True)
async def _stop_recognizers() -> Any:
    yield
    while _started:
        await _started.pop().aclose()


async def _serving(pool: int, max_queue: int) -> tuple[InferenceServer, str, Any]:
    recognizers = [ProcessRecognizer() for _ in range(pool)]
    for r in recognizers:
        await r.start()
        _started.append(r)
    server = InferenceServer(list(recognizers), max_queue=max_queue)
    address = abstract_address(f"test-{id(server)}")
    listener = await listen(address)
    return server, address, listener


async def test_requests_are_served_in_parallel_up_to_the_pool(question: np.ndarray) -> None:
    server, address, listener = await _serving(pool=2, max_queue=16)
    results: list[InferResult | InferFailed] = []
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(server.serve, listener)

        async def ask(n: int) -> None:
            results.append(await request_stt(address, question, 30.0, n))

        async with anyio.create_task_group() as clients:
            for n in range(6):
                clients.start_soon(ask, n)
        tg.cancel_scope.cancel()
    assert [r.text for r in results if isinstance(r, InferResult)] == [HEARD] * 6
    assert server.stats.served == 6 and server.stats.peak_in_flight == 2
    spans = sorted(server.stats.spans)
    overlapping = sum(1 for a, b in itertools.pairwise(spans) if b[0] < a[1])
    assert overlapping >= 2  # model calls really ran side by side, not one at a time


async def test_deadline_and_back_pressure(question: np.ndarray) -> None:
    long = np.tile(question, 6)  # keeps the single recogniser busy for a while
    server, address, listener = await _serving(pool=1, max_queue=1)
    replies: dict[str, InferResult | InferFailed] = {}
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(server.serve, listener)

        async def ask(name: str, audio: np.ndarray, wait: float) -> None:
            replies[name] = await request_stt(address, audio, wait)

        async with anyio.create_task_group() as clients:
            clients.start_soon(ask, "long", long, 60.0)
            await anyio.sleep(0.2)  # the long one holds the recogniser
            clients.start_soon(ask, "impatient", question, 0.05)  # queued; gives up first
            await anyio.sleep(0.01)
            clients.start_soon(ask, "overflow", question, 60.0)  # the queue (1) is full
        tg.cancel_scope.cancel()
    assert isinstance(replies["long"], InferResult)
    impatient, overflow = replies["impatient"], replies["overflow"]
    assert isinstance(impatient, InferFailed) and impatient.reason == "deadline"
    assert isinstance(overflow, InferFailed) and overflow.reason == "busy"
    assert server.stats.expired == 1 and server.stats.busy == 1


async def test_hanging_up_cancels_a_queued_request(question: np.ndarray) -> None:
    long = np.tile(question, 6)
    server, address, listener = await _serving(pool=1, max_queue=8)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(server.serve, listener)
        async with anyio.create_task_group() as clients:
            clients.start_soon(request_stt, address, long, 60.0)
            await anyio.sleep(0.2)
            with anyio.move_on_after(0.1):  # leaves early: hangs up
                await request_stt(address, question, 60.0)
        tg.cancel_scope.cancel()
    assert server.stats.served == 1 and server.stats.abandoned == 1


async def test_no_server_and_no_fallback_is_a_retryable_provider_error(question: np.ndarray) -> None:
    from otp_agents.voice.providers import ProviderError

    async def nobody() -> str | None:
        return None

    stt = RemoteSTT(nobody, timeout=0.3)
    with pytest.raises(ProviderError) as info:
        await stt.recognize(question)
    assert info.value.retryable and info.value.kind == "unavailable"
    fell: list[str] = []
    stt = RemoteSTT(nobody, timeout=0.3, fallback=PocketSphinxSTT, on_fallback=fell.append)
    assert await stt.recognize(question) == HEARD
    assert stt.fell_back == 1 and fell == ["no inference server published"]


# -- under a supervisor: found by lookup, killed under load ---------------------------------------


async def test_inference_sigkilled_under_load_no_client_dies_and_service_returns(
    tmp_path: Path, question: np.ndarray
) -> None:
    wav = _wav(tmp_path, question)
    clients = [
        worker(
            f"client-{i}",
            "workers.inference_client:main",
            args=[
                str(wav),
                "--log",
                str(tmp_path / f"client-{i}.jsonl"),
                "--requests",
                "12",
                "--interval",
                "1.0",
                "--timeout",
                "30",  # a failure bound: the server's restart may be slow on a busy machine
                *(["--fallback"] if i == 0 else []),
            ],
            restart="transient",
            start_timeout=30,
        )
        for i in range(3)
    ]
    config = {
        "id": "root",
        "intensity": 5,
        "period": 60,
        "children": [
            worker("inference", "workers.inference_server:main", args=["--pool", "2"], start_timeout=30),
            *clients,
        ],
    }
    async with tree_of(config, state_dir=tmp_path / "state") as (_tree, rec):
        up = await rec.wait_for(lambda e: e.kind is Kind.SERVICE_UP and e.reason == "inference")
        with anyio.fail_after(60):
            while len(_log(tmp_path / "client-1.jsonl")) < 4:  # noqa: ASYNC110 - a file
                await anyio.sleep(0.05)
        assert up.pid is not None
        os.kill(up.pid, signal.SIGKILL)  # mid-load
        await rec.wait_for(lambda e: e.kind is Kind.SERVICE_DOWN and e.pid == up.pid)
        again = await rec.wait_for(lambda e: e.kind is Kind.SERVICE_UP and e.pid != up.pid)
        with anyio.fail_after(120):
            while len({e.path for e in rec.of(Kind.CHILD_EXITED) if e.path.startswith("root/client")}) < 3:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        exits = {e.path: e.code for e in rec.of(Kind.CHILD_EXITED) if e.path.startswith("root/client")}
        assert exits == {f"root/client-{i}": 0 for i in range(3)}  # no client died
        assert len(rec.of(Kind.CHILD_STARTED, "root/inference")) == 2
    for i in range(3):
        log = _log(tmp_path / f"client-{i}.jsonl")
        assert len(log) == 12
        # every request was answered (by the server, or locally by the client with a fallback)...
        failed = [r for r in log if not r["ok"]]
        assert failed == [], failed
        assert all(r["text"] == HEARD for r in log)
        # ...and the server answers again after its restart
        after = [r for r in log if r["start"] > again.ts + 0.5]
        assert after and all(r["source"] == "server" for r in after)


async def test_bad_clients_cost_their_connection_never_the_server(question: np.ndarray) -> None:
    from otp_agents.voice import inference

    server, address, listener = await _serving(pool=1, max_queue=4)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(server.serve, listener)
        # garbage, a frame of the wrong type, half a sample, and a client that hangs up at once
        for junk in (b"\x00\x00\x00\x05hello", encode(InferFailed(id=1, reason="busy"))):
            conn = await inference.connect(address)
            async with conn:
                await conn.send(junk)
                reply = await inference.read_one(
                    conn, FrameDecoder(inference.INFER_MAX_FRAME, decoder=inference.DECODER)
                )
            assert isinstance(reply, InferFailed) and reply.reason == "bad_request"
        half_sample = inference.InferRequest(id=7, kind="stt", audio=question.tobytes()[:-1], timeout=10.0)
        conn = await inference.connect(address)
        async with conn:
            await conn.send(encode(half_sample))
            odd = await inference.read_one(
                conn, FrameDecoder(inference.INFER_MAX_FRAME, decoder=inference.DECODER)
            )
        assert isinstance(odd, InferFailed) and odd.reason == "bad_request" and "16-bit" in odd.detail
        conn = await inference.connect(address)
        await conn.aclose()
        # ...and the next good request is served
        good = await request_stt(address, question, 30.0)
        assert isinstance(good, InferResult) and good.text == HEARD
        tg.cancel_scope.cancel()
