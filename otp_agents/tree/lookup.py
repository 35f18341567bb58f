"""A running tree's nodes, by path."""

from __future__ import annotations

from otp_agents.errors import ChildNotFound
from otp_agents.tree.supervisor import Slot, Supervisor


class TreeLookup:
    """Finding a node of a running tree by its path (``root/voice/leaf-3``)."""

    def __init__(self, root: Supervisor) -> None:
        self.root = root

    def supervisor(self, path: str) -> Supervisor:
        node = self._walk(path)
        if isinstance(node, Supervisor):
            return node
        if isinstance(node, Slot) and isinstance(node.instance, Supervisor):
            return node.instance
        raise ChildNotFound(f"{path} is not a running supervisor")

    def slot(self, path: str) -> Slot:
        node = self._walk(path)
        if not isinstance(node, Slot):
            raise ChildNotFound(f"{path} is the root supervisor, not a child")
        return node

    def pid(self, path: str) -> int | None:
        """The OS pid of a running process child, else None."""
        try:
            inst = self.slot(path).instance
        except ChildNotFound:
            return None
        return getattr(inst, "pid", None) if inst is not None else None

    def _walk(self, path: str) -> Supervisor | Slot:
        parts = path.split("/")
        if parts[0] != self.root.path:
            raise ChildNotFound(path)
        node: Supervisor | Slot = self.root
        for part in parts[1:]:
            sup = node if isinstance(node, Supervisor) else node.instance
            if not isinstance(sup, Supervisor) or part not in sup.slots:
                raise ChildNotFound(path)
            node = sup.slots[part]
        return node
