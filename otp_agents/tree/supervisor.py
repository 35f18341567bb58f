"""The supervisor engine: one mailbox per supervisor, carrying out what ``rules.py`` decides.

A supervisor handles its messages one at a time, as OTP's gen_server does, so a crash, a
restart and an operator request never race. Starting and stopping children are awaited inside
the handler (OTP does the same: ``start_children`` and ``terminate_children`` are synchronous),
and every such wait is bounded by the child's ``start_timeout`` or ``shutdown``. Read-only
questions (:meth:`Supervisor.which_children`) never go through the mailbox, so they are answered
even in the middle of a restart storm.

Messages: ``ChildDown`` (a child ended without being asked), ``TryAgain`` (retry of a failed
restart), ``StartLater`` (a backoff delay elapsed), ``Call`` (an API request) and ``Stop``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel

from otp_agents.errors import ChildNotFound, Refused, StartAborted, StartError
from otp_agents.events import OPERATOR, Kind, Operator
from otp_agents.spec.model import ProcessSpec, Strategy, SupervisorSpec
from otp_agents.tree import reports, rules
from otp_agents.tree.mailbox import Call, ChildDown, Mailbox, Msg, StartLater, Stop, TryAgain
from otp_agents.tree.node import ChildInfo, Node, Slot, SupervisorExit
from otp_agents.tree.operations import Operations
from otp_agents.tree.ports import ChildHandle, EngineHost
from otp_agents.tree.rules import Decision, GiveUp, GiveUpReason, Nothing, Recycle, Restart, Status
from otp_agents.tree.startup import Startup

log = logging.getLogger("otp_agents")


class Supervisor(Startup, Operations):
    """A running supervisor node. Build a tree with :func:`otp_agents.runtime.running`."""

    def __init__(
        self,
        spec: SupervisorSpec,
        path: str,
        host: EngineHost,
        notify_parent: Callable[[Supervisor], None] | None = None,
    ) -> None:
        super().__init__(spec, path, host)
        self._notify_parent = notify_parent
        self._mailbox = Mailbox()
        self._busy = False
        self._scope: anyio.CancelScope | None = None
        self._dynamic = spec.strategy is Strategy.SIMPLE_ONE_FOR_ONE
        self._next_dynamic = 1
        if not self._dynamic:
            for child in spec.children:
                self._add_slot(child)

    async def stop(self, operator: Operator | None = None) -> None:
        """Terminate all children in reverse start order, then end (the parent's request, or
        an ``operator``'s)."""
        if self.exit is None:
            self._mailbox.put(Stop(operator or OPERATOR.get()))
        await self.finished.wait()

    async def stop_within(self, shutdown: float | str) -> bool:
        """:meth:`stop`, bounded by a child spec's ``shutdown``; True if it had to kill."""
        if shutdown == "brutal_kill":
            await self.kill()
            return True
        if shutdown == "infinity":
            await self.stop()
            return False
        with anyio.move_on_after(float(shutdown)):
            await self.stop()
            return False
        await self.kill()
        return True

    async def kill(self) -> None:
        """Brutal stop: SIGKILL every process of this subtree, without ceremony."""
        pairs = self._all_slots()
        sups: dict[int, Supervisor] = {id(self): self}
        for _, slot in pairs:
            if isinstance(slot.instance, Supervisor):
                sups[id(slot.instance)] = slot.instance
        for sup in sups.values():
            if sup.exit is None:
                sup.exit = SupervisorExit("killed", requested=True)
            if sup._scope is not None:
                sup._scope.cancel()
        procs = [s.instance for _, s in pairs if s.instance is not None and not isinstance(s.instance, Node)]
        for proc in procs:
            proc.kill()
        for proc in procs:
            await proc.wait_killed()
        for sup in sups.values():
            sup.finished.set()
        self.host.bus.emit(Kind.SUPERVISOR_STOPPED, self.path, reason="killed", requested=True)

    def _post(self, msg: Msg) -> None:
        if self.exit is None:
            self._mailbox.put(msg)

    async def _call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        if self.exit is not None:
            raise Refused(f"{self.path} is not running")
        call = Call(fn)
        self._mailbox.put(call)
        await call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    async def _loop(self) -> None:
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                while self.exit is None:
                    msg = await self._mailbox.get()
                    self._busy = True
                    # an operator's request: the events it causes name who asked
                    token = OPERATOR.set(msg.operator if isinstance(msg, Call | Stop) else None)
                    try:
                        await self._handle(msg)
                    except Exception:
                        # A bug in handling one message must not take the supervisor down.
                        log.exception("%s: error while handling %s", self.path, type(msg).__name__)
                    finally:
                        OPERATOR.reset(token)
                        self._busy = False
                    # Let every other task run between two messages: a storm of queued crashes
                    # must not starve the control socket, the monitors or other supervisors.
                    await anyio.lowlevel.checkpoint()
        finally:
            if self.exit is None:  # cancelled from outside: make stop() and waiters return
                self.exit = SupervisorExit("killed", requested=False)
            self.finished.set()
            # Anything still queued will never be handled: release waiting callers.
            while len(self._mailbox):
                left = self._mailbox._items.popleft()
                if isinstance(left, Call):
                    left.error = Refused(f"{self.path} stopped")
                    left.done.set()

    def idle(self) -> bool:
        """Nothing queued and nothing in progress (tests and tools use it to wait for calm)."""
        return not self._busy and not len(self._mailbox)

    async def _handle(self, msg: Msg) -> None:
        if isinstance(msg, ChildDown):
            await self._on_child_down(msg.slot_id, msg.instance)
        elif isinstance(msg, TryAgain):
            await self._apply(rules.try_again(self.state, msg.slot_id, time.monotonic()))
        elif isinstance(msg, StartLater):
            if rules.due(self.state, msg.child):
                await self._start_ids(msg.child, msg.ids)
        elif isinstance(msg, Stop):
            await self._give_up(SupervisorExit("shutdown", requested=True))
        else:
            try:
                msg.result = await msg.fn()
            except (Refused, ChildNotFound, StartError) as exc:
                msg.error = exc
            except BaseException as exc:
                msg.error = exc if isinstance(exc, Exception) else Refused(f"{self.path} stopped")
                raise
            finally:
                msg.done.set()

    async def _on_child_down(self, slot_id: str, instance: ChildHandle | Node) -> None:
        """A child ended without being asked: the facts to the rules, their decision carried out."""
        slot = self.slots.get(slot_id)
        if slot is None or slot.instance is not instance or instance.exit is None:
            return  # stale: the supervisor already stopped this instance itself
        slot.instance = None
        facts = _facts(instance)
        reports.exited(self.host.bus, slot, instance, facts)
        decision = rules.on_exit(self.state, slot_id, facts, time.monotonic(), random.random())
        self._drop_removed()
        await self._apply(decision, (slot.path, instance.exit.describe()))

    async def _apply(self, decision: Decision, cause: tuple[str, str] | None = None) -> None:
        if isinstance(decision, Nothing):
            return
        if isinstance(decision, Recycle):
            path = f"{self.path}/{decision.child}"
            detail = "restart" if decision.restart else "removed"
            label = decision.cause.value if decision.restart else None
            self.host.bus.emit(Kind.RECYCLED, path, reason=decision.why, detail=detail, cause=label)
            if decision.restart:
                await self._start_ids(decision.child, (decision.child,))
            return
        if isinstance(decision, GiveUp):
            path = f"{self.path}/{decision.child}"
            kind = (
                Kind.INTENSITY_EXCEEDED if decision.reason is GiveUpReason.INTENSITY else Kind.AUTO_SHUTDOWN
            )
            detail = (
                f"more than {self.spec.intensity} restarts in {self.spec.period:g}s"
                if decision.reason is GiveUpReason.INTENSITY
                else self.spec.auto_shutdown.value
            )
            self.host.bus.emit(kind, self.path, child=path, detail=detail)
            await self._give_up(
                SupervisorExit(
                    decision.reason.value, requested=False, child=path, cause=cause[1] if cause else None
                )
            )
            return
        await self._run_plan(decision)

    async def _run_plan(self, plan: Restart) -> None:
        path = f"{self.path}/{plan.child}"
        self.host.bus.emit(
            Kind.RESTARTING,
            path,
            detail=self.spec.strategy.value,
            reason=",".join(plan.start) if len(plan.start) > 1 else None,
            cause=plan.cause.value,
        )
        for cid in plan.terminate:
            await self._terminate_slot(cid)
        if plan.delay > 0:
            rules.delayed(self.state, plan.child)  # "restarting" until the timer fires
            if (waiting := self.slots.get(plan.child)) is not None:
                waiting.retry_at = time.monotonic() + plan.delay
            self.host.bus.emit(Kind.RESTART_DELAYED, path, delay=round(plan.delay, 4))
            self.host.tg.start_soon(self._timer, plan.delay, StartLater(plan.child, plan.start))
            return
        await self._start_ids(plan.child, plan.start)

    async def _start_ids(self, child: str, ids: tuple[str, ...]) -> None:
        for cid in ids:
            rec = self.state.find(cid)
            slot = self.slots.get(cid)
            if rec is None or slot is None or rec.status is Status.RUNNING:
                continue
            try:
                await self._start_slot(slot)
            except StartAborted:
                return  # the whole tree is stopping: leave it stopped, no retry
            except StartError:
                delay = rules.start_failed(self.state, cid, time.monotonic(), random.random())
                slot.retry_at = time.monotonic() + delay
                if delay > 0:
                    self.host.bus.emit(Kind.RESTART_DELAYED, slot.path, delay=round(delay, 4))
                    self.host.tg.start_soon(self._timer, delay, TryAgain(cid))
                else:
                    self._post(TryAgain(cid))
                return
            slot.restarts += 1

    async def _timer(self, delay: float, msg: Msg) -> None:
        await anyio.sleep(delay)
        self._post(msg)

    async def _start_slot(self, slot: Slot) -> None:
        spec = slot.spec
        began = time.monotonic()
        try:
            if isinstance(spec, SupervisorSpec):
                sup = Supervisor(spec, slot.path, self.host, self._child_sup_down(slot.id))
                await sup.start()
                slot.instance = sup
            else:
                proc = await self.host.spawn(slot.path, spec, self._child_proc_down(slot.id))
                slot.instance = proc
                self.host.bus.emit(
                    Kind.CHILD_STARTED,
                    slot.path,
                    pid=proc.pid,
                    value=round(time.monotonic() - began, 6),
                    detail=f"forked by zygote {proc.forked_from}" if proc.forked_from else None,
                )
                # If it already died, its watcher has queued a ChildDown for this very instance.
        except StartError as exc:
            if not isinstance(exc, StartAborted):
                reports.start_failed(self.host.bus, slot, exc)
            raise
        slot.started_at = time.monotonic()
        slot.retry_at = None
        rules.child_started(self.state, slot.id, slot.started_at)

    def _child_proc_down(self, slot_id: str) -> Callable[[ChildHandle], None]:
        return lambda proc: self._post(ChildDown(slot_id, proc))

    def _child_sup_down(self, slot_id: str) -> Callable[[Supervisor], None]:
        return lambda sup: self._post(ChildDown(slot_id, sup))

    async def _terminate_slot(self, cid: str) -> None:
        slot = self.slots.get(cid)
        if slot is None:
            return
        inst = slot.instance
        if inst is not None:
            # Keep slot.instance while stopping, so that kill() still finds it; the mailbox is
            # serial, so its ChildDown is only looked at after this, and is then stale.
            if not isinstance(inst, Node):
                killed = await inst.stop()
                reports.terminated(self.host.bus, slot, inst, killed)
            else:
                await inst.stop_within(slot.spec.shutdown)
            slot.instance = None
        rules.child_terminated(self.state, cid)
        self._drop_removed()

    async def _terminate_all(self) -> None:
        ids = rules.shutdown_order(self.state)
        if self._dynamic:
            # OTP stops dynamic children concurrently, unordered.
            async with anyio.create_task_group() as tg:
                for cid in ids:
                    tg.start_soon(self._terminate_slot, cid)
        else:
            for cid in ids:
                await self._terminate_slot(cid)
        # Children waiting for a retry or a backoff timer are not running; they just stop.
        for rec in self.state.children:
            if rec.status is Status.RESTARTING:
                rec.status = Status.STOPPED

    async def _give_up(self, ex: SupervisorExit) -> None:
        await self._terminate_all()
        self.exit = ex
        self.host.bus.emit(
            Kind.SUPERVISOR_STOPPED,
            self.path,
            reason=ex.reason,
            requested=ex.requested,
            child=ex.child,
            detail=ex.cause,
        )
        if not ex.requested and self._notify_parent is not None and ex.reason != "auto_shutdown":
            # An auto_shutdown is a significant child's work being over, not a failure: the parent
            # sees a normal exit of a significant child (it logs AUTO_SHUTDOWN itself if it cares).
            self.host.bus.emit(Kind.ESCALATED, self.path, reason=ex.reason, child=ex.child)
        self.finished.set()
        if self._notify_parent is not None and not ex.requested:
            self._notify_parent(self)

    def _drop_removed(self) -> None:
        if len(self.slots) != len(self.state.children):
            live = {rec.id for rec in self.state.children}
            for sid in [s for s in self.slots if s not in live]:
                self._forget_checkpoint(self.slots.pop(sid))

    def _begin(self) -> None:
        self.host.tg.start_soon(self._loop, name=f"supervisor {self.path}")


def _facts(instance: ChildHandle | Node) -> rules.ExitFacts:
    """What the rules need to know of how a child ended."""
    if isinstance(instance, Node):
        ex = instance.exit
        assert ex is not None
        killed = ex.reason == "killed" and not ex.requested
        return rules.ExitFacts(requested=ex.requested, gave_up=not killed and not ex.requested, killed=killed)
    end = instance.exit
    assert end is not None
    return rules.ExitFacts(
        code=end.status.code,
        signal=end.status.signal,
        requested=end.requested,
        fault=end.fault,
        drained=instance.recycle,
    )


__all__ = ["ChildInfo", "ChildNotFound", "ProcessSpec", "Refused", "Slot", "Supervisor", "SupervisorExit"]
