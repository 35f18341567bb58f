"""Loading a worker's ``package.module:function`` target and running it (``python -m otp_agents.worker``)."""

from __future__ import annotations

import importlib
import sys

from otp_agents.wire.env import EXIT_NO_SUPERVISOR
from otp_agents.worker.api import Main
from otp_agents.worker.loop import run


def load(target: str) -> Main:
    module_name, _, func_name = target.partition(":")
    module = importlib.import_module(module_name)
    func = getattr(module, func_name, None)
    if func is None or not callable(func):
        raise LookupError(f"{module_name!r} has no callable {func_name!r}")
    return func  # type: ignore[no-any-return]


def main() -> None:
    if len(sys.argv) < 2:
        sys.stderr.write("usage: python -m otp_agents.worker package.module:function [args...]\n")
        sys.exit(EXIT_NO_SUPERVISOR)
    try:
        func = load(sys.argv[1])
    except (ImportError, LookupError) as exc:
        sys.stderr.write(f"otp-agents worker: cannot load {sys.argv[1]}: {exc}\n")
        sys.exit(EXIT_NO_SUPERVISOR)
    run(func, sys.argv[2:])
