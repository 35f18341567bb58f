"""Checks made by ``otp-agents run`` after the tree file is loaded and before anything starts."""

from __future__ import annotations

import os
from collections.abc import Mapping

from .livekit_env import LIVEKIT_VARS, LiveKitEnv, RoomConfigError
from .spec import SupervisorSpec, walk


class PreflightError(Exception):
    """The tree cannot run in this environment; the message names what is wrong and where."""


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
