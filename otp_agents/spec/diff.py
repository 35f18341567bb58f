"""What a reload changes, field by field, and how: computed from the old and the new tree alone,
so ``reload --dry-run`` prints exactly what a reload then does.

A reload never stops a running child it does not have to:

- a supervisor's own settings (intensity, period, strategy between the static ones,
  max_children, auto_shutdown, shutdown, start_concurrency, its health and logs defaults) apply
  in place. A lower ``max_children`` only limits new children; running ones stay;
- a process child whose change is only in how it is supervised (health limits, restart type,
  significant, backoff, shutdown, stop signal) is updated in place: same pid, and its monitors
  take the new limits;
- a process child whose process changes (command, module, args, env, cwd, ...) is restarted;
- a supervisor that turns into or out of ``simple_one_for_one`` is restarted with its subtree;
- a ``simple_one_for_one`` supervisor's template applies to children started from then on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from otp_agents.spec.model import ChildSpec, Strategy, SupervisorSpec

Action = Literal["start", "stop", "restart", "in place", "update", "template"]

# Fields of a process child that change how it is supervised, never the process itself.
SUPERVISION_ONLY = frozenset(
    {"restart", "significant", "backoff", "health", "settings", "shutdown", "stop_signal"}
)
_HIDDEN = frozenset({"children", "health", "logs"})  # shown through what they resolve to


@dataclass(frozen=True)
class Change:
    path: str
    action: Action
    fields: tuple[tuple[str, str, str], ...] = ()  # (field, old, new)

    def line(self) -> str:
        sign = {"start": "+", "stop": "-"}.get(self.action, "~")
        what = ", ".join(f"{name} {old} → {new}" for name, old, new in self.fields)
        note = {
            "start": "starts",
            "stop": "stops",
            "restart": "restarts",
            "in place": "in place; running children kept",
            "update": "in place; same process",
            "template": "for children started from now on",
        }[self.action]
        return f"{sign} {self.path}{': ' + what if what else ''} ({note})"


def _show(value: Any) -> str:
    if isinstance(value, msgspec.Struct | list | dict):
        text = msgspec.json.encode(value).decode()
    elif hasattr(value, "value"):  # an enum
        text = str(value.value)
    else:
        text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def field_changes(old: Any, new: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """The fields that differ (``children`` aside); a resolved health or log table by its own
    fields (``health.memory_limit_mb``)."""
    out: list[tuple[str, str, str]] = []
    for name in old.__struct_fields__:
        if name in _HIDDEN:
            continue
        a, b = getattr(old, name), getattr(new, name, None)
        if a == b:
            continue
        label = {"settings": "health", "log_settings": "logs"}.get(name, name)
        if isinstance(a, msgspec.Struct) and type(a) is type(b):
            out.extend(field_changes(a, b, f"{prefix}{label}."))
        else:
            out.append((f"{prefix}{label}", _show(a), _show(b)))
    return out


def dynamic(spec: SupervisorSpec) -> bool:
    return spec.strategy is Strategy.SIMPLE_ONE_FOR_ONE


def in_place(old: ChildSpec, new: ChildSpec) -> bool:
    """Whether a changed child is updated without stopping it."""
    if type(old) is not type(new):
        return False
    if isinstance(old, SupervisorSpec):
        assert isinstance(new, SupervisorSpec)
        return dynamic(old) == dynamic(new)
    changed = {name for name in old.__struct_fields__ if getattr(old, name) != getattr(new, name)}
    return changed <= SUPERVISION_ONLY


def plan(old: SupervisorSpec, new: SupervisorSpec, path: str) -> list[Change]:
    """The changes a reload from ``old`` to ``new`` makes under ``path``, in the order it makes
    them: this supervisor's settings, the children stopped (reverse start order), then those
    updated, restarted or started."""
    changes: list[Change] = []
    own = field_changes(old, new)
    if own:
        changes.append(Change(path, "in place", tuple(own)))
    if dynamic(old):
        if old.children != new.children:
            fields = field_changes(old.children[0], new.children[0]) if old.children and new.children else ()
            changes.append(Change(f"{path}/{new.children[0].id}", "template", tuple(fields)))
        return changes
    before = {c.id: c for c in old.children}
    wanted = {c.id for c in new.children}
    changes.extend(Change(f"{path}/{c.id}", "stop") for c in reversed(old.children) if c.id not in wanted)
    for child in new.children:
        was = before.get(child.id)
        where = f"{path}/{child.id}"
        if was is None:
            changes.append(Change(where, "start"))
        elif was != child:
            if isinstance(was, SupervisorSpec) and isinstance(child, SupervisorSpec) and in_place(was, child):
                changes.extend(plan(was, child, where))
            else:
                action: Action = "update" if in_place(was, child) else "restart"
                changes.append(Change(where, action, tuple(field_changes(was, child))))
    return changes


__all__ = ["SUPERVISION_ONLY", "Change", "dynamic", "field_changes", "in_place", "plan"]
