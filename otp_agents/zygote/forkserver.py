"""The zygote: a preloaded Python process that forks protocol workers on demand.

A cold worker pays for a fresh interpreter and its imports on every start and every restart
(``import livekit.rtc`` alone is 150 to 260 ms here). A zygote imports a worker "image" once —
the modules its workers need — freezes the heap (``gc.freeze()``, so the children's collections
do not dirty the shared pages) and then, per request, forks a worker that is ready to run.

A zygote is a child in the tree (``image = "name"``, ``preload = [...]``), supervised like any
protocol worker: it answers heartbeats and dump requests, so a stuck zygote is dumped and
replaced; while it is down, workers with ``zygote = "name"`` start cold, with a
``zygote_fallback`` event saying why.

How a fork goes (the zygote runs no event loop and no thread, so there is no lock or thread to
inherit):

1. The supervisor sends a :class:`ForkRequest` over a ``SOCK_SEQPACKET`` Unix socket the zygote
   published (service ``zygote.<image>``), with the worker's end of its channel as SCM_RIGHTS.
2. The zygote forks an intermediate process, which forks the worker, puts it in its own process
   group and exits. The worker is adopted by the supervisor (a child subreaper), so the
   supervisor reaps it and reads its exit status exactly as for a spawned child.
3. The worker waits until it is adopted, arms PR_SET_PDEATHSIG, closes the zygote's sockets,
   takes its own environment, working directory and arguments, reseeds its random state, drops
   the zygote's log handlers and dump file, and runs its ``main`` as a normal protocol worker.
4. The zygote answers with the worker's pid (:class:`ForkReply`).
"""

from __future__ import annotations

import array
import contextlib
import functools
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

from otp_agents import linux
from otp_agents.wire.env import (
    EXIT_NOT_ADOPTED,
)
from otp_agents.wire.framing import FrameDecoder, encode
from otp_agents.wire.messages import (
    MAX_DUMP_TEXT,
    Drain,
    Dump,
    DumpRequest,
    Ping,
    Pong,
    Shutdown,
)
from otp_agents.wire.zygote import MAX_REQUEST, ForkReply, ForkRequest
from otp_agents.worker import stacks
from otp_agents.zygote.child import drop_zygote_state, exit_after, run_worker, warm_up

ADOPTION_WAIT = 2.0  # how long a new worker waits to be adopted by the supervisor
REFILL_DELAY = 0.05  # after handing a spare over, wait this long before forking its replacement
_decode_request = msgspec.msgpack.Decoder(ForkRequest).decode
_encode = msgspec.msgpack.Encoder().encode


