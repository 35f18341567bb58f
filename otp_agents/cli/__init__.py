"""``otp-agents``: the command line. ``app`` holds the command group; ``run``, ``check`` and
``operate`` each add their verbs to it."""

from otp_agents.cli import check, operate, run
from otp_agents.cli.app import main

__all__ = ["check", "main", "operate", "run"]
