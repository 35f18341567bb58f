from otp_agents.runtime.tree import Tree as Tree
from otp_agents.runtime.tree import running as running

__all__ = ["Tree", "running"]