class Spare:
    """A worker forked ahead of need, already adopted, waiting on ``sock`` for its request."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock


class Zygote:
    def __init__(self, channel: socket.socket, image: str, supervisor: int, idle: int) -> None:
        self.channel = channel
        self.image = image
        self.supervisor = supervisor
        self.idle = idle
        self.decoder = FrameDecoder()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.address = f"@otp-agents/zygote/{image}/{os.getpid()}"
        self.listener.bind("\0" + self.address[1:])
        self.listener.listen(16)
        self.conns: list[socket.socket] = []
        self.spares: list[Spare] = []
        self.last_handover = 0.0

    def send(self, msg: msgspec.Struct) -> None:
        self.channel.sendall(encode(msg))

    def receive(self) -> list[Any]:
        data = self.channel.recv(65536)
        if not data:
            raise EOFError
        return self.decoder.feed(data)

    def serve(self) -> int:
        while True:
            wait: float | None = None
            if self.spares and len(self.spares) < self.idle:
                self.refill(1)  # a burst is being served: keep the pool going, one at a time
            elif len(self.spares) < self.idle:
                # Not right after a hand-over: the new worker is starting now, and on a small
                # machine a fork here would take the CPU it needs (measured: +2 to 4 ms).
                wait = self.last_handover + REFILL_DELAY - time.monotonic()
                if wait <= 0:
                    self.refill()
                    wait = None
            spares = {s.sock: s for s in self.spares}
            readable, _, _ = select.select([self.channel, self.listener, *self.conns, *spares], [], [], wait)
            for sock in readable:
                if sock is self.channel:
                    for msg in self.receive():
                        if isinstance(msg, Ping):
                            self.send(Pong(seq=msg.seq, sent_ns=msg.sent_ns))
                        elif isinstance(msg, DumpRequest):
                            self.send(Dump(id=msg.id, text=stacks.render()[:MAX_DUMP_TEXT]))
                        elif isinstance(msg, Shutdown | Drain):
                            return 0
                elif sock is self.listener:
                    conn, _ = self.listener.accept()
                    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                    if struct.unpack("3i", creds)[1] != os.getuid():
                        conn.close()  # only our own uid may ask for forks
                    else:
                        self.conns.append(conn)
                elif sock in spares:  # a spare only speaks when it dies: evict it at once
                    if spares[sock] in self.spares:
                        self.spares.remove(spares[sock])
                    sock.close()
                    self.last_handover = time.monotonic()  # and replace it after a pause, not in a loop
                else:
                    self.answer(sock)

    def answer(self, conn: socket.socket) -> None:
        fds = array.array("i")
        try:
            data, ancdata, _flags, _addr = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(4 * fds.itemsize))
        except OSError:
            data, ancdata = b"", []
        for level, kind, blob in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(blob[: len(blob) - (len(blob) % fds.itemsize)])
        if not data:
            for fd in fds:
                os.close(fd)
            self.conns.remove(conn)
            conn.close()
            return
        try:
            if len(fds) not in (1, 3):
                raise ValueError(f"expected the channel fd and maybe stdout and stderr, got {len(fds)} fds")
            request = _decode_request(data)
            pid = self.fork(request, tuple(fds))
            reply = ForkReply(pid=pid)
        except Exception as exc:  # every failure is an answer, never a crash
            reply = ForkReply(error=f"{type(exc).__name__}: {exc}")
        finally:
            for fd in fds:
                os.close(fd)
        with contextlib.suppress(OSError):
            conn.send(_encode(reply))

    # -- forking -------------------------------------------------------------------------------

    def fork(self, request: ForkRequest, fds: tuple[int, ...]) -> int:
        """A worker for ``request``: a spare if one is waiting, else a fresh fork."""
        if threading.active_count() != 1:
            raise RuntimeError(f"the zygote has {threading.active_count()} threads; it forks only with one")
        while self.spares:
            spare = self.spares.pop(0)
            if self._hand_over(spare, request, fds):
                self.last_handover = time.monotonic()
                return spare.pid
        return self._double_fork(lambda: self._become(request, fds), own_group=True)

    def refill(self, at_most: int = 64) -> None:
        for _ in range(min(at_most, self.idle - len(self.spares))):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                pid = self._double_fork(functools.partial(self._wait_as_spare, theirs, mine), own_group=False)
            except (OSError, RuntimeError):
                mine.close()
                return
            finally:
                theirs.close()
            self.spares.append(Spare(pid, mine))

    def _hand_over(self, spare: Spare, request: ForkRequest, fds: tuple[int, ...]) -> bool:
        """Give the request to a spare. No answer is awaited: a dead spare fails the send (it is
        also evicted as soon as it dies), and its process group is set by the spare itself and
        by the supervisor, its parent, whichever comes first."""
        try:
            passed = array.array("i", fds)
            spare.sock.sendmsg([_encode(request)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, passed)])
            return True
        except OSError:
            return False
        finally:
            spare.sock.close()

    def _double_fork(self, child: Callable[[], None], own_group: bool) -> int:
        """Fork through an intermediate that exits at once, so the new process is adopted by the
        supervisor (a child subreaper) rather than staying the zygote's child. Returns its pid."""
        rd, wr = os.pipe()
        try:
            middle = os.fork()
        except OSError:
            os.close(rd)
            os.close(wr)
            raise
        if middle == 0:
            code = 1
            try:
                os.close(rd)
                pid = os.fork()
                if pid == 0:
                    os.close(wr)
                    exit_after(child)
                if own_group:
                    with contextlib.suppress(OSError):
                        os.setpgid(pid, pid)
                os.write(wr, struct.pack("i", pid))
                code = 0
            finally:
                os._exit(code)
        os.close(wr)
        try:
            raw = b""
            while len(raw) < 4:
                chunk = os.read(rd, 4 - len(raw))
                if not chunk:
                    break
                raw += chunk
        finally:
            os.close(rd)
            os.waitpid(middle, 0)
        if len(raw) != 4:
            raise RuntimeError("the intermediate process died before it forked the worker")
        return int(struct.unpack("i", raw)[0])

    # -- in the new process ----------------------------------------------------------------------

    def _adopted(self) -> None:
        """Wait until the supervisor has adopted us, then die with it; close what is the zygote's."""
        deadline = time.monotonic() + ADOPTION_WAIT
        while os.getppid() != self.supervisor and time.monotonic() < deadline:
            time.sleep(0.0002)
        linux.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != self.supervisor:  # not adopted (or the supervisor is gone)
            os._exit(EXIT_NOT_ADOPTED)
        for sock in (self.channel, self.listener, *self.conns, *(s.sock for s in self.spares)):
            sock.close()

    def _become(self, request: ForkRequest, fds: tuple[int, ...]) -> None:
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        self._adopted()
        raise SystemExit(run_worker(request, fds))  # this process never returns to close it

    def _wait_as_spare(self, sock: socket.socket, zygote_end: socket.socket) -> None:
        zygote_end.close()
        self._adopted()
        drop_zygote_state()  # now rather than when it is needed
        # The first event loop in a forked process copies the pages it writes (reference counts
        # of shared objects): 2.3 ms against 0.6 ms in the zygote. Pay that now, while idle.
        warm_up()
        fds = array.array("i")
        data, ancdata, _flags, _addr = sock.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(3 * fds.itemsize))
        if not data:  # the zygote is gone or stopping: so are we
            raise SystemExit(0)
        for level, kind, blob in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(blob[: len(blob) - (len(blob) % fds.itemsize)])
        request = _decode_request(data)
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        sock.close()
        raise SystemExit(run_worker(request, tuple(fds)))
