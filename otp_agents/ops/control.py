"""The control socket: a Unix socket in the state dir through which the CLI drives a running tree.

Only the operations defined here exist; nothing executes arbitrary commands. The socket is
created with mode 0600 (0660 with an operators' group) and every connection's peer credentials
(``SO_PEERCRED``) are checked: the same uid as the supervisor, root, or a member of that group.
Requests and replies use the worker protocol's framing (4-byte length + MessagePack), with their
own two message types.

Read-only requests (``status``) are answered from the tree's current state and never wait for a
supervisor's mailbox, so they are answered during restart storms. Requests that change the tree
go through the target supervisor's mailbox like any other message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import msgspec

from otp_agents.errors import ChildNotFound, ConfigError, NotRunning, Refused, StartError
from otp_agents.events import Event, Kind
from otp_agents.health.memory import MB, rss_bytes, tree_pids
from otp_agents.proc.handle import ChildProcess
from otp_agents.redact import REDACTOR
from otp_agents.spec.load import load_file
from otp_agents.spec.model import CommandSpec, WorkerSpec, walk
from otp_agents.tree.supervisor import Supervisor
from otp_agents.wire import framing as wire

if TYPE_CHECKING:
    from otp_agents.runtime.running import Tree

log = logging.getLogger("otp_agents")

SOCKET_NAME = "control.sock"
OPS = ("status", "restart", "terminate", "start", "start-child", "dump", "stop", "events", "reload")


class Request(msgspec.Struct, tag_field="type", tag="request", forbid_unknown_fields=True):
    op: str
    path: str = ""
    args: list[str] = []
    kinds: list[str] = []  # events: only these kinds (empty: all)


class Reply(msgspec.Struct, tag_field="type", tag="reply", omit_defaults=True):
    ok: bool
    code: str = "ok"  # ok | not_found | refused | error | denied
    message: str = ""
    data: Any = None
    more: bool = False  # events: further replies follow


ControlMessage = Request | Reply
_decoder: msgspec.msgpack.Decoder[ControlMessage] = msgspec.msgpack.Decoder(ControlMessage)
MAX_CONTROL_FRAME = 4 << 20
RETRY = 5.0  # seconds between attempts to create the control socket


def socket_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return int(pid), int(uid), int(gid)


def peer_groups(pid: int) -> set[int]:
    """The peer's supplementary groups (from /proc; empty if it is already gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


def allowed(uid: int, gid: int, groups: set[int], own_uid: int, group: int | None) -> bool:
    """Same uid as the supervisor, root, or (when configured) a member of the allowed group."""
    if uid in (own_uid, 0):
        return True
    return group is not None and (gid == group or group in groups)


CONTROL_SERVICE = "otp-agents.control"  # the service name workers look the socket up by


