"""Agents: the logic between what the user said and what the agent says.

An :class:`Agent` streams its reply as text chunks; the pipeline speaks each sentence as soon as
it is complete. Agents form a state machine: during a reply an agent may call
:meth:`Session.handoff` to pass the conversation to another agent, with a :class:`ContextPolicy`
saying how much of the history the next agent receives. ``userdata`` is shared by every agent of
the session and survives hand-offs (and, checkpointed with the rest of :class:`Conversation`,
a crash of the process).

The offline default is a rule-based receptionist that remembers a few facts and hands off to a
support agent; any LLM-backed agent plugs in through the same two methods.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Literal, Protocol

import msgspec


class ChatMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    role: Literal["user", "assistant", "system"]
    text: str
    agent: str = ""
    interrupted: bool = False


class ContextPolicy(msgspec.Struct, frozen=True):
    """What history the next agent gets on a hand-off: all of it, none, or the last ``n``
    messages. The hand-off itself is always noted as a system message."""

    keep: Literal["all", "none", "last"] = "all"
    n: int = 6

    def apply(self, history: list[ChatMessage]) -> list[ChatMessage]:
        if self.keep == "none":
            return []
        if self.keep == "last":
            return history[-self.n :] if self.n > 0 else []
        return list(history)


class Conversation(msgspec.Struct):
    """Everything a conversation needs to go on after a crash: this is what is checkpointed."""

    agent: str
    history: list[ChatMessage] = []
    userdata: dict[str, str] = {}
    turns: int = 0


class Session:
    """What an agent sees during a reply."""

    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation
        self.pending: tuple[str, ContextPolicy] | None = None

    @property
    def userdata(self) -> dict[str, str]:
        return self.conversation.userdata

    @property
    def history(self) -> list[ChatMessage]:
        return self.conversation.history

    def handoff(self, to: str, policy: ContextPolicy | None = None) -> None:
        """Pass the conversation to agent ``to`` once this reply has been spoken."""
        self.pending = (to, policy or ContextPolicy())


class Agent(Protocol):
    name: str

    def reply(self, text: str, session: Session) -> AsyncIterator[str]:
        """Stream the reply to the user's ``text`` as text chunks."""
        ...

    def greeting(self, session: Session) -> str | None:
        """What to say when a hand-off brings the conversation here (None: nothing)."""
        ...


def switch_agent(conversation: Conversation, to: str, policy: ContextPolicy) -> None:
    before = conversation.agent
    conversation.history = policy.apply(conversation.history)
    conversation.history.append(ChatMessage("system", f"handed off from {before} to {to}", agent=to))
    conversation.agent = to


# -- the rule-based default --------------------------------------------------------------------

Handler = Callable[[re.Match[str], Session], str]


class RuleAgent:
    """Regular expressions over the transcript; the first match answers. Each sentence of the
    answer is streamed separately."""

    def __init__(
        self,
        name: str,
        rules: list[tuple[str, Handler]],
        fallback: Callable[[str, Session], str],
        greeting: Callable[[Session], str | None] | None = None,
    ) -> None:
        self.name = name
        self._rules = [(re.compile(p, re.IGNORECASE), h) for p, h in rules]
        self._fallback = fallback
        self._greeting = greeting

    async def reply(self, text: str, session: Session) -> AsyncIterator[str]:
        answer = next(
            (h(m, session) for rx, h in self._rules if (m := rx.search(text)) is not None),
            None,
        )
        if answer is None:
            answer = self._fallback(text, session)
        for sentence in re.split(r"(?<=[.!?])\s+", answer.strip()):
            if sentence:
                yield sentence + " "

    def greeting(self, session: Session) -> str | None:
        return self._greeting(session) if self._greeting else None


STORY = (
    "Once upon a time there was a small robot who lived in a lighthouse. "
    "Every night it counted the ships that passed by the rocks. "
    "One night a storm came and the light went out. "
    "The robot climbed the long stairs in the dark and fixed the lamp. "
    "The ships came home safely and the robot counted every one of them. "
    "In the morning the fishermen brought it a new coat of paint. "
    "And it kept the light burning for many years after that."
)


def _remember(key: str, template: str) -> Handler:
    def handler(m: re.Match[str], s: Session) -> str:
        s.userdata[key] = m.group(1).lower()
        return template.format(m.group(1).lower())

    return handler


def _recall(key: str, known: str, unknown: str) -> Handler:
    def handler(m: re.Match[str], s: Session) -> str:
        value = s.userdata.get(key)
        return known.format(value) if value else unknown

    return handler


def _to(agent: str, line: str, policy: ContextPolicy) -> Handler:
    def handler(m: re.Match[str], s: Session) -> str:
        s.handoff(agent, policy)
        return line

    return handler


def memory_rules() -> list[tuple[str, Handler]]:
    return [
        (r"\bmy name is (\w+)", _remember("name", "Nice to meet you, {}.")),
        (r"\bwhat is my name\b", _recall("name", "Your name is {}.", "You have not told me your name.")),
        (r"\bfavorite colou?r is (\w+)", _remember("color", "Got it. Your favorite color is {}.")),
        (
            r"\bwhat is my favorite colou?r\b",
            _recall("color", "Your favorite color is {}.", "You have not told me your favorite color yet."),
        ),
        (r"\bremember(?:ed)? the number (\w+)", _remember("number", "I will remember the number {}.")),
        (
            r"\bwhat number\b",
            _recall("number", "You told me the number {}.", "You have not told me a number yet."),
        ),
        (r"\bstory\b", lambda m, s: STORY),
        (r"\bstop\b", lambda m, s: "Okay, I stopped."),
        (r"\bwhat time\b", lambda m, s: time.strftime("It is %H:%M.")),
        (r"\bweather\b", lambda m, s: "I cannot see outside, but I hope it is sunny."),
        (r"\b(goodbye|bye)\b", lambda m, s: "Goodbye, and thank you for calling."),
    ]


def echo(text: str, s: Session) -> str:
    return f"I heard {text}." if text else "Sorry, I did not catch that."


def _support_greeting(s: Session) -> str:
    name = s.userdata.get("name")
    color = s.userdata.get("color")
    hello = f"This is support. Hello {name}." if name else "This is support."
    return f"{hello} I see your favorite color is {color}." if color else hello


def default_agents() -> dict[str, RuleAgent]:
    """A receptionist that remembers things and hands off to support, and back."""
    keep_recent = ContextPolicy("last", 4)
    receptionist = RuleAgent(
        "receptionist",
        [
            (r"\b(support|transfer)\b", _to("support", "Transferring you to support.", keep_recent)),
            *memory_rules(),
        ],
        echo,
    )
    support = RuleAgent(
        "support",
        [
            (r"\b(reception|receptionist|back)\b", _to("receptionist", "Sending you back.", keep_recent)),
            *memory_rules(),
        ],
        lambda text, s: f"Support heard {text}." if text else "Sorry, I did not catch that.",
        greeting=_support_greeting,
    )
    return {a.name: a for a in (receptionist, support)}


def check_agents(agents: Mapping[str, Agent], start: str) -> None:
    if start not in agents:
        raise ValueError(f"no agent named {start!r} (have: {', '.join(sorted(agents))})")
