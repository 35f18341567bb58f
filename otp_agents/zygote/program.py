"""The zygote program (``python -m otp_agents.zygote``): handshake with the supervisor, preload
the image, freeze the heap, then serve fork requests (:mod:`otp_agents.zygote.forkserver`)."""

from __future__ import annotations

import argparse
import faulthandler
import gc
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from otp_agents.wire.env import (
    DUMP_SIGNAL,
    ENV_DUMP_FILE,
    ENV_FD,
    ENV_SUPERVISOR_PID,
    SERVICE_PREFIX,
)
from otp_agents.wire.framing import FrameDecoder, FrameError, encode
from otp_agents.wire.messages import (
    SUPPORTED_VERSIONS,
    Hello,
    Log,
    Publish,
    Ready,
    Reject,
    Welcome,
)
from otp_agents.zygote.child import warm_up
from otp_agents.zygote.forkserver import Zygote


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m otp_agents.zygote")
    p.add_argument("--image", required=True)
    p.add_argument(
        "--preload", default="", help="modules to import once, comma-separated (module:function calls it too)"
    )
    p.add_argument("--idle", type=int, default=1, help="workers forked ahead of need")
    args = p.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _register_dump()
    channel = socket.socket(fileno=int(os.environ[ENV_FD]))
    channel.set_inheritable(False)
    # Who adopts our workers: named by the supervisor (a `python` wrapper may sit in between).
    supervisor = int(os.environ.get(ENV_SUPERVISOR_PID, os.getppid()))
    channel.sendall(encode(Hello(versions=list(SUPPORTED_VERSIONS), pid=os.getpid())))
    decoder = FrameDecoder()
    frames: list[Any] = []
    while not frames:
        data = channel.recv(65536)
        if not data:
            return 70
        frames = decoder.feed(data)
    if isinstance(frames[0], Reject) or not isinstance(frames[0], Welcome):
        sys.stderr.write(f"zygote: the supervisor refused us: {frames[0]}\n")
        return 70
    started = time.monotonic()
    for name in [m.strip() for m in args.preload.split(",") if m.strip()]:
        module, _, function = name.partition(":")
        try:
            loaded = importlib.import_module(module)
            if function:
                getattr(loaded, function)()
        except Exception as exc:
            problem = f"zygote {args.image}: cannot preload {name}: {type(exc).__name__}: {exc}"
            channel.sendall(encode(Log(level=logging.ERROR, message=problem)))
            sys.stderr.write(problem + "\n")
            return 2
        if threading.active_count() != 1:
            names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
            problem = (
                f"zygote {args.image}: preload {name} started a thread ({names}); a zygote forks, so it "
                "must have none: start it in the worker, after the fork"
            )
            channel.sendall(encode(Log(level=logging.ERROR, message=problem)))
            sys.stderr.write(problem + "\n")
            return 2
    # What every forked worker runs: the worker library and the asyncio backend anyio.run loads.
    import anyio._backends._asyncio  # noqa: F401

    import otp_agents.worker.entry  # noqa: F401

    warm_up()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(0)  # builds numpy's global generator here, once (17 ms), not per fork
    gc.collect()
    gc.freeze()
    zygote = Zygote(channel, args.image, supervisor, args.idle)
    zygote.decoder = decoder
    zygote.refill()
    zygote.send(Publish(name=SERVICE_PREFIX + args.image, address=zygote.address))
    took = time.monotonic() - started
    zygote.send(Log(level=logging.INFO, message=f"zygote {args.image}: preloaded in {took:.3f}s"))
    zygote.send(Ready())
    try:
        return zygote.serve()
    except (EOFError, OSError, FrameError):
        return 0  # the supervisor went away


def _register_dump() -> None:

    path = os.environ.get(ENV_DUMP_FILE)
    if path:
        from otp_agents.worker import loop as worker_lib

        out = open(path, "ab", buffering=0)  # noqa: SIM115 - open for the process' life
        faulthandler.register(DUMP_SIGNAL, file=out, all_threads=True, chain=False)
        worker_lib._keep_open.append(out)
