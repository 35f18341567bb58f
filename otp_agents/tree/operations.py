"""The requests an operator (or the API) makes of a supervisor: start one more dynamic child,
stop one for good, start it again, restart it, and reload the tree's spec. Each runs inside the
supervisor's mailbox, so it never races a crash or a restart."""

from __future__ import annotations

import msgspec

from otp_agents.errors import ChildNotFound, Refused, StartError
from otp_agents.events import Kind
from otp_agents.spec.diff import in_place, plan
from otp_agents.spec.model import ChildSpec, CommandSpec, SupervisorSpec, WorkerSpec
from otp_agents.tree.node import Node, Slot
from otp_agents.tree.rules import Cause, Status


class Operations(Node):
    _dynamic: bool
    _next_dynamic: int

    async def start_child(
        self, args: list[str] | None = None, *, memory: tuple[float | None, float | None] = (None, None)
    ) -> str:
        """simple_one_for_one: start one more instance of the template; returns its path.
        ``memory``: (warn, limit) MB for this instance where the template's health sets none."""
        return await self._call(lambda: self._start_dynamic(list(args or []), memory))  # type: ignore[no-any-return]

    async def terminate_child(self, child_id: str) -> None:
        """Stop a child; it stays in the child list (unless temporary) and is not restarted."""
        await self._call(lambda: self._terminate_child(child_id))

    async def restart_child(self, child_id: str) -> None:
        """Start a stopped child again (OTP's restart_child)."""
        await self._call(lambda: self._restart_child(child_id))

    async def apply_spec(self, new: SupervisorSpec) -> list[str]:
        """Reload: make this supervisor run ``new``, touching only what changed (the rules are
        in :mod:`otp_agents.spec.diff`, which also names every change before it is made).

        Removed children are stopped, added ones started; a child whose process changed is
        restarted with its new spec; a supervisor's settings and a process child's supervision
        (health limits, restart type, ...) are updated in place, running children kept (same
        pid). Returns one line per change.
        """
        lines = [change.line() for change in plan(self.spec, new, self.path)]
        await self._call(lambda: self._apply_spec(new))
        return lines

    async def operator_restart(self, child_id: str) -> None:
        """Stop a child and start it again (``otp-agents restart``)."""
        await self._call(lambda: self._operator_restart(child_id))

    async def _start_dynamic(
        self, args: list[str], memory: tuple[float | None, float | None] = (None, None)
    ) -> str:
        if not self._dynamic:
            raise Refused(f"{self.path} is not a simple_one_for_one supervisor")
        cap = self.spec.max_children
        if cap is not None and len(self.state.children) >= cap:
            raise Refused(f"{self.path} already has max_children={cap} children")
        template = self.spec.children[0]
        child_id = f"{template.id}-{self._next_dynamic}"
        self._next_dynamic += 1
        slot = self._add_slot(_with_memory(_with_args(template, child_id, args), *memory))
        try:
            await self._start_slot(slot)
        except StartError:
            self.state.children.remove(self.state.find(child_id))  # type: ignore[arg-type]
            self._forget_checkpoint(self.slots.pop(child_id))
            raise
        return slot.path

    async def _terminate_child(self, child_id: str) -> None:
        rec = self.state.find(child_id)
        if rec is None:
            raise ChildNotFound(f"{self.path}/{child_id}")
        rec.held = True  # the operator's stop sticks (see rules.ChildRec.held)
        await self._terminate_slot(child_id)
        if rec.status is Status.RESTARTING:
            rec.status = Status.STOPPED

    async def _restart_child(self, child_id: str) -> None:
        rec = self.state.find(child_id)
        if rec is None:
            raise ChildNotFound(f"{self.path}/{child_id}")
        if rec.status is Status.RUNNING:
            raise Refused(f"{self.path}/{child_id} is running")
        if rec.status is Status.RESTARTING:
            raise Refused(f"{self.path}/{child_id} is restarting")
        rec.held = False
        await self._start_slot(self.slots[child_id])

    async def _operator_restart(self, child_id: str) -> None:
        """Stop the child and start it again now, as the operator asked: not a crash, no
        intensity, siblings untouched."""
        rec = self.state.find(child_id)
        if rec is None:
            raise ChildNotFound(f"{self.path}/{child_id}")
        self.host.bus.emit(
            Kind.RESTARTING, f"{self.path}/{child_id}", detail="operator", cause=Cause.OPERATOR.value
        )
        await self._terminate_slot(child_id)
        rec = self.state.find(child_id)
        if rec is None:  # a temporary child leaves when stopped
            raise Refused(f"{self.path}/{child_id} is temporary: stopped, not restarted")
        rec.held = False
        rec.status = Status.STOPPED
        await self._start_slot(self.slots[child_id])

    async def _apply_spec(self, new: SupervisorSpec) -> None:
        self.state.strategy, self.state.intensity = new.strategy, new.intensity
        self.state.period, self.state.auto_shutdown = new.period, new.auto_shutdown
        if self._dynamic:  # max_children, the template: for children started from now on
            self.spec = new
            return
        old_specs = {c.id: c for c in self.spec.children}
        wanted = {c.id: c for c in new.children}
        for rec in reversed(list(self.state.children)):  # removed: reverse start order
            if rec.id not in wanted:
                await self._terminate_slot(rec.id)
                if self.state.find(rec.id) is not None:
                    self.state.children.remove(rec)
                self.slots.pop(rec.id, None)
        to_start: list[str] = []
        for child in new.children:
            old = old_specs.get(child.id)
            slot = self.slots.get(child.id)
            if old is None or slot is None:
                self._add_slot(child)
                to_start.append(child.id)
                continue
            if old == child:
                continue
            inst = slot.instance
            same_kind = inst is None or isinstance(inst, Node) == isinstance(child, SupervisorSpec)
            if in_place(old, child) and same_kind:
                if isinstance(inst, Node):
                    assert isinstance(child, SupervisorSpec)
                    await inst.apply_spec(child)
                elif inst is not None:
                    assert isinstance(child, CommandSpec | WorkerSpec)
                    inst.respec(child)  # its monitors take the new limits; same process
            else:
                await self._terminate_slot(child.id)
                slot = self.slots.get(child.id) or self._add_slot(child)
                to_start.append(child.id)
            slot.spec = child
            changed = self.state.find(child.id)
            assert changed is not None
            changed.restart, changed.significant = child.restart, child.significant
            changed.backoff = child.backoff
        order = [c.id for c in new.children]
        self.state.children.sort(key=lambda r: order.index(r.id))
        self.slots = {cid: self.slots[cid] for cid in order if cid in self.slots}
        self.spec = new
        for cid in order:  # added and changed children start in start order
            entry = self.state.find(cid)
            if (
                cid in to_start
                and entry is not None
                and entry.status is not Status.RUNNING
                and not entry.held
            ):
                await self._start_slot(self.slots[cid])

    def _forget_checkpoint(self, slot: Slot) -> None:
        """A child deleted for good (dynamic or temporary) takes its checkpoint along."""
        if isinstance(slot.spec, WorkerSpec):
            self.host.forget_checkpoint(slot.path)