class ControlServer:
    def __init__(
        self,
        tree: Tree,
        path: Path,
        on_stop: Callable[[], None],
        tree_file: str | None = None,
        group: int | None = None,
    ) -> None:
        self.tree = tree
        self.tree_file = tree_file
        self.group = group  # an operators' group that may use the socket too (mode 0660)
        self.path = path
        self.on_stop = on_stop
        self.uid = os.getuid()

    async def serve(self) -> None:
        """Serve the socket. If it cannot be made (a full disk, a read-only state dir) the tree
        runs on without it: a ``state_write_failed`` event says why, and it is tried again every
        RETRY seconds. Running out of descriptors while accepting delays connections, never
        ends the server."""
        failed = False
        while True:
            try:
                listener = await self._listen()
                break
            except OSError as exc:
                if not failed:
                    self.tree.bus.emit(
                        Kind.STATE_WRITE_FAILED,
                        self.tree.root.path,
                        reason="control_socket",
                        file=str(self.path),
                        detail=f"no control socket ({exc.strerror or exc}); retrying every {RETRY:g}s",
                    )
                failed = True
                await anyio.sleep(RETRY)
        # Workers that drive the tree (a job dispatcher) find the socket like any service, once
        # it exists; it answers only this user (and the operators' group).
        self.tree.host.services[CONTROL_SERVICE] = (str(self.path.resolve()), self.tree.root.path, 0)
        try:
            async with listener, anyio.create_task_group() as tg:
                refusing = False
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:  # EMFILE and the like: the connection waits, we go on
                        if not refusing:  # once per episode, not every 0.1 s
                            log.warning("control socket: cannot accept (%s)", exc.strerror or exc)
                        refusing = True
                        await anyio.sleep(0.1)
                        continue
                    refusing = False
                    tg.start_soon(self._connection, stream)
        finally:
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _listen(self) -> anyio.abc.SocketListener:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a previous run (the state dir is ours)
        old = os.umask(0o177)
        try:
            listener = await anyio.create_unix_listener(self.path)
        finally:
            os.umask(old)
        try:
            if self.group is not None:
                os.chown(self.path, -1, self.group)
                os.chmod(self.path, 0o660)
            else:
                os.chmod(self.path, 0o600)
        except OSError:
            await listener.aclose()
            raise
        return listener

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            pid, uid, gid = peer_credentials(raw)
            groups = peer_groups(pid) if self.group is not None else set()
            if not allowed(uid, gid, groups, self.uid, self.group):
                await stream.send(
                    wire.encode(
                        Reply(ok=False, code="denied", message=f"uid {uid} may not control this tree")
                    )
                )
                return
            decoder = wire.FrameDecoder(MAX_CONTROL_FRAME, decoder=_decoder)
            try:
                while True:
                    data = await stream.receive()
                    for msg in decoder.feed(data):
                        if not isinstance(msg, Request):
                            raise wire.FrameError("malformed", "expected a request")
                        await self._handle(msg, stream)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            except wire.FrameError as exc:
                with contextlib.suppress(Exception):
                    await stream.send(
                        wire.encode(Reply(ok=False, code="error", message=f"bad request: {exc}"))
                    )

    async def _handle(self, req: Request, stream: anyio.abc.SocketStream) -> None:
        if req.op == "events":
            await self._events(req, stream)
            return
        try:
            reply = await self._dispatch(req)
        except ChildNotFound as exc:
            reply = Reply(ok=False, code="not_found", message=f"no such child: {exc}")
        except (Refused, StartError) as exc:
            reply = Reply(ok=False, code="refused", message=str(exc))
        await stream.send(wire.encode(reply))

    async def _dispatch(self, req: Request) -> Reply:
        tree = self.tree
        if req.op == "status":
            return Reply(ok=True, data=status(tree))
        if req.op == "stop":
            self.on_stop()
            return Reply(ok=True, message=f"{tree.root.path}: stopping in reverse start order")
        if req.op == "reload":
            if self.tree_file is None:
                raise Refused("this tree was not started from a file: nothing to reload")
            changes = await reload_tree(tree, self.tree_file)
            return Reply(ok=True, message="\n".join(changes) or "no changes", data={"changes": changes})
        if req.op == "start-child":
            child = await tree.supervisor(req.path).start_child(req.args)
            return Reply(ok=True, message=f"started {child}", data={"path": child})
        if req.op in ("restart", "terminate", "start", "dump"):
            parent, _, child_id = req.path.rpartition("/")
            sup = tree.supervisor(parent) if parent else None
            if sup is None or child_id not in sup.slots:
                raise ChildNotFound(req.path)
            if req.op == "restart":
                await sup.operator_restart(child_id)
                return Reply(ok=True, message=f"restarted {req.path}")
            if req.op == "terminate":
                await sup.terminate_child(child_id)
                return Reply(ok=True, message=f"terminated {req.path}; it stays down until `start`")
            if req.op == "start":
                await sup.restart_child(child_id)
                return Reply(ok=True, message=f"started {req.path}")
            inst = sup.slots[child_id].instance
            if not isinstance(inst, ChildProcess):
                raise Refused(f"{req.path} is not a running process")
            dump = await tree.host.dumper.take(inst, "operator")
            if dump is None:
                raise Refused(f"{req.path}: the dump could not be written")
            return Reply(ok=True, message=str(dump), data={"file": str(dump), "text": dump.read_text()})
        return Reply(
            ok=False, code="refused", message=f"unknown operation {req.op!r} (known: {', '.join(OPS)})"
        )

    async def _events(self, req: Request, stream: anyio.abc.SocketStream) -> None:
        sub = self.tree.bus.subscribe(maxlen=10_000)
        kinds = set(req.kinds)
        prefix = req.path
        try:
            while True:
                batch = await sub.batch()
                if not batch:
                    break
                rows = [
                    msgspec.to_builtins(e)
                    for e in batch
                    if (not kinds or e.kind.value in kinds) and _under(e, prefix)
                ]
                if rows:
                    await stream.send(wire.encode(Reply(ok=True, data=rows, more=True)))
        finally:
            sub.close()


