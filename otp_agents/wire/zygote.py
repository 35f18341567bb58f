"""The fork protocol between the supervisor and a zygote (a ``SOCK_SEQPACKET`` Unix socket the
zygote publishes as service ``zygote.<image>``): one :class:`ForkRequest` per datagram, with the
worker's end of its channel as SCM_RIGHTS, answered by one :class:`ForkReply`."""

from __future__ import annotations

import msgspec

MAX_REQUEST = 256 * 1024  # environment + arguments of one worker
REQUEST_TIMEOUT = 2.0  # the supervisor gives up on a fork (and starts the worker cold) after this


class ForkRequest(msgspec.Struct, frozen=True):
    path: str  # the child's path in the tree
    target: str  # "package.module:function"
    args: list[str]
    env: dict[str, str]
    cwd: str | None


class ForkReply(msgspec.Struct, frozen=True):
    pid: int = 0
    error: str = ""
