"""Misbehaving protocol workers, for tests and chaos runs. Each is a ``module = ...`` target."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time

import anyio
import anyio.abc
import msgspec

from otp_agents.wire.env import ENV_FD
from otp_agents.worker import Worker


async def steady(worker: Worker) -> None:
    """Ready at once; returns cleanly when asked to stop."""
    await worker.ready()
    await worker.wait_stopping()


async def slow_start(worker: Worker) -> None:
    """Takes the first arg's seconds before saying Ready."""
    await anyio.sleep(float(worker.args[0]) if worker.args else 1.0)
    await worker.ready()
    await worker.wait_stopping()


async def barrier(worker: Worker) -> None:
    """Says Ready only once N workers (first arg) have checked in to the directory (second arg):
    it can start only if N of them are starting at the same time. Gives up after 10 s."""
    count, where = int(worker.args[0]), worker.args[1]
    os.close(os.open(os.path.join(where, str(os.getpid())), os.O_CREAT | os.O_WRONLY, 0o600))
    with anyio.fail_after(10):
        while len(os.listdir(where)) < count:  # noqa: ASYNC110 - a directory has no wakeup
            await anyio.sleep(0.01)
    await worker.ready()
    await worker.wait_stopping()


async def exit_before_ready(worker: Worker) -> None:
    """Fails during setup (exit code 1 through the library's crash path)."""
    raise RuntimeError("setup failed")


async def crash_after(worker: Worker) -> None:
    """Ready, then crashes after the first arg's seconds (default 0)."""
    await worker.ready()
    await anyio.sleep(float(worker.args[0]) if worker.args else 0.0)
    raise RuntimeError("crash")


async def ignore_shutdown(worker: Worker) -> None:
    """Ready, then keeps working through the stop request in a blocking loop (no await)."""
    await worker.ready()
    await worker.wait_stopping()
    while True:  # blocks the event loop: only SIGKILL ends this
        time.sleep(0.05)  # noqa: ASYNC251 - deliberately stuck


def _raw(data: bytes) -> None:
    os.write(int(os.environ[ENV_FD]), data)


