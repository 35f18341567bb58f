"""Checks made by ``otp-agents run`` after the tree file is loaded and before anything starts."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

from otp_agents.errors import PreflightError
from otp_agents.livekit_env import LIVEKIT_VARS, LiveKitEnv, RoomConfigError
from otp_agents.spec.model import SupervisorSpec, walk

UNIX_PATH_MAX = 107  # sun_path is 108 bytes on Linux, with its terminating NUL


def required_env(spec: SupervisorSpec) -> list[tuple[str, str]]:
    """(key path, variable) for every ``require_env`` entry in the tree."""
    out: list[tuple[str, str]] = []
    for path, node in walk(spec):
        if isinstance(node, SupervisorSpec):
            out.extend((f"{path}.require_env", name) for name in node.require_env)
    return out


def check_env(spec: SupervisorSpec, source: str, environ: Mapping[str, str] = os.environ) -> None:
    """Every variable the tree requires is set and not empty; the LIVEKIT_* ones make sense."""
    wanted = required_env(spec)
    for where, name in wanted:
        if not environ.get(name, "").strip():
            raise PreflightError(f"{source}: {where}: {name} is not set (or empty)")
    if any(name in LIVEKIT_VARS for _, name in wanted):
        try:
            LiveKitEnv.from_environ(environ)
        except RoomConfigError as exc:
            raise PreflightError(f"{source}: {exc}") from None


def bind_listener(host: str, port: int, option: str = "--metrics") -> socket.socket:
    """A listening TCP socket on host:port, made before any child starts, so a busy port or a
    host that does not resolve is refused with one line instead of after the tree is up."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PreflightError(f"{option} {host}:{port}: cannot resolve {host!r} ({exc.strerror})") from None
    errors: list[str] = []
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT: busy is busy
            sock.bind(address)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            errors.append(exc.strerror or str(exc))
            continue
        sock.setblocking(False)
        return sock
    why = errors[0] if errors else "no address"
    raise PreflightError(f"{option} {host}:{port}: cannot listen there ({why})", code=3)


def check_control_path(path: Path) -> None:
    """A Unix socket path has a hard length limit; a state dir too deep for it would leave the
    tree running with no control socket."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise PreflightError(
            f"--state-dir: the control socket path {str(path)!r} is longer than a Unix socket "
            f"allows ({UNIX_PATH_MAX} bytes); use a shorter state dir"
        )


def open_events_file(path: str) -> None:
    """The events file can be appended to (made if missing), before anything starts."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    except OSError as exc:
        raise PreflightError(
            f"--events {path}: cannot append to it ({exc.strerror or exc})", code=3
        ) from None
    os.close(fd)
