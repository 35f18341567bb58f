"""The start of a protocol worker's session: the handshake that makes it count as started."""

from __future__ import annotations

from typing import Protocol

import anyio

from otp_agents.errors import StartError
from otp_agents.events import Kind
from otp_agents.proc.handle import ChildProcess, ProcHost
from otp_agents.spec.model import WorkerSpec
from otp_agents.wire.channel import Channel, ChannelClosed
from otp_agents.wire.framing import FrameError
from otp_agents.wire.messages import (
    SUPPORTED_VERSIONS,
    Bye,
    Checkpoint,
    Error,
    Hello,
    Log,
    Lookup,
    Publish,
    Ready,
    Reject,
    Report,
    Welcome,
)


class SessionHost(ProcHost, Protocol):
    async def checkpoint(self, path: str, limit: int) -> bytes | None:
        """The last checkpoint kept for ``path`` (handed back in the Welcome)."""


async def handshake(proc: ChildProcess, channel: Channel, spec: WorkerSpec, host: SessionHost) -> None:
    """Hello, Welcome (with the last checkpoint), then Ready within ``start_timeout``; raises
    :class:`StartError` saying why otherwise. Frames a worker may send before Ready are served."""
    problem: str | None = None
    ready = False

    async def converse() -> None:
        nonlocal problem, ready
        hello = await channel.receive()
        if not isinstance(hello, Hello):
            problem = f"expected hello, got {type(hello).__name__.lower()}"
            return
        common = sorted(set(hello.versions) & set(SUPPORTED_VERSIONS))
        if not common:
            await channel.send(
                Reject(reason=f"no common protocol version (we speak {list(SUPPORTED_VERSIONS)})")
            )
            problem = f"worker speaks protocol versions {hello.versions}, we speak {list(SUPPORTED_VERSIONS)}"
            return
        limit = spec.checkpoint_max_bytes
        checkpoint = await host.checkpoint(proc.path, limit) if limit else None
        await channel.send(
            Welcome(version=common[-1], path=proc.path, checkpoint=checkpoint, checkpoint_max=limit)
        )
        if checkpoint is not None:
            host.bus.emit(Kind.RESUMED, proc.path, pid=proc.pid, value=len(checkpoint))
        while True:
            msg = await channel.receive()
            if isinstance(msg, Ready):
                ready = True
                return
            if isinstance(msg, Bye):  # main() ended before ready(): wait for the exit status
                proc._handle(msg, host.bus)
                with anyio.move_on_after(2.0):
                    await proc.exited.wait()
                problem = "exited before it was ready"
                return
            if isinstance(
                msg, Log | Error | Checkpoint | Report | Publish | Lookup
            ):  # any time after Welcome
                proc._handle(msg, host.bus)
                continue
            problem = f"expected ready, got {type(msg).__name__.lower()}"
            return

    async with anyio.create_task_group() as tg:

        async def on_early_exit() -> None:
            await proc.exited.wait()
            # What it wrote before exiting (Ready, Bye, EOF) is already in our buffer: let
            # converse() read it; the grace only matters if a grandchild still holds its end.
            await anyio.sleep(0.2)
            tg.cancel_scope.cancel()

        tg.start_soon(on_early_exit)
        try:
            with anyio.fail_after(spec.start_timeout):
                await converse()
        except TimeoutError:
            problem = f"not ready within start_timeout ({spec.start_timeout}s)"
        except (ChannelClosed, anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            # EOF, or the watcher closed the channel because the process is gone, or a send
            # to a peer that already hung up: all mean the child ended before it was ready.
            with anyio.move_on_after(1.0):
                await proc.exited.wait()
            problem = "exited before it was ready"
        except FrameError as exc:
            problem = f"protocol error during start: {exc}"
        tg.cancel_scope.cancel()
    if ready and problem is None:
        return  # it said Ready: it started; an exit right after is a ChildDown, not a start failure
    if proc.exit is not None and problem in (None, "exited before it was ready"):
        problem = f"exited before it was ready ({proc.exit.status.describe()})"
    if problem is not None and proc.last_words:
        problem = f"{problem}: {proc.last_words}"
    elif problem is not None and proc.exit is not None and (said := last_said(proc.last_output)):
        problem = f"{problem}; its stderr ends: {said}"
    if problem is not None:
        raise StartError(problem)


def last_said(lines: list[str]) -> str | None:
    """The last non-empty line of a child's stderr (a traceback's last line names the error)."""
    return next((line.strip() for line in reversed(lines) if line.strip()), None)