async def garbage(worker: Worker) -> None:
    """Ready, then writes bytes that are not a frame."""
    await worker.ready()
    _raw(struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")
    await worker.wait_stopping()


async def oversized(worker: Worker) -> None:
    """Ready, then declares a 1 GiB frame."""
    await worker.ready()
    _raw(struct.pack(">I", 1 << 30))
    await worker.wait_stopping()


async def unknown_tag(worker: Worker) -> None:
    """Ready, then sends a well-formed frame of a type nobody knows."""
    await worker.ready()
    body = msgspec.msgpack.encode({"type": "teleport", "to": "mars"})
    _raw(struct.pack(">I", len(body)) + body)
    await worker.wait_stopping()


async def truncated(worker: Worker) -> None:
    """Ready, then half a frame, then exits."""
    await worker.ready()
    _raw(struct.pack(">I", 100) + b"\x81")
    sys.stderr.flush()
    os._exit(4)


async def bad_utf8(worker: Worker) -> None:
    """Ready, then an error frame whose text is not UTF-8."""
    await worker.ready()
    body = b"\x82\xa4type\xa5error\xa7message\xa2\xff\xfe"
    _raw(struct.pack(">I", len(body)) + body)
    await worker.wait_stopping()


async def deep_nesting(worker: Worker) -> None:
    """Ready, then a small frame of 10,000 nested arrays."""
    await worker.ready()
    body = b"\x91" * 10_000 + b"\x00"
    _raw(struct.pack(">I", len(body)) + body)
    await worker.wait_stopping()


async def chatty_start(worker: Worker) -> None:
    """Logs while setting up, before Ready (allowed by the protocol)."""
    await worker.log("loading")
    await worker.ready()
    await worker.wait_stopping()


# -- health pathologies ---------------------------------------------------------------------------


def busy_in_blocking_call() -> None:
    time.sleep(3600)  # the whole event loop stops here


async def blocks_loop(worker: Worker) -> None:
    """Ready, then blocks its event loop in a plain blocking call (no await)."""
    await worker.ready()
    await anyio.sleep(0.3)
    busy_in_blocking_call()


def crunch_numbers() -> int:
    return sum(range(10**14))  # one long C call that holds the GIL


async def gil_hog(worker: Worker) -> None:
    """Ready, then a C call that holds the GIL for a very long time."""
    await worker.ready()
    await anyio.sleep(0.3)
    crunch_numbers()


_hoard: list[bytes] = []


async def leaker(worker: Worker) -> None:
    """Ready, then grows by the first arg's MB (default 20) every 0.1 s, up to the second arg's
    MB (default 2000). Honours a drain request unless the third arg is "ignore"."""
    step = int(float(worker.args[0]) if worker.args else 20) * 1024 * 1024
    cap = float(worker.args[1]) if len(worker.args) > 1 else 2000.0
    ignore = len(worker.args) > 2 and worker.args[2] == "ignore"
    await worker.ready()
    while ignore or not worker.stopping:
        if len(_hoard) * step < cap * 1024 * 1024:
            _hoard.append(os.urandom(1) * step)  # touched pages: real resident memory
        with anyio.move_on_after(0.1):
            await (anyio.sleep(3600) if ignore else worker.wait_stopping())


GRANDCHILD_LEAK = """
import sys, time
step = int(float(sys.argv[1])) * 1024 * 1024
hoard = []
while len(hoard) < 200:
    hoard.append(b"x" * step)
    time.sleep(0.1)
time.sleep(3600)
"""


async def grandchild_leaker(worker: Worker) -> None:
    """Stays small itself; its own child process grows by the first arg's MB every 0.1 s."""
    step = worker.args[0] if worker.args else "20"
    async with await anyio.open_process([sys.executable, "-c", GRANDCHILD_LEAK, step]) as child:
        await worker.ready()
        await worker.wait_stopping()
        child.terminate()


async def setsid_leaker(worker: Worker) -> None:
    """As grandchild_leaker, but its child leaves the process group (``setsid``), and its pid is
    written to the file named by the second arg: a kill of the worker's group misses it."""
    step, pid_file = worker.args[0], worker.args[1]
    async with await anyio.open_process(
        [sys.executable, "-c", GRANDCHILD_LEAK, step], start_new_session=True
    ) as child:
        await anyio.Path(pid_file).write_text(f"{child.pid}\n")
        await worker.ready()
        await worker.wait_stopping()
        child.terminate()


async def drains_slowly(worker: Worker) -> None:
    """Ready; on a stop or drain request finishes "current work" (the first arg's seconds)."""
    await worker.ready()
    await worker.wait_stopping()
    await anyio.sleep(float(worker.args[0]) if worker.args else 0.2)


# -- start and exit edge cases --------------------------------------------------------------------


async def killed_in_setup(worker: Worker) -> None:
    """Dies hard during setup, before Ready (as if OOM-killed while loading a model)."""
    os.kill(os.getpid(), signal.SIGKILL)


async def done_exit0(worker: Worker) -> None:
    """A transient job that finishes and leaves with the common idiom sys.exit(0)."""
    await worker.ready()
    await anyio.sleep(0.2)
    sys.exit(0)


async def ready_then_exit0(worker: Worker) -> None:
    """A very short job: says Ready, finishes at once, exits 0."""
    await worker.ready()
    os._exit(0)


# -- the chaos soak's target ----------------------------------------------------------------------

CHAOS_FAULTS = (
    "garbage",
    "oversized",
    "truncated",
    "close",
    "fork_exit",
    "leak",
    "hang",
    "crash",
    "ignore_term",
)


async def target(worker: Worker) -> None:
    """Ready; then, on each SIGUSR2, commits the fault named in ``$CHAOS_DIR/<pid>`` (one of
    CHAOS_FAULTS): bad frames, a closed channel, grandchildren left behind, a memory leak, a
    stuck event loop, a crash, or ignoring the stop request. Used by bench/chaos_soak.py."""
    where = os.environ.get("CHAOS_DIR", "")
    deaf = False
    hoard: list[bytes] = []

    async def leak() -> None:
        while len(hoard) < 100:  # bounded: 2 GB, far over any limit the soak sets
            hoard.append(os.urandom(1) * (20 << 20))
            await anyio.sleep(0.1)

    def commit(fault: str, tg: anyio.abc.TaskGroup) -> None:
        nonlocal deaf
        if fault == "garbage":
            _raw(struct.pack(">I", 5) + b"\xc1" * 5)
        elif fault == "oversized":
            _raw(struct.pack(">I", 1 << 30))
        elif fault == "truncated":
            _raw(struct.pack(">I", 100) + b"\x81")
            os._exit(4)
        elif fault == "close":
            with socket.socket(fileno=os.dup(int(os.environ[ENV_FD]))) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        elif fault == "fork_exit":
            subprocess.Popen(["sleep", "3"], start_new_session=True)  # escapes the group
            subprocess.Popen(["sleep", "30"])  # stays in it
            os._exit(1)
        elif fault == "leak":
            tg.start_soon(leak)
        elif fault == "hang":
            time.sleep(3600)  # deliberately stuck: no more pongs
        elif fault == "crash":
            raise RuntimeError("chaos: crash")
        elif fault == "ignore_term":
            deaf = True

    await worker.ready()
    with anyio.open_signal_receiver(signal.SIGUSR2) as signals:
        async with anyio.create_task_group() as tg:

            async def faults() -> None:
                async for _ in signals:
                    try:
                        with open(os.path.join(where, str(os.getpid()))) as f:  # noqa: ASYNC230 - tiny
                            fault = f.read().strip()
                    except OSError:
                        continue
                    commit(fault, tg)

            tg.start_soon(faults)
            await worker.wait_stopping()
            while deaf:  # only SIGKILL ends this
                time.sleep(0.05)  # noqa: ASYNC251 - deliberately deaf
            tg.cancel_scope.cancel()


async def tell_secrets(worker: Worker) -> None:
    """Ready, then puts its LiveKit secret in a log line and a report label (as a careless app
    might): the supervisor must not pass either on."""
    secret = os.environ.get("LIVEKIT_API_SECRET", "")
    await worker.ready()
    await worker.log(f"connecting with api secret {secret}")
    await worker.report("voice_provider_errors", 1, provider=secret, kind="auth")
    await worker.wait_stopping()


async def fake_dispatcher(worker: Worker) -> None:
    """Reports what a LiveKit dispatcher reports (connected, then its load), then waits."""
    await worker.ready()
    await worker.report("dispatcher_connected", 1.0)
    await worker.report("dispatcher_load", 0.25)
    await worker.wait_stopping()
