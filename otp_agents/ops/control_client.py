"""The control protocol and its clients: what the CLI and workers inside the tree (a job
dispatcher) use to drive a running tree. Requests and replies use the worker protocol's framing
(4-byte length + MessagePack) with their own two message types. This module imports only the
wire and the errors, so a CLI verb that only talks to the socket loads nothing of the runtime."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Annotated, Any, get_args

import msgspec

from otp_agents.errors import NotRunning
from otp_agents.wire import framing as wire

SOCKET_NAME = "control.sock"


class Request(
    msgspec.Struct, tag_field="type", tag="request", forbid_unknown_fields=True, omit_defaults=True
):
    """A request as it travels; the server reads it as one of the :data:`Command` types."""

    op: str
    path: str = ""
    args: list[str] = []
    kinds: list[str] = []  # events: only these kinds (empty: all)
    # start-child: memory bounds for this instance where its template's health sets none
    memory_warn_mb: float | None = None
    memory_limit_mb: float | None = None
    dry_run: bool = False  # reload: say what would change, change nothing


# -- the verbs: one Struct each, tagged by ``op`` (what each one takes is what it declares) -------


class _Verb(msgspec.Struct, tag_field="op"):
    pass


class Status(_Verb, tag="status"):
    """The whole tree, or the child or subtree at ``path`` (``otp-agents status [PATH]``)."""

    path: str = ""


class Restart(_Verb, tag="restart"):
    """Stop a child and start it again; not a crash."""

    path: str


class Terminate(_Verb, tag="terminate"):
    """Stop a child; it stays down until ``start``."""

    path: str


class Start(_Verb, tag="start"):
    """Start a stopped (or terminated) child."""

    path: str


class StartChild(_Verb, tag="start-child"):
    """One more child of a simple_one_for_one supervisor, with ``args`` appended. The memory
    bounds apply where the template's health table sets none (the tree's word wins): a job
    dispatcher passes the app's own per-job limits this way."""

    path: str
    args: list[str] = []
    memory_warn_mb: Annotated[float, msgspec.Meta(gt=0)] | None = None
    memory_limit_mb: Annotated[float, msgspec.Meta(gt=0)] | None = None


class Dump(_Verb, tag="dump"):
    """A stack dump of a child now, without killing it."""

    path: str


class Stop(_Verb, tag="stop"):
    """Stop the whole tree in reverse start order."""


class Events(_Verb, tag="events"):
    """Follow the event stream (many replies), under ``path``, of ``kinds`` (empty: all)."""

    path: str = ""
    kinds: list[str] = []


class Reload(_Verb, tag="reload"):
    """Re-read the tree file and apply the difference (``dry_run``: only say what it is)."""

    dry_run: bool = False


Command = Status | Restart | Terminate | Start | StartChild | Dump | Stop | Events | Reload
OPS = tuple(str(verb.__struct_config__.tag) for verb in get_args(Command))


def command(req: Request) -> Command:
    """The typed verb a request carries; ``msgspec.ValidationError`` names what is wrong."""
    verb: Command = msgspec.convert(msgspec.structs.asdict(req), Command)
    return verb


class Reply(msgspec.Struct, tag_field="type", tag="reply", omit_defaults=True):
    ok: bool
    code: str = "ok"  # ok | not_found | refused | error | denied
    message: str = ""
    data: Any = None
    more: bool = False  # events: further replies follow


ControlMessage = Request | Reply
DECODER: msgspec.msgpack.Decoder[ControlMessage] = msgspec.msgpack.Decoder(ControlMessage)
MAX_CONTROL_FRAME = 4 << 20


def socket_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


CONTROL_SERVICE = "otp-agents.control"  # the service name workers look the socket up by


def request(path: Path, req: Request, timeout: float = 30.0) -> list[Reply]:
    """Blocking client (the CLI): send one request, collect the reply (or replies, for events)."""
    replies: list[Reply] = []
    for reply in stream_requests(path, req, timeout):
        replies.append(reply)
    return replies


def _replies(decoder: wire.FrameDecoder[ControlMessage], data: bytes) -> tuple[list[Reply], bool]:
    """The replies in ``data``, up to the last one of the answer; and whether it came."""
    out: list[Reply] = []
    for msg in decoder.feed(data):
        if isinstance(msg, Reply):
            out.append(msg)
            if not msg.more:
                return out, True
    return out, False


def stream_requests(path: Path, req: Request, timeout: float | None = 30.0) -> Any:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise NotRunning(f"no supervisor is running with control socket {path} ({exc.strerror})") from None
    decoder = wire.FrameDecoder(MAX_CONTROL_FRAME, decoder=DECODER)
    try:
        sock.sendall(wire.encode(req))
        while True:
            data = sock.recv(65536)
            if not data:
                return
            replies, last = _replies(decoder, data)
            yield from replies
            if last:
                return
    finally:
        sock.close()


async def call(path: str | Path, req: Request, timeout: float = 30.0) -> Reply:  # noqa: ASYNC109
    """Async client for workers inside the tree: one request, its one reply, within ``timeout``."""
    import anyio  # the async clients only: the CLI's blocking client does not load it

    with anyio.fail_after(timeout):
        async with contextlib.aclosing(stream(path, req)) as replies:
            async for reply in replies:
                return reply
    raise NotRunning(f"the control socket {path} closed without answering")


async def stream(path: str | Path, req: Request) -> AsyncGenerator[Reply, None]:
    """Async client: the replies to ``req`` (many, for ``events``) until the last one."""
    import anyio

    try:
        conn = await anyio.connect_unix(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise NotRunning(f"no supervisor is running with control socket {path} ({exc.strerror})") from None
    decoder = wire.FrameDecoder(MAX_CONTROL_FRAME, decoder=DECODER)
    async with conn:
        await conn.send(wire.encode(req))
        while True:
            try:
                data = await conn.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            replies, last = _replies(decoder, data)
            for reply in replies:
                yield reply
            if last:
                return
