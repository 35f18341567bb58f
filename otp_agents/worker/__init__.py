"""The worker library: what a Python child imports (``from otp_agents.worker import Worker, run``).

It imports the wire contract and nothing of the supervisor."""

from otp_agents.worker.core import Main, Worker, run

__all__ = ["Main", "Worker", "run"]
