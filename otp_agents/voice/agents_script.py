"""A scripted LLM for LiveKit Agents apps: **a test double for CI and development, not a
language model.** It lets an unmodified app hold a whole conversation offline, its function tools
and hand-offs really running, so the app's own logic is exercised end to end.

The script (TOML, kept next to the caller's script) is a list of rules. For each LLM call the
first rule that fits is used:

```toml
[[rule]]
when = ["reservation"]                 # words all found in the caller's last message
call = [{ tool = "to_reservation" }]   # function tools to call (only those the agent offers)
say = "Let me get you to our reservations desk."

[[rule]]
agent = ["reservation agent"]          # words all found in the active agent's instructions
when = ["name"]
call = [{ tool = "update_name", args = { name = "{user:name is (\\w+)}" } }]
say = "Thank you, {user:name is (\\w+)}."

[[rule]]
when = []                              # anything (a fallback)
say = "Sorry, could you say that again?"
```

Rules are keyed on the caller's words, never on the order of calls: apps make speculative and
retried LLM calls, and a reply must not depend on how many there were. Anything that depends on
earlier turns is read from the chat context the app hands the LLM, never kept here:

* ``{user:REGEX}`` is the first group of REGEX in the caller's messages, most recent first;
* ``{heard}`` is the caller's last message; ``{result}`` what the tools called for it returned.

A rule with ``call`` answers in two steps, as a real model does: first the tool calls, then (when
the app hands back their results) its ``say``. A call made with ``tool_choice="none"``, or a chat
whose last message is not the caller's (an agent's ``on_enter`` greeting), gets the ``say`` of the
first rule whose ``when`` is ``["*enter*"]`` and whose ``agent`` fits, else ``greeting``.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from livekit.agents import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, APIConnectOptions, NotGivenOr, llm, utils

from otp_agents.errors import OtpAgentsError

Events = Literal["metrics_collected", "error"]
ENTER = "*enter*"  # the `when` of a rule for an agent's own turn (no caller message to answer)
_TEMPLATE = re.compile(r"\{(user:[^{}]+|heard|result)\}")


class ScriptError(OtpAgentsError, ValueError):
    """An LLM script that cannot be used; the message names the file and the rule."""


@dataclass(frozen=True)
class Call:
    tool: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rule:
    when: tuple[str, ...]
    agent: tuple[str, ...] = ()
    call: tuple[Call, ...] = ()
    say: str = ""

    def fits(self, heard: str | None, instructions: str) -> bool:
        text = instructions.lower()
        if any(word.lower() not in text for word in self.agent):
            return False
        if heard is None:
            return self.when == (ENTER,)
        words = heard.lower()
        return self.when != (ENTER,) and all(word.lower() in words for word in self.when)


@dataclass(frozen=True)
class Script:
    rules: tuple[Rule, ...]
    greeting: str = "Hello! How can I help you?"

    @classmethod
    def load(cls, path: str | Path) -> Script:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ScriptError(f"{path}: {exc}") from None
        rules = []
        for i, raw in enumerate(data.get("rule", [])):
            where = f"{path}: rule[{i}]"
            if not isinstance(raw, dict) or not isinstance(raw.get("when", []), list):
                raise ScriptError(f"{where}: expected a table with a list `when`")
            calls = []
            for j, c in enumerate(raw.get("call", [])):
                if not isinstance(c, dict) or not isinstance(c.get("tool"), str):
                    raise ScriptError(f"{where}.call[{j}]: expected {{ tool = NAME, args = {{...}} }}")
                calls.append(Call(c["tool"], dict(c.get("args", {}))))
            for template in [raw.get("say", ""), *(json.dumps(c.args) for c in calls)]:
                for ref in _TEMPLATE.findall(template):
                    if ref.startswith("user:"):
                        try:
                            re.compile(ref[5:])
                        except re.error as exc:
                            raise ScriptError(f"{where}: bad pattern in {{{ref}}}: {exc}") from None
            rules.append(
                Rule(
                    when=tuple(str(w) for w in raw.get("when", [])),
                    agent=tuple(str(w) for w in raw.get("agent", [])),
                    call=tuple(calls),
                    say=str(raw.get("say", "")),
                )
            )
        return cls(tuple(rules), str(data.get("greeting", cls.greeting)))


class ScriptedLLM(llm.LLM[Events]):
    """An LLM plugin that follows a :class:`Script` (see the module's docstring)."""

    def __init__(self, script: Script | str | Path) -> None:
        super().__init__()
        self.script = script if isinstance(script, Script) else Script.load(script)

    @property
    def provider(self) -> str:
        return "otp-agents"

    @property
    def model(self) -> str:
        return "scripted"

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> llm.LLMStream:
        return _ScriptedStream(
            self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options, tool_choice=tool_choice
        )


class _ScriptedStream(llm.LLMStream):
    def __init__(
        self,
        owner: ScriptedLLM,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool],
        conn_options: APIConnectOptions,
        tool_choice: NotGivenOr[llm.ToolChoice],
    ) -> None:
        super().__init__(owner, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options)
        self._script = owner.script
        self._tool_choice = tool_choice

    async def _run(self) -> None:
        turn = Turn.read(self._chat_ctx)
        offered = {_tool_name(t) for t in self._tools}
        # Three kinds of call: the tools' results are back (say what the caller's rule says);
        # the agent speaks first (its enter rule); the caller said something (its rule).
        own_turn = not turn.follow_up and (self._tool_choice == "none" or turn.answered_by_agent)
        heard = None if own_turn else turn.heard
        rule = next((r for r in self._script.rules if r.fits(heard, turn.instructions)), None)
        request_id = utils.shortuuid("script_")
        if rule is not None and rule.call and heard is not None and not turn.follow_up:
            calls = [
                llm.FunctionToolCall(
                    name=c.tool,
                    arguments=json.dumps({k: turn.fill(v) for k, v in c.args.items()}),
                    call_id=utils.shortuuid("call_"),
                )
                for c in rule.call
                if c.tool in offered
            ]
            if calls:
                delta = llm.ChoiceDelta(role="assistant", tool_calls=calls)
                self._event_ch.send_nowait(llm.ChatChunk(id=request_id, delta=delta))
                return
        text = turn.fill(rule.say) if rule is not None and rule.say else self._script.greeting
        delta = llm.ChoiceDelta(role="assistant", content=text)
        self._event_ch.send_nowait(llm.ChatChunk(id=request_id, delta=delta))