def _under(event: Event, prefix: str) -> bool:
    return not prefix or event.path == prefix or event.path.startswith(prefix + "/")


def status(tree: Tree) -> dict[str, Any]:
    """The whole tree as plain data (what ``otp-agents status`` shows)."""
    now = time.monotonic()

    def sup_row(sup: Supervisor) -> dict[str, Any]:
        children = []
        for info in sup.which_children():
            slot = sup.slots[info.id]
            row: dict[str, Any] = {
                "id": info.id,
                "path": info.path,
                "kind": info.kind,
                "status": info.status,
                "pid": info.pid,
                "uptime": round(now - info.started_at, 3) if info.started_at else None,
                "restarts": info.restarts,
            }
            inst = slot.instance
            if isinstance(inst, ChildProcess):
                watched = tree.host.memory.last_mb(inst)
                mb = watched if watched is not None else sum(rss_bytes(p) for p in tree_pids(inst.pid)) / MB
                row["memory_mb"] = round(mb, 1)
                row["rtt_ms"] = round(inst.rtt * 1000, 3) if inst.rtt is not None else None
            if isinstance(inst, Supervisor):
                row["children"] = sup_row(inst)["children"]
                row["strategy"] = inst.spec.strategy.value
            children.append(row)
        return {"path": sup.path, "strategy": sup.spec.strategy.value, "children": children}

    root = sup_row(tree.root)
    root["pid"] = os.getpid()
    guard = tree.host.guard
    root["containment"] = guard.containment if guard is not None else "process groups"
    root["uptime"] = round(now - tree.root.started_at, 3)
    return root


# -- reload ----------------------------------------------------------------------------------------


async def reload_tree(tree: Tree, tree_file: str) -> list[str]:
    """Re-read ``tree_file`` and apply only the difference; :class:`Refused` (nothing changed)
    if the file is invalid or renames the root."""
    try:
        new = load_file(tree_file)
    except ConfigError as exc:
        raise Refused(f"reload refused, nothing changed: {exc}") from None
    if new.id != tree.root.spec.id:
        raise Refused(
            f"reload refused, nothing changed: the root id changed ({tree.root.spec.id} -> {new.id})"
        )
    REDACTOR.learn_all(c.env for _, c in walk(new) if isinstance(c, CommandSpec | WorkerSpec))
    return await tree.root.apply_spec(new)


async def watch_tree_file(tree: Tree, tree_file: str, every: float, loaded: bytes | None = None) -> None:
    """Reload when the file's content changes (a Kubernetes ConfigMap update swaps it in
    place). Checked every ``every`` seconds against ``loaded``, the content the tree was started
    from (read before it was loaded), so a change made while the tree was starting is applied
    at the first check. A file that does not load is refused like a ``reload`` request, and
    the tree keeps running as it was."""
    last = loaded if loaded is not None else file_content(tree_file)
    while True:
        await anyio.sleep(every)
        now = await anyio.to_thread.run_sync(file_content, tree_file)
        if now is None or now == last:
            continue
        last = now
        try:
            changes = await reload_tree(tree, tree_file)
        except (Refused, ChildNotFound, StartError) as exc:
            log.error("%s changed: %s", tree_file, exc)
            continue
        except Exception:  # a reload must never take the running tree down
            log.exception("%s changed: the reload failed", tree_file)
            continue
        log.info("%s changed, reloaded: %s", tree_file, "; ".join(changes) or "no changes")


def file_content(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


# -- client ------------------------------------------------------------------------------------


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
    decoder = wire.FrameDecoder(MAX_CONTROL_FRAME, decoder=_decoder)
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
    with anyio.fail_after(timeout):
        async with contextlib.aclosing(stream(path, req)) as replies:
            async for reply in replies:
                return reply
    raise NotRunning(f"the control socket {path} closed without answering")


async def stream(path: str | Path, req: Request) -> AsyncGenerator[Reply, None]:
    """Async client: the replies to ``req`` (many, for ``events``) until the last one."""
    try:
        conn = await anyio.connect_unix(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise NotRunning(f"no supervisor is running with control socket {path} ({exc.strerror})") from None
    decoder = wire.FrameDecoder(MAX_CONTROL_FRAME, decoder=_decoder)
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
