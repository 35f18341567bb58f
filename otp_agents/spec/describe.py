"""A tree described for people: what ``otp-agents check`` prints, and its warnings (programs and
scripts that will not be found)."""

from __future__ import annotations

import shutil
from pathlib import Path

from otp_agents.redact import REDACTOR
from otp_agents.spec.model import (
    HEALTH_DEFAULTS,
    ChildSpec,
    CommandSpec,
    SupervisorSpec,
    WorkerSpec,
    ZygoteSpec,
)


def describe(spec: SupervisorSpec, path: str | None = None, depth: int = 0) -> list[str]:
    """The tree as indented lines (what ``check`` prints)."""
    here = path or spec.id
    pad = "  " * depth
    head = f"{pad}{here}  supervisor {spec.strategy.value} intensity={spec.intensity} period={spec.period:g}s"
    if spec.auto_shutdown.value != "never":
        head += f" auto_shutdown={spec.auto_shutdown.value}"
    if spec.max_children is not None:
        head += f" max_children={spec.max_children}"
    if depth:
        head += _common(spec)
    lines = [head]
    for child in spec.children:
        cpath = f"{here}/{child.id}"
        if isinstance(child, SupervisorSpec):
            lines.extend(describe(child, cpath, depth + 1))
        elif isinstance(child, CommandSpec):
            argv = REDACTOR.scrub(" ".join(child.command))
            lines.append(f"{pad}  {cpath}  command {argv}{_common(child)}")
        elif isinstance(child, ZygoteSpec):
            what = f"image={child.image} preload={','.join(child.preload) or '-'} idle={child.idle}"
            lines.append(f"{pad}  {cpath}  zygote {what}{_common(child)}")
        else:
            target = child.module or child.script
            forked = f" zygote={child.zygote}" if child.zygote else ""
            lines.append(f"{pad}  {cpath}  worker {target}{forked}{_common(child)}")
    return lines


def _common(child: ChildSpec) -> str:
    text = f" restart={child.restart.value} shutdown={child.shutdown}"
    if child.significant:
        text += " significant"
    if child.backoff is not None:
        text += f" backoff={child.backoff.initial:g}..{child.backoff.max:g}s"
    if isinstance(child, CommandSpec | WorkerSpec):
        # What environment it gets, by name only (values may be secret).
        names = ",".join(sorted(child.env)) or "-"
        text += f" env=only({names})" if child.clear_env else (f" env=+({names})" if child.env else "")
        changed = {
            name: getattr(child.settings, name)
            for name in child.settings.__struct_fields__
            if getattr(child.settings, name) != getattr(HEALTH_DEFAULTS, name)
        }
        if changed:
            text += (
                " health("
                + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changed.items())
                + ")"
            )
    return text


def warnings(spec: SupervisorSpec, path: str | None = None) -> list[str]:
    here = path or spec.id
    out: list[str] = []
    for child in spec.children:
        cpath = f"{here}/{child.id}"
        if isinstance(child, SupervisorSpec):
            out.extend(warnings(child, cpath))
        elif isinstance(child, CommandSpec):
            prog = child.command[0]
            cwd = Path(child.cwd) if child.cwd else Path.cwd()
            found = (cwd / prog).exists() if "/" in prog else shutil.which(prog) is not None
            if not found:
                out.append(f"{cpath}: program {prog!r} not found (from {cwd})")
        elif isinstance(child, WorkerSpec) and child.script is not None:
            base = Path(child.cwd) if child.cwd else Path.cwd()
            if not (base / child.script).exists():
                out.append(f"{cpath}: script {child.script!r} not found (from {base})")
    return out