@dataclass(frozen=True)
class Turn:
    """What the chat context says about the turn being answered."""

    heard: str | None  # the caller's last message
    said_before: tuple[str, ...]  # all the caller's messages, most recent first
    instructions: str  # the active agent's instructions (and system messages)
    results: tuple[str, ...]  # outputs of the tools called since the caller's last message
    answered_by_agent: bool  # the chat ends with the agent's words, not the caller's
    follow_up: bool  # the chat ends with tool results: the reply that follows them is asked for

    @classmethod
    def read(cls, chat_ctx: llm.ChatContext) -> Turn:
        heard: str | None = None
        said: list[str] = []
        results: list[str] = []
        instructions: list[str] = []
        last_role: str | None = None
        for item in chat_ctx.items:
            if item.type == "message":
                text = item.text_content or ""
                if item.role in ("system", "developer"):
                    instructions.append(text)
                    continue
                last_role = item.role
                if item.role == "user" and text.strip():
                    heard = text
                    said.append(text)
                    results = []
            elif item.type == "function_call_output":
                results.append(str(item.output))
                last_role = "tool"
        by_agent, follow_up = last_role == "assistant", last_role == "tool"
        return cls(heard, tuple(reversed(said)), "\n".join(instructions), tuple(results), by_agent, follow_up)

    def fill(self, template: Any) -> Any:
        if not isinstance(template, str):
            return template

        def value(m: re.Match[str]) -> str:
            ref = m.group(1)
            if ref == "heard":
                return self.heard or ""
            if ref == "result":
                return " ".join(self.results)
            pattern = re.compile(ref[5:], re.IGNORECASE)
            for text in self.said_before:
                found = pattern.search(text)
                if found:
                    return found.group(1) if found.groups() else found.group(0)
            return ""

        return _TEMPLATE.sub(value, template)


def _tool_name(tool: llm.Tool) -> str:
    return str(tool.id)
