"""sd_notify for systemd ``Type=notify`` services (and anything else that sets NOTIFY_SOCKET).

READY=1 once the whole tree has started, STATUS= lines as it runs, STOPPING=1 when the orderly
shutdown begins, and WATCHDOG=1 every half ``WATCHDOG_USEC`` while the supervisor's loop runs (so
a stuck supervisor is restarted by systemd). Without NOTIFY_SOCKET every call does nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket

import anyio


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        watchdog = env.get("WATCHDOG_USEC", "")
        owner = env.get("WATCHDOG_PID", "")
        mine = not owner or owner == str(os.getpid())
        self.watchdog_interval = int(watchdog) / 2e6 if watchdog.isdigit() and mine else None
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):  # the manager may be gone: never our problem
            self._sock.sendto("\n".join(fields).encode(), self._address)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    async def watchdog(self) -> None:
        if self.watchdog_interval is None or self._sock is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await anyio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
