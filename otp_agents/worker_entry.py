"""``python -m otp_agents.worker_entry package.module:function [args...]`` — how the supervisor
starts a ``module = ...`` protocol worker."""

from __future__ import annotations

import importlib
import sys

from .worker import EXIT_NO_SUPERVISOR, Main, run


def load(target: str) -> Main:
    module_name, _, func_name = target.partition(":")
    module = importlib.import_module(module_name)
    func = getattr(module, func_name, None)
    if func is None or not callable(func):
        raise LookupError(f"{module_name!r} has no callable {func_name!r}")
    return func  # type: ignore[no-any-return]


def main() -> None:
    if len(sys.argv) < 2:
        sys.stderr.write("usage: python -m otp_agents.worker_entry package.module:function [args...]\n")
        sys.exit(EXIT_NO_SUPERVISOR)
    try:
        func = load(sys.argv[1])
    except (ImportError, LookupError) as exc:
        sys.stderr.write(f"otp-agents worker: cannot load {sys.argv[1]}: {exc}\n")
        sys.exit(EXIT_NO_SUPERVISOR)
    run(func, sys.argv[2:])


if __name__ == "__main__":
    main()
