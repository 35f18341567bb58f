"""What a LiveKit Agents session knows, as a checkpoint: enough to pick a call up again in a new
process.

A call's state lives in its ``AgentSession``: the conversation (``session.history``), which agent
is talking and that agent's own ``chat_ctx``, and the app's ``userdata``. :func:`capture` takes
them as plain data, :func:`encode` makes bytes of them within a size limit, :func:`decode` reads
them back, and :func:`restore_userdata` puts the app's fields back on a fresh ``userdata``.

``userdata`` is kept field by field:

- values that are plain data (text, numbers, booleans, lists and dicts of them) are kept;
- an ``Agent`` (the active one, the previous one, a dict of them) is kept as a reference: its key
  in a dict of agents, else its class. A restart re-creates the agents (the entrypoint runs
  again), and the references point at the new ones;
- anything else (a ``JobContext``, a client, a lock) is left out, and named in ``left_out``;
- a field whose name matches a never-kept pattern is left out whatever its value: card numbers,
  expiry dates and CVVs, passwords, secrets, tokens. The default list is :data:`NEVER_KEPT`;
  an app adds its own. Those fields' values are also scrubbed from the conversation (what the
  caller said, tool arguments and results), and so is anything shaped like a card number.

At the size limit the oldest turns go first (the instructions stay), and ``trimmed`` counts
them. A call never fails because its checkpoint is large.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Field names that are never written to a checkpoint (matched anywhere in the name, any case).
NEVER_KEPT = ("card", "cvv", "cvc", "expir", "password", "passcode", "secret", "token", "ssn", "iban", "pin")
_PLAIN = (str, int, float, bool, type(None))
FORMAT = 1


@dataclass
class SessionState:
    history: dict[str, Any]  # ChatContext.to_dict()
    agent: str | None = None  # the active agent's class, module:qualname
    agent_ref: str | None = None  # how userdata refers to it ("agents.reservation"), if it does
    agent_history: dict[str, Any] | None = None  # the active agent's own chat_ctx
    userdata: dict[str, Any] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)  # userdata field -> why not kept
    participant: str | None = None  # the caller the session is linked to
    trimmed: int = 0  # oldest turns dropped to fit the limit
    extra: dict[str, Any] = field(default_factory=dict)  # what the app added (a hook)


def class_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def capture(
    history: Any,
    agent: Any = None,
    userdata: Any = None,
    *,
    participant: str | None = None,
    never: Iterable[str] = NEVER_KEPT,
) -> SessionState:
    """The state of a session: ``history`` and ``agent.chat_ctx`` are LiveKit ``ChatContext``s."""
    from livekit.agents import Agent

    secret = _matcher(never)
    kept, left_out, refs = _fields(userdata, Agent, secret)
    ref = next((key for key, target in refs.items() if target is agent), None) if agent is not None else None
    private = _private_values(userdata, secret)
    return SessionState(
        history=_scrub(_chat(history), private),
        agent=class_name(agent) if agent is not None else None,
        agent_ref=ref,
        agent_history=_scrub(_chat(agent.chat_ctx), private) if agent is not None else None,
        userdata=kept,
        left_out=left_out,
        participant=participant,
    )


def _chat(ctx: Any) -> dict[str, Any]:
    return dict(ctx.to_dict(exclude_image=True, exclude_audio=True, exclude_timestamp=False))


_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
REDACTED = "[not kept]"


def _private_values(userdata: Any, secret: re.Pattern[str]) -> list[str]:
    """The values of the private fields: they are also scrubbed from what was said."""
    if userdata is None:
        return []
    values = [str(v) for k, v in _items(userdata).items() if secret.search(k) and v not in (None, "")]
    return sorted({v for v in values if len(v) >= 3}, key=len, reverse=True)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _scrub_text(text: str, private: list[str]) -> str:
    def card(m: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", m.group(0))
        return REDACTED if _luhn(digits) else m.group(0)

    text = _CARD.sub(card, text)
    for value in private:
        spaced = r"[ -]?".join(re.escape(ch) for ch in value) if value.isdigit() else re.escape(value)
        text = re.sub(spaced, REDACTED, text)
    return text


def _scrub(chat: dict[str, Any], private: list[str]) -> dict[str, Any]:
    """Card numbers (Luhn-valid runs of 13 to 19 digits) and the private fields' values, out of
    every text of the conversation: a caller reads their card out loud."""
    for item in chat.get("items", []):
        content = item.get("content")
        if isinstance(content, list):
            item["content"] = [_scrub_text(c, private) if isinstance(c, str) else c for c in content]
        for key in ("arguments", "output"):  # tool calls and their results
            if isinstance(item.get(key), str):
                item[key] = _scrub_text(item[key], private)
    return chat


def _matcher(never: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(n) for n in never) or r"(?!)", re.IGNORECASE)


def _fields(
    userdata: Any, agent_type: type, secret: re.Pattern[str]
) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """(kept fields, left-out fields with why, references to agents by path)."""
    if userdata is None:
        return {}, {}, {}
    items = dict(_items(userdata))
    kept: dict[str, Any] = {}
    left_out: dict[str, str] = {}
    refs: dict[str, Any] = {}
    for name, value in items.items():
        if secret.search(name):
            left_out[name] = "never kept (private)"
            continue
        if isinstance(value, agent_type):
            refs[name] = value
            kept[name] = {"__agent__": class_name(value)}
            continue
        if isinstance(value, dict) and value and all(isinstance(v, agent_type) for v in value.values()):
            refs.update({f"{name}.{k}": v for k, v in value.items()})
            kept[name] = {"__agents__": {str(k): class_name(v) for k, v in value.items()}}
            continue
        if _plain(value):
            kept[name] = value
        else:
            left_out[name] = f"not plain data ({type(value).__name__})"
    # an agent held in a field is also one of the dict's: prefer the dict's key for it
    for name, value in list(refs.items()):
        if "." not in name:
            better = next((k for k, v in refs.items() if "." in k and v is value), None)
            if better:
                kept[name] = {"__agent__": class_name(value), "ref": better}
    return kept, left_out, refs


def _plain(value: Any, depth: int = 0) -> bool:
    if depth > 20:
        return False
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def encode(state: SessionState, limit: int) -> bytes:
    """The checkpoint, within ``limit`` bytes: the oldest turns of the history (and of the agent's
    own history) are dropped until it fits; instructions (system and developer items) stay."""
    data = dataclasses.asdict(state)
    data["format"] = FORMAT
    out = json.dumps(data, separators=(",", ":")).encode()
    while len(out) > limit:
        dropped = _drop_oldest(data["history"]) + _drop_oldest(data["agent_history"])
        if not dropped:
            data["userdata"], data["extra"] = {}, {}  # still too big: keep the call, lose the state
            data["left_out"]["*"] = "the checkpoint was over its limit"
            out = json.dumps(data, separators=(",", ":")).encode()
            break
        data["trimmed"] += dropped
        out = json.dumps(data, separators=(",", ":")).encode()
    return out


def _drop_oldest(chat: dict[str, Any] | None) -> int:
    if not chat:
        return 0
    items = chat.get("items", [])
    for i, item in enumerate(items):
        if item.get("role") not in ("system", "developer"):
            del items[i]
            return 1
    return 0


def decode(data: bytes) -> SessionState:
    raw = json.loads(data)
    if raw.pop("format", None) != FORMAT:
        raise ValueError("not a session checkpoint of this format")
    return SessionState(**raw)


def restore_userdata(userdata: Any, state: SessionState) -> list[str]:
    """Put the kept fields back on a fresh ``userdata`` (the entrypoint built it, with new
    agents): agent references resolve to the new agents. Returns the fields restored."""
    if userdata is None:
        return []
    new_agents = _items(userdata)
    restored = []
    for name, value in state.userdata.items():
        if isinstance(value, dict) and "__agents__" in value:
            continue  # the dict of agents itself: the new one stands
        if isinstance(value, dict) and "__agent__" in value:
            target = _resolve(new_agents, value.get("ref"), value["__agent__"])
            if target is None:
                continue
            value = target
        _set(userdata, name, value)
        restored.append(name)
    return restored


def _items(userdata: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(userdata) and not isinstance(userdata, type):
        return {f.name: getattr(userdata, f.name) for f in dataclasses.fields(userdata)}
    if isinstance(userdata, dict):
        return userdata
    return dict(getattr(userdata, "__dict__", {}))


def _resolve(fields: dict[str, Any], ref: str | None, cls: str) -> Any:
    if ref and "." in ref:
        holder, key = ref.split(".", 1)
        found = fields.get(holder, {})
        if isinstance(found, dict) and key in found:
            return found[key]
    for value in fields.values():  # by class, among the new agents
        candidates = value.values() if isinstance(value, dict) else [value]
        for candidate in candidates:
            if class_name(candidate) == cls:
                return candidate
    return None


def _set(userdata: Any, name: str, value: Any) -> None:
    if isinstance(userdata, dict):
        userdata[name] = value
    else:
        setattr(userdata, name, value)


def agent_in(userdata: Any, state: SessionState) -> Any:
    """The re-created agent that was active (by its reference, else by its class), or None."""
    if state.agent is None:
        return None
    return _resolve(_items(userdata) if userdata is not None else {}, state.agent_ref, state.agent)


__all__ = [
    "NEVER_KEPT",
    "SessionState",
    "agent_in",
    "capture",
    "class_name",
    "decode",
    "encode",
    "restore_userdata",
]
