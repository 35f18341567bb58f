"""``otp-agents``: the command line. ``app`` holds the command group; ``run``, ``check``,
``logs`` and ``operate`` each add their verbs to it when first used."""

from otp_agents.cli.app import main

__all__ = ["main"]
