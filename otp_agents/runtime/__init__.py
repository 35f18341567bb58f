"""The runtime: the only place that joins the engine, the process handles and the monitors
(``host``), runs a whole tree (``tree``: ``running()`` and :class:`Tree`), serves workers' frames
(``frames``, ``services``) and keeps their checkpoints."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Tree", "running"]


def __getattr__(name: str) -> Any:
    """``Tree`` and ``running`` on first use: importing one part of the runtime does not load all."""
    if name not in __all__:
        raise AttributeError(f"module 'otp_agents.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module("otp_agents.runtime.tree"), name)
