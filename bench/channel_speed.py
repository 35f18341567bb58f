#!/usr/bin/env python3
"""How fast the wire is: protocol round trips and one-way throughput through the async channel
(``otp_agents.channel.Channel``) on asyncio and trio, against raw blocking sockets, in one run.

Each measurement is two processes over one ``socketpair`` (the supervisor's side here, the
other side a child process started by this script), with the project's frames (4-byte length +
MessagePack; a ``Ping``/``Pong`` is about 30 bytes):

* **raw ping-pong**: both ends blocking ``sendall``/``recv`` + ``wire.encode``/``FrameDecoder``.
  The floor: no event loop anywhere.
* **channel ping-pong, raw peer**: this side ``await channel.send(Ping)`` / ``await
  channel.receive()``; the child is the blocking responder above.
* **channel ping-pong, channel peer**: both ends async (the child runs a ``Channel`` on the same
  backend): a supervisor talking to a library worker.
* **one-way throughput** of small frames (``Ping``), counted by a blocking reader child: raw
  ``sendall`` of 32 frames joined (the ceiling), raw unbatched, ``channel.send`` per frame, and
  ``channel.send_many`` of 32 frames.

Usage::

    .venv/bin/python bench/channel_speed.py [--quick] [--output FILE]

Children are started and reaped here, by pid; every wait is bounded; no network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("OTP_AGENTS_BENCH_PATH", str(ROOT)))  # another tree, to compare

from otp_agents.wire import framing as wire  # noqa: E402
from otp_agents.wire.channel import Channel  # noqa: E402
from otp_agents.wire.messages import Ping, Pong  # noqa: E402

BATCH = 32
TIMEOUT = 120.0


# -- the child side ------------------------------------------------------------------------------


def _blocking_frames(sock: socket.socket) -> Any:
    decoder = wire.FrameDecoder()
    while True:
        data = sock.recv(65536)
        if not data:
            return
        yield from decoder.feed(data)


def child_echo(sock: socket.socket) -> None:
    for msg in _blocking_frames(sock):
        assert isinstance(msg, Ping)
        sock.sendall(wire.encode(Pong(seq=msg.seq, sent_ns=msg.sent_ns)))


def child_count(sock: socket.socket) -> None:
    """Count frames until a Ping with seq -1; answer with the count in a Pong."""
    n = 0
    for msg in _blocking_frames(sock):
        assert isinstance(msg, Ping)
        if msg.seq == -1:
            sock.sendall(wire.encode(Pong(seq=n, sent_ns=0)))
            n = 0
        else:
            n += 1


async def child_channel_echo(sock: socket.socket) -> None:
    channel = await Channel.from_socket(sock)
    try:
        while True:
            msg = await channel.receive()
            assert isinstance(msg, Ping)
            await channel.send(Pong(seq=msg.seq, sent_ns=msg.sent_ns))
    except Exception:  # the parent closed: done
        return


def run_child(mode: str, fd: int, backend: str) -> None:
    sock = socket.socket(fileno=fd)
    if mode == "echo":
        child_echo(sock)
    elif mode == "count":
        child_count(sock)
    else:
        anyio.run(child_channel_echo, sock, backend=backend)


# -- the measuring side --------------------------------------------------------------------------


class Peer:
    def __init__(self, mode: str, backend: str = "asyncio") -> None:
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", mode, str(theirs.fileno()), backend],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        theirs.close()

    def close(self) -> None:
        self.ours.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def summary_us(values_ns: list[int]) -> dict[str, float]:
    v = sorted(values_ns)
    q = statistics.quantiles(v, n=100, method="inclusive")
    return {
        "n": len(v),
        "p50_us": round(statistics.median(v) / 1000, 2),
        "p90_us": round(q[89] / 1000, 2),
        "p99_us": round(q[98] / 1000, 2),
    }


def raw_ping_pong(n: int) -> dict[str, float]:
    peer = Peer("echo")
    sock, decoder = peer.ours, wire.FrameDecoder()
    samples: list[int] = []
    try:
        for i in range(n):
            t0 = time.perf_counter_ns()
            sock.sendall(wire.encode(Ping(seq=i, sent_ns=t0)))
            got: list[Any] = []
            while not got:
                got = decoder.feed(sock.recv(65536))
            samples.append(time.perf_counter_ns() - t0)
    finally:
        peer.close()
    return summary_us(samples[n // 10 :])


async def channel_ping_pong(n: int, mode: str, backend: str) -> dict[str, float]:
    peer = Peer(mode, backend)
    channel = await Channel.from_socket(peer.ours)
    samples: list[int] = []
    try:
        with anyio.fail_after(TIMEOUT):
            for i in range(n):
                t0 = time.perf_counter_ns()
                await channel.send(Ping(seq=i, sent_ns=t0))
                await channel.receive()
                samples.append(time.perf_counter_ns() - t0)
    finally:
        await channel.aclose()
        peer.close()
    return summary_us(samples[n // 10 :])


def _count_result(sock: socket.socket) -> int:
    decoder = wire.FrameDecoder()
    while True:
        got = decoder.feed(sock.recv(65536))
        if got:
            assert isinstance(got[0], Pong)
            return got[0].seq


def raw_throughput(n: int, batched: bool) -> dict[str, float]:
    peer = Peer("count")
    frame = wire.encode(Ping(seq=1, sent_ns=0))
    sock = peer.ours
    try:
        t0 = time.perf_counter()
        if batched:
            chunk = frame * BATCH
            for _ in range(n // BATCH):
                sock.sendall(chunk)
        else:
            for _ in range(n):
                sock.sendall(frame)
        sock.sendall(wire.encode(Ping(seq=-1, sent_ns=0)))
        counted = _count_result(sock)
        elapsed = time.perf_counter() - t0
    finally:
        peer.close()
    return {"frames": counted, "per_s": round(counted / elapsed)}


async def channel_throughput(n: int, backend: str, batched: bool) -> dict[str, float]:
    peer = Peer("count")
    channel = await Channel.from_socket(peer.ours)
    msg = Ping(seq=1, sent_ns=0)
    try:
        with anyio.fail_after(TIMEOUT):
            t0 = time.perf_counter()
            if batched:
                batch = [msg] * BATCH
                for _ in range(n // BATCH):
                    await channel.send_many(batch)
            else:
                for _ in range(n):
                    await channel.send(msg)
            await channel.send(Ping(seq=-1, sent_ns=0))
            reply = await channel.receive()
            elapsed = time.perf_counter() - t0
    finally:
        await channel.aclose()
        peer.close()
    assert isinstance(reply, Pong)
    return {"frames": reply.seq, "per_s": round(reply.seq / elapsed)}


def measure(rounds: int, frames: int, repeats: int) -> dict[str, Any]:
    results: dict[str, Any] = {"ping_pong": {}, "throughput": {}}
    runs: dict[str, list[dict[str, float]]] = {}
    tput: dict[str, list[dict[str, float]]] = {}
    for _ in range(repeats):  # interleaved, so drift on the VM hits every variant alike
        runs.setdefault("raw", []).append(raw_ping_pong(rounds))
        for backend in ("asyncio", "trio"):
            for mode in ("echo", "channel"):
                key = f"channel/{backend}, {'raw' if mode == 'echo' else 'channel'} peer"
                runs.setdefault(key, []).append(
                    anyio.run(channel_ping_pong, rounds, mode, backend, backend=backend)
                )
        tput.setdefault("raw, 32 frames per send", []).append(raw_throughput(frames, True))
        tput.setdefault("raw, one frame per send", []).append(raw_throughput(frames, False))
        for backend in ("asyncio", "trio"):
            tput.setdefault(f"channel/{backend}, send", []).append(
                anyio.run(channel_throughput, frames, backend, False, backend=backend)
            )
            if hasattr(Channel, "send_many"):  # not in the channel before the fast path
                tput.setdefault(f"channel/{backend}, send_many of 32", []).append(
                    anyio.run(channel_throughput, frames, backend, True, backend=backend)
                )
    raw_p50 = statistics.median(r["p50_us"] for r in runs["raw"])
    for key, rs in runs.items():
        p50 = statistics.median(r["p50_us"] for r in rs)
        results["ping_pong"][key] = {
            "p50_us": round(p50, 2),
            "p90_us": round(statistics.median(r["p90_us"] for r in rs), 2),
            "p99_us": round(statistics.median(r["p99_us"] for r in rs), 2),
            "x_raw": round(p50 / raw_p50, 2),
            "runs_p50_us": [r["p50_us"] for r in rs],
        }
    ceiling = statistics.median(r["per_s"] for r in tput["raw, 32 frames per send"])
    for key, ts in tput.items():
        per_s = statistics.median(r["per_s"] for r in ts)
        results["throughput"][key] = {
            "frames_per_s": round(per_s),
            "of_ceiling": round(per_s / ceiling, 3),
            "runs_per_s": [r["per_s"] for r in ts],
        }
    return results


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "anyio": anyio.__version__ if hasattr(anyio, "__version__") else "",
    }


def markdown(r: dict[str, Any]) -> str:
    out = [
        f"Round trips: {r['rounds']} per run (first 10 % dropped), medians over {r['repeats']} runs.",
        "",
        "| round trip | p50 µs | p90 µs | p99 µs | p50 vs raw |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, v in r["ping_pong"].items():
        out.append(f"| {key} | {v['p50_us']} | {v['p90_us']} | {v['p99_us']} | {v['x_raw']}x |")
    out += [
        "",
        f"One-way: {r['frames']} Ping frames per run, medians over {r['repeats']} runs.",
        "",
        "| sender | frames/s | of the raw batched ceiling |",
        "|---|---:|---:|",
    ]
    for key, v in r["throughput"].items():
        out.append(f"| {key} | {v['frames_per_s']:,} | {v['of_ceiling'] * 100:.0f} % |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="CI-sized (a few seconds)")
    p.add_argument("--output", help="also write the results as JSON here")
    p.add_argument("--child", nargs=3, metavar=("MODE", "FD", "BACKEND"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        run_child(args.child[0], int(args.child[1]), args.child[2])
        return 0
    rounds, frames, repeats = (500, 20_000, 1) if args.quick else (5_000, 200_000, 5)
    results: dict[str, Any] = {
        "rounds": rounds,
        "frames": frames,
        "repeats": repeats,
        "machine": machine(),
        "command": "bench/channel_speed.py" + (" --quick" if args.quick else ""),
    }
    results |= measure(rounds, frames, repeats)
    print(markdown(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
