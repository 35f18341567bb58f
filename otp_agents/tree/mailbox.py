"""A supervisor's mailbox: the messages it handles one at a time, as OTP's gen_server does.

``ChildDown`` (a child ended without being asked), ``TryAgain`` (retry of a failed restart),
``StartLater`` (a backoff delay elapsed), ``Call`` (an API request) and ``Stop``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from otp_agents.events import OPERATOR, Operator
from otp_agents.tree.node import Node
from otp_agents.tree.ports import ChildHandle

MAILBOX_LIMIT = 100_000


@dataclass(frozen=True)
class ChildDown:
    slot_id: str
    instance: ChildHandle | Node  # the instance that ended (a stale one is ignored)


@dataclass(frozen=True)
class TryAgain:
    slot_id: str


@dataclass(frozen=True)
class StartLater:
    child: str
    ids: tuple[str, ...]


@dataclass(frozen=True)
class Stop:
    operator: Operator | None = field(default_factory=OPERATOR.get)  # who asked, if an operator


@dataclass
class Call:
    fn: Callable[[], Awaitable[Any]]
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Any = None
    error: BaseException | None = None
    operator: Operator | None = field(default_factory=OPERATOR.get)  # carried into the supervisor


Msg = ChildDown | TryAgain | StartLater | Stop | Call


class Mailbox:
    def __init__(self) -> None:
        self._items: deque[Msg] = deque()
        self._wake = anyio.Event()

    def put(self, msg: Msg) -> None:
        if len(self._items) >= MAILBOX_LIMIT:
            raise RuntimeError("supervisor mailbox full")
        self._items.append(msg)
        self._wake.set()

    async def get(self) -> Msg:
        while not self._items:
            await self._wake.wait()
            self._wake = anyio.Event()
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)
