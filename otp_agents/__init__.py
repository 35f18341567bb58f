"""otp-agents: Erlang/OTP-style supervision trees for OS processes.

What an embedding application imports (the rest of the package is importable but not promised)::

    from otp_agents import load_file, running

    async with running(load_file("tree.toml")) as tree:
        path = await tree.supervisor("root/rooms").start_child(["--room", "r1"])

and what a Python child imports::

    from otp_agents.worker import Worker, run

The names below are loaded on first use, so ``import otp_agents.worker`` in a child never loads
the supervisor's side.

The packages, in the order data flows: ``spec`` (the tree file, typed) -> ``tree`` (the OTP
engine: rules, mailbox, supervisors) -> ``proc`` (one OS process: spawn, watch, stop) ->
``wire`` (the framed protocol) -> ``worker`` (the library inside the child); ``health`` (monitors
beside the process handles), ``runtime`` (the only place joining engine, handles and monitors),
``ops`` (control socket, metrics, status, the ``run`` loop), ``cli`` (the command line),
``zygote`` (forks preloaded workers), ``voice`` (the voice library).
"""

from __future__ import annotations

_WHERE = {
    "running": "otp_agents.runtime.tree",
    "Tree": "otp_agents.runtime.tree",
    "Supervisor": "otp_agents.tree.supervisor",
    "load_file": "otp_agents.spec.load",
    "loads": "otp_agents.spec.load",
    "from_dict": "otp_agents.spec.load",
    "SupervisorSpec": "otp_agents.spec.model",
    "ChildSpec": "otp_agents.spec.model",
    "CommandSpec": "otp_agents.spec.model",
    "WorkerSpec": "otp_agents.spec.model",
    "ZygoteSpec": "otp_agents.spec.model",
    "Health": "otp_agents.spec.model",
    "Backoff": "otp_agents.spec.model",
    "RestartType": "otp_agents.spec.model",
    "Strategy": "otp_agents.spec.model",
    "Worker": "otp_agents.worker",
    "run": "otp_agents.worker",
    "Event": "otp_agents.events",
    "EventBus": "otp_agents.events",
    "Kind": "otp_agents.events",
    "OtpAgentsError": "otp_agents.errors",
    "ConfigError": "otp_agents.errors",
    "StartError": "otp_agents.errors",
    "StartAborted": "otp_agents.errors",
    "ChildNotFound": "otp_agents.errors",
    "Refused": "otp_agents.errors",
}

__all__ = [
    "Backoff",
    "ChildNotFound",
    "ChildSpec",
    "CommandSpec",
    "ConfigError",
    "Event",
    "EventBus",
    "Health",
    "Kind",
    "OtpAgentsError",
    "Refused",
    "RestartType",
    "StartAborted",
    "StartError",
    "Strategy",
    "Supervisor",
    "SupervisorSpec",
    "Tree",
    "Worker",
    "WorkerSpec",
    "ZygoteSpec",
    "from_dict",
    "load_file",
    "loads",
    "run",
    "running",
]


def __getattr__(name: str) -> object:
    import importlib  # here, not above: a child importing otp_agents.worker pays for nothing else

    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'otp_agents' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