def _with_memory(spec: ChildSpec, warn: float | None, limit: float | None) -> ChildSpec:
    """Memory bounds asked for at start, where the spec's own health table sets none."""
    if not isinstance(spec, (CommandSpec, WorkerSpec)) or (warn is None and limit is None):
        return spec
    health = spec.settings
    changes: dict[str, float] = {}
    if warn is not None and health.memory_warn_mb is None:
        changes["memory_warn_mb"] = warn
    if limit is not None and health.memory_limit_mb is None:
        changes["memory_limit_mb"] = limit
    new = msgspec.structs.replace(health, **changes) if changes else health
    if (
        new.memory_warn_mb is not None
        and new.memory_limit_mb is not None
        and new.memory_warn_mb >= new.memory_limit_mb
    ):
        new = msgspec.structs.replace(new, memory_warn_mb=None)  # a warning past the kill says nothing
    return spec if new == health else msgspec.structs.replace(spec, settings=new)


def _with_args(template: ChildSpec, child_id: str, args: list[str]) -> ChildSpec:
    """A dynamic child: the template with a fresh id and extra arguments appended (as OTP does)."""
    if isinstance(template, CommandSpec):
        return msgspec.structs.replace(template, id=child_id, command=[*template.command, *args])
    if isinstance(template, WorkerSpec):
        return msgspec.structs.replace(template, id=child_id, args=[*template.args, *args])
    if args:
        raise Refused("a dynamic supervisor child takes no arguments")
    return msgspec.structs.replace(template, id=child_id)
