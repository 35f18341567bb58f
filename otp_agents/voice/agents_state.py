"""What a LiveKit Agents session knows, as a checkpoint: enough to pick a call up again in a new
process.

A call's state lives in its ``AgentSession``: the conversation (``session.history``), which agent
is talking and that agent's own ``chat_ctx``, and the app's ``userdata``. :func:`capture` takes
them as plain data, :func:`encode` makes bytes of them within a size limit, :func:`decode` reads
them back, and :func:`restore_userdata` puts the app's fields back on a fresh ``userdata``.

``userdata`` is kept field by field:

- values that are plain data (text, numbers, booleans, lists and dicts of them) are kept, and so
  are the app's dataclasses and pydantic models made of such data (an order, a cart): a dataclass
  is put back into the fresh one field by field (what the entrypoint wired into it, a callback,
  stays), a model is rebuilt with its own validation, both from classes already imported;
- a field still as the entrypoint built it (a menu read at the start) is not stored: the restart
  builds it again;
- an ``Agent`` (the active one, the previous one, a dict of them) is kept as a reference: its key
  in a dict of agents, else its class. A restart re-creates the agents (the entrypoint runs
  again), and the references point at the new ones;
- anything else (a ``JobContext``, a client, a lock) is left out, and named in ``left_out``;
- a field whose name matches a never-kept pattern is left out whatever its value: card numbers,
  expiry dates and CVVs, passwords, secrets, tokens. The default list is :data:`NEVER_KEPT`;
  an app adds its own. Those fields' values are also scrubbed from the conversation (what the
  caller said, tool arguments and results), and so is anything shaped like a card number.

An app keeps more of its own state with two methods on its ``userdata``, found by name (the app
still runs unchanged under LiveKit): ``otp_agents_checkpoint(self) -> dict`` returns JSON data,
called with each checkpoint, and ``otp_agents_resume(self, state: dict)`` gets it back on a
restart, after the fields are restored.

At the size limit the oldest turns go first (the instructions stay), and ``trimmed`` counts
them. A call never fails because its checkpoint is large.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from otp_agents.voice.agents_privacy import NEVER_KEPT, fields_of, matcher, private_values, scrub

_PLAIN = (str, int, float, bool, type(None))
FORMAT = 1
SAVE_HOOK, RESUME_HOOK = "otp_agents_checkpoint", "otp_agents_resume"
log = logging.getLogger("otp_agents.resume")


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
    extra: dict[str, Any] = field(default_factory=dict)  # what the app added (SAVE_HOOK)
    unchanged: list[str] = field(default_factory=list)  # fields as the entrypoint built them
    effects: dict[str, list[str]] = field(default_factory=dict)  # once-only requests (agents_once)


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
    baseline: dict[str, str] | None = None,
) -> SessionState:
    """The state of a session: ``history`` and ``agent.chat_ctx`` are LiveKit ``ChatContext``s.
    ``baseline``: :func:`fingerprints` of the userdata as the entrypoint built it; fields still
    equal to it are not stored."""
    from livekit.agents import Agent

    secret = matcher(never)
    kept, left_out, refs = _fields(userdata, Agent, secret)
    unchanged = [n for n, v in kept.items() if baseline and baseline.get(n) == _print(v)]
    for name in unchanged:
        del kept[name]
    ref = next((key for key, target in refs.items() if target is agent), None) if agent is not None else None
    private = private_values(userdata, secret)
    return SessionState(
        history=scrub(_chat(history), private),
        agent=class_name(agent) if agent is not None else None,
        agent_ref=ref,
        agent_history=scrub(_chat(agent.chat_ctx), private) if agent is not None else None,
        userdata=kept,
        left_out=left_out,
        participant=participant,
        extra=_extra(userdata, left_out),
        unchanged=unchanged,
    )


def fingerprints(userdata: Any, never: Iterable[str] = NEVER_KEPT) -> dict[str, str]:
    """Each kept field of ``userdata`` as the entrypoint built it (before any turn)."""
    from livekit.agents import Agent

    kept, _, _ = _fields(userdata, Agent, matcher(never))
    return {name: _print(value) for name, value in kept.items()}


def _print(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _extra(userdata: Any, left_out: dict[str, str]) -> dict[str, Any]:
    hook = getattr(userdata, SAVE_HOOK, None)
    if not callable(hook):
        return {}
    try:
        extra = hook()
        json.dumps(extra)
    except Exception as exc:  # the app's hook must not cost the call
        left_out[SAVE_HOOK] = f"the hook failed: {type(exc).__name__}: {exc}"
        return {}
    if not isinstance(extra, dict):
        left_out[SAVE_HOOK] = f"the hook returned {type(extra).__name__}, not a dict"
        return {}
    return extra


def _chat(ctx: Any) -> dict[str, Any]:
    return dict(ctx.to_dict(exclude_image=True, exclude_audio=True, exclude_timestamp=False))


def _fields(
    userdata: Any, agent_type: type, secret: re.Pattern[str]
) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """(kept fields, left-out fields with why, references to agents by path)."""
    if userdata is None:
        return {}, {}, {}
    items = dict(fields_of(userdata))
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
        try:
            kept[name] = _value(value, secret, name, left_out)
        except _NotKept as exc:
            left_out[name] = str(exc)
    # an agent held in a field is also one of the dict's: prefer the dict's key for it
    for name, value in list(refs.items()):
        if "." not in name:
            better = next((k for k, v in refs.items() if "." in k and v is value), None)
            if better:
                kept[name] = {"__agent__": class_name(value), "ref": better}
    return kept, left_out, refs


class _NotKept(Exception):
    pass


def _value(value: Any, secret: re.Pattern[str], where: str, left_out: dict[str, str], depth: int = 0) -> Any:
    """``value`` as JSON data, or :class:`_NotKept`. A dataclass's fields that cannot be kept
    (a callback) are left out one by one and named ``field.sub``."""
    if depth > 20:
        raise _NotKept("nested too deep")
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list | tuple):
        return [_value(v, secret, f"{where}[]", left_out, depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise _NotKept("a dict with keys that are not text")
        return {k: _value(v, secret, f"{where}.{k}", left_out, depth + 1) for k, v in value.items()}
    dump = getattr(value, "model_dump", None)
    if callable(dump) and callable(getattr(type(value), "model_validate", None)):  # pydantic
        data = dump(mode="json")
        for key in [k for k in data if secret.search(k)]:
            del data[key]
            left_out[f"{where}.{key}"] = "never kept (private)"
        return {"__model__": class_name(value), "data": data}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            sub = f"{where}.{f.name}"
            if secret.search(f.name):
                left_out[sub] = "never kept (private)"
                continue
            try:
                fields[f.name] = _value(getattr(value, f.name), secret, sub, left_out, depth + 1)
            except _NotKept as exc:
                left_out[sub] = str(exc)
        return {"__dataclass__": class_name(value), "fields": fields}
    raise _NotKept(f"not plain data ({type(value).__name__})")


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
    new_agents = fields_of(userdata)
    restored = []
    for name, value in state.userdata.items():
        if isinstance(value, dict) and "__agents__" in value:
            continue  # the dict of agents itself: the new one stands
        if isinstance(value, dict) and "__agent__" in value:
            target = _resolve(new_agents, value.get("ref"), value["__agent__"])
            if target is None:
                continue
            value = target
        else:
            try:
                value = _revive(value, new_agents.get(name))
            except Exception as exc:  # the fresh value stands; the call goes on
                log.warning("userdata.%s not restored: %s: %s", name, type(exc).__name__, exc)
                continue
        _set(userdata, name, value)
        restored.append(name)
    hook = getattr(userdata, RESUME_HOOK, None)
    if state.extra and callable(hook):
        try:
            hook(state.extra)
            restored.append(RESUME_HOOK)
        except Exception as exc:
            log.warning("the app's %s failed: %s: %s", RESUME_HOOK, type(exc).__name__, exc)
    return restored


def _revive(value: Any, fresh: Any) -> Any:
    """A kept value back as the app's objects; a dataclass goes into ``fresh`` (the one the
    entrypoint built) when it is of the same class, so what was wired into it stays."""
    if isinstance(value, list):
        return [_revive(v, None) for v in value]
    if not isinstance(value, dict):
        return value
    if "__model__" in value:
        return _imported(value["__model__"], "model_validate").model_validate(value["data"])
    if "__dataclass__" in value:
        fields = value["fields"]
        if fresh is not None and class_name(fresh) == value["__dataclass__"]:
            for key, sub in fields.items():
                setattr(fresh, key, _revive(sub, getattr(fresh, key, None)))
            return fresh
        cls = _imported(value["__dataclass__"], "__dataclass_fields__")
        return cls(**{key: _revive(sub, None) for key, sub in fields.items()})
    return {k: _revive(v, fresh.get(k) if isinstance(fresh, dict) else None) for k, v in value.items()}


def _imported(name: str, marker: str) -> Any:
    """A class the app already imported (a checkpoint never imports anything)."""
    module, _, qualname = name.partition(":")
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not isinstance(found, type) or not hasattr(found, marker):
        raise LookupError(f"{name} is not an imported class")
    return found


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
    return _resolve(fields_of(userdata) if userdata is not None else {}, state.agent_ref, state.agent)


__all__ = [
    "NEVER_KEPT",
    "SessionState",
    "agent_in",
    "capture",
    "class_name",
    "decode",
    "encode",
    "fingerprints",
    "restore_userdata",
]
