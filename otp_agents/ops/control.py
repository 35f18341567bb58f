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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec

from otp_agents.errors import ChildNotFound, Refused, StartError
from otp_agents.events import OPERATOR, Event, Kind, Operator
from otp_agents.ops.control_client import (
    CONTROL_SERVICE,
    MAX_CONTROL_FRAME,
    OPS,
    Dump,
    Events,
    Reload,
    Reply,
    Request,
    Restart,
    Start,
    StartChild,
    Status,
    Stop,
    Terminate,
    command,
)
from otp_agents.ops.control_client import DECODER as control_decoder
from otp_agents.ops.status import status
from otp_agents.proc.handle import ChildProcess
from otp_agents.redact import REDACTOR
from otp_agents.runtime.reload import reload_tree
from otp_agents.runtime.tree import Tree
from otp_agents.tree.supervisor import Supervisor
from otp_agents.wire import framing as wire
from otp_agents.wire.peer import allowed, peer_command, peer_credentials, peer_groups

log = logging.getLogger("otp_agents")

RETRY = 5.0  # seconds between attempts to create the control socket


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
        """Bind and listen under a temporary name, then rename into place: the socket appears
        only once it accepts, so a client that sees it never gets "connection refused"."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a previous run (the state dir is ours)
        staging = self.path.with_name(f".c{os.getpid()}")  # no longer than the real name
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        old = os.umask(0o177)
        try:
            listener = await anyio.create_unix_listener(staging)
        finally:
            os.umask(old)
        try:
            if self.group is not None:
                os.chown(staging, -1, self.group)
                os.chmod(staging, 0o660)
            else:
                os.chmod(staging, 0o600)
            os.rename(staging, self.path)
        except OSError:
            await listener.aclose()
            with contextlib.suppress(OSError):
                staging.unlink()
            raise
        return listener

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            pid, uid, gid = peer_credentials(raw)
            groups = peer_groups(pid) if self.group is not None else set()
            operator = Operator(uid=uid, pid=pid, command=REDACTOR.scrub(peer_command(pid)))
            if not allowed(uid, gid, groups, self.uid, self.group):
                await stream.send(
                    wire.encode(
                        Reply(ok=False, code="denied", message=f"uid {uid} may not control this tree")
                    )
                )
                return
            decoder = wire.FrameDecoder(MAX_CONTROL_FRAME, decoder=control_decoder)
            try:
                while True:
                    data = await stream.receive()
                    for msg in decoder.feed(data):
                        if not isinstance(msg, Request):
                            raise wire.FrameError("malformed", "expected a request")
                        token = OPERATOR.set(operator)  # what the request causes names who asked
                        try:
                            await self._handle(msg, stream)
                        finally:
                            OPERATOR.reset(token)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            except wire.FrameError as exc:
                with contextlib.suppress(Exception):
                    await stream.send(
                        wire.encode(Reply(ok=False, code="error", message=f"bad request: {exc}"))
                    )

    async def _handle(self, req: Request, stream: anyio.abc.SocketStream) -> None:
        try:
            verb = command(req)
        except msgspec.ValidationError as exc:
            problem = (
                f"unknown operation {req.op!r} (known: {', '.join(OPS)})" if req.op not in OPS else str(exc)
            )
            await stream.send(wire.encode(Reply(ok=False, code="refused", message=problem)))
            return
        if isinstance(verb, Events):
            await self._events(verb, stream)
            return
        try:
            reply = await self._handlers[type(verb)](verb)
        except ChildNotFound as exc:
            reply = Reply(ok=False, code=exc.reply_code, message=f"no such child: {exc}")
        except (Refused, StartError) as exc:
            reply = Reply(ok=False, code=exc.reply_code, message=str(exc))
        await stream.send(wire.encode(reply))

    # -- one handler per verb --------------------------------------------------------------------

    @property
    def _handlers(self) -> dict[type[Any], Callable[[Any], Awaitable[Reply]]]:
        return {
            Status: self._status,
            Stop: self._stop,
            Reload: self._reload,
            StartChild: self._start_child,
            Restart: self._restart,
            Terminate: self._terminate,
            Start: self._start,
            Dump: self._dump,
        }

    async def _status(self, verb: Status) -> Reply:
        return Reply(ok=True, data=status(self.tree, verb.path))

    async def _stop(self, _: Stop) -> Reply:
        self.on_stop()
        return Reply(ok=True, message=f"{self.tree.root.path}: stopping in reverse start order")

    async def _reload(self, verb: Reload) -> Reply:
        if self.tree_file is None:
            raise Refused("this tree was not started from a file: nothing to reload")
        changes = await reload_tree(self.tree, self.tree_file, dry_run=verb.dry_run)
        message = "\n".join(changes) or "no changes"
        if verb.dry_run:
            message = f"dry run, nothing changed:\n{message}"
        return Reply(ok=True, message=message, data={"changes": changes, "dry_run": verb.dry_run})

    async def _start_child(self, verb: StartChild) -> Reply:
        memory = (verb.memory_warn_mb, verb.memory_limit_mb)
        child = await self.tree.supervisor(verb.path).start_child(verb.args, memory=memory)
        return Reply(ok=True, message=f"started {child}", data={"path": child})

    async def _restart(self, verb: Restart) -> Reply:
        sup, child_id = self._parent(verb.path)
        await sup.operator_restart(child_id)
        return Reply(ok=True, message=f"restarted {verb.path}")

    async def _terminate(self, verb: Terminate) -> Reply:
        sup, child_id = self._parent(verb.path)
        await sup.terminate_child(child_id)
        if child_id in sup.slots:
            return Reply(ok=True, message=f"terminated {verb.path}; it stays down until `start`")
        why = "a dynamic child" if sup.spec.strategy.value == "simple_one_for_one" else "a temporary child"
        return Reply(ok=True, message=f"terminated {verb.path}; it is removed ({why} does not stay stopped)")

    async def _start(self, verb: Start) -> Reply:
        sup, child_id = self._parent(verb.path)
        await sup.restart_child(child_id)
        return Reply(ok=True, message=f"started {verb.path}")

    async def _dump(self, verb: Dump) -> Reply:
        sup, child_id = self._parent(verb.path)
        inst = sup.slots[child_id].instance
        if not isinstance(inst, ChildProcess):
            raise Refused(f"{verb.path} is not a running process")
        dump = await self.tree.host.dumper.take(inst, "operator")
        if dump is None:
            raise Refused(f"{verb.path}: the dump could not be written")
        text = dump.file.read_text()
        data = {"file": str(dump.file), "text": text, "route": dump.route, "complete": dump.complete}
        return Reply(ok=True, message=str(dump.file), data=data)

    def _parent(self, path: str) -> tuple[Supervisor, str]:
        parent, _, child_id = path.rpartition("/")
        sup = self.tree.supervisor(parent) if parent else None
        if sup is None or child_id not in sup.slots:
            raise ChildNotFound(path)
        return sup, child_id

    async def _events(self, verb: Events, stream: anyio.abc.SocketStream) -> None:
        problem = _bad_filter(self.tree, verb)
        if problem is not None:
            await stream.send(wire.encode(Reply(ok=False, code="refused", message=problem)))
            return
        sub = self.tree.bus.subscribe(maxlen=10_000)
        kinds = set(verb.kinds)
        prefix = verb.path
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


def _bad_filter(tree: Tree, verb: Events) -> str | None:
    """Why an events filter can never match, or None: a kind that does not exist, a path
    outside the tree."""
    known = {k.value for k in Kind}
    unknown = [k for k in verb.kinds if k not in known]
    if unknown:
        return f"unknown event kind {unknown[0]!r} (known: {', '.join(sorted(known))})"
    root = tree.root.path
    if verb.path and verb.path != root and not verb.path.startswith(root + "/"):
        return f"{verb.path!r} is not in this tree (its root is {root!r})"
    return None


def _under(event: Event, prefix: str) -> bool:
    return not prefix or event.path == prefix or event.path.startswith(prefix + "/")
