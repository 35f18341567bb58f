"""Who is at the other end of a Unix socket, from the kernel: the control socket, the zygote and
the shared inference server accept only their own user (or an operators' group)."""

from __future__ import annotations

import socket
import struct


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


def peer_command(pid: int, limit: int = 512) -> str:
    """The peer's command line, spaces between its arguments (empty if it is already gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(limit)
    except OSError:
        return ""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


def allowed(uid: int, gid: int, groups: set[int], own_uid: int, group: int | None) -> bool:
    """Same uid as the supervisor, root, or (when configured) a member of the allowed group."""
    if uid in (own_uid, 0):
        return True
    return group is not None and (gid == group or group in groups)
