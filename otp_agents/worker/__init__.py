"""The worker library: what a Python child imports (``from otp_agents.worker import Worker, run``).

It imports the wire contract and nothing of the supervisor."""

from otp_agents.worker.api import Main, Worker
from otp_agents.worker.loop import run

__all__ = ["Main", "Worker", "run"]
