"""A protocol worker written against the wire contract alone (protocols/PROTOCOL.md), with
blocking sockets and no otp_agents import: proof that the contract is enough, and a worker
whose pong delay is exact (for heartbeat tests).

In a tree: ``script = "workers/raw_worker.py"`` with ``args = ["--pong-delay", "0.2"]``.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time

import msgspec


def main() -> None:
    delay = float(sys.argv[sys.argv.index("--pong-delay") + 1]) if "--pong-delay" in sys.argv else 0.0
    sock = socket.socket(fileno=int(os.environ["OTP_AGENTS_FD"]))
    sock.set_inheritable(False)

    def send(msg: dict[str, object]) -> None:
        body = msgspec.msgpack.encode(msg)
        sock.sendall(struct.pack(">I", len(body)) + body)

    buf = b""

    def receive() -> dict[str, object]:
        nonlocal buf
        while True:
            if len(buf) >= 4:
                (size,) = struct.unpack(">I", buf[:4])
                if len(buf) >= 4 + size:
                    body, buf = buf[4 : 4 + size], buf[4 + size :]
                    msg = msgspec.msgpack.decode(body)
                    assert isinstance(msg, dict)
                    return msg
            chunk = sock.recv(65536)
            if not chunk:
                sys.exit(0)
            buf += chunk

    send({"type": "hello", "versions": [1], "pid": os.getpid()})
    if receive().get("type") != "welcome":
        sys.exit(70)
    send({"type": "ready"})
    while True:
        msg = receive()
        kind = msg.get("type")
        if kind == "ping":
            time.sleep(delay)
            send({"type": "pong", "seq": msg["seq"], "sent_ns": msg["sent_ns"]})
        elif kind in ("shutdown", "drain"):
            send({"type": "bye"})
            sys.exit(0)


if __name__ == "__main__":
    main()
