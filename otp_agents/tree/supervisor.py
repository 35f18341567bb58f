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
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.lowlevel
import msgspec

from otp_agents.errors import ChildNotFound, Refused, StartAborted, StartError
from otp_agents.events import Kind
from otp_agents.spec.model import (
    Backoff,
    ChildSpec,
    CommandSpec,
    ProcessSpec,
    Strategy,
    SupervisorSpec,
    WorkerSpec,
    ZygoteSpec,
)
from otp_agents.tree import rules
from otp_agents.tree.ports import ChildHandle, EngineHost
from otp_agents.tree.rules import Decision, GiveUp, GiveUpReason, Nothing, Restart, Status

log = logging.getLogger("otp_agents")

MAILBOX_LIMIT = 100_000


class ExitLike(Protocol):
    @property
    def normal(self) -> bool: ...

    def describe(self) -> str: ...


class _SlotFailed(Exception):
    def __init__(self, slot: Slot, error: StartError) -> None:
        super().__init__(str(error))
        self.slot = slot
        self.error = error


def _starts_alone(spec: ChildSpec) -> bool:
    """Zygotes and supervisors are what later children may need: they never start alongside."""
    return isinstance(spec, SupervisorSpec | ZygoteSpec)


@dataclass(frozen=True)
class SupervisorExit:
    """How a supervisor ended. Like OTP, a supervisor that gives up exits with ``shutdown``."""

    reason: str  # "shutdown" (asked), reached_max_restart_intensity, auto_shutdown, killed
    requested: bool
    child: str | None = None  # the child whose exit made it give up
    cause: str | None = None  # how that child ended

    @property
    def normal(self) -> bool:
        return self.reason != "killed" or self.requested

    def describe(self) -> str:
        if self.child is None:
            return self.reason
        if self.cause is None:
            return f"{self.reason} after {self.child} ended"
        return f"{self.reason} after {self.child} ended ({self.cause})"


# -- mailbox messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildDown:
    slot_id: str
    instance: ChildHandle | Supervisor


@dataclass(frozen=True)
class TryAgain:
    slot_id: str


@dataclass(frozen=True)
class StartLater:
    child: str
    ids: tuple[str, ...]


@dataclass(frozen=True)
class Stop:
    pass


@dataclass
class Call:
    fn: Callable[[], Awaitable[Any]]
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Any = None
    error: BaseException | None = None


Msg = ChildDown | TryAgain | StartLater | Stop | Call


class Mailbox:
    def __init__(self) -> None:
        self._items: deque[Msg] = deque()
        self._wake = anyio.Event()

    def put(self, msg: Msg) -> None:
        if len(self._items) >= MAILBOX_LIMIT:
            raise RuntimeError("supervisor mailbox full")
        self._items.append(msg)
        self._wake.set()

    async def get(self) -> Msg:
        while not self._items:
            await self._wake.wait()
            self._wake = anyio.Event()
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


# -- child slots -----------------------------------------------------------------------------


@dataclass
class Slot:
    """A child position: its spec, its path and the running instance, if any."""

    spec: ChildSpec
    path: str
    instance: ChildHandle | Supervisor | None = None
    started_at: float = 0.0
    restarts: int = 0  # restarts of this child since the supervisor started
    in_a_row: int = 0  # consecutive quick restarts, for backoff

    @property
    def id(self) -> str:
        return self.spec.id


@dataclass(frozen=True)
class ChildInfo:
    """One row of ``which_children``."""

    id: str
    path: str
    kind: str  # worker | command | supervisor
    status: str  # running | stopped | restarting | held (stopped by an operator)
    pid: int | None
    restarts: int
    started_at: float | None


class Supervisor:
    """A running supervisor node. Build the tree with :func:`otp_agents.runtime.Runtime`."""

    def __init__(
        self,
        spec: SupervisorSpec,
        path: str,
        host: EngineHost,
        notify_parent: Callable[[Supervisor], None] | None = None,
    ) -> None:
        self.spec = spec
        self.path = path
        self.host = host
        self.exit: SupervisorExit | None = None
        self.finished = anyio.Event()
        self.started_at = time.monotonic()
        self._notify_parent = notify_parent
        self._mailbox = Mailbox()
        self._busy = False
        self._scope: anyio.CancelScope | None = None
        self._dynamic = spec.strategy is Strategy.SIMPLE_ONE_FOR_ONE
        self._next_dynamic = 1
        self.state = rules.SupState(
            strategy=spec.strategy,
            intensity=spec.intensity,
            period=spec.period,
            auto_shutdown=spec.auto_shutdown,
        )
        self.slots: dict[str, Slot] = {}
        if not self._dynamic:
            for child in spec.children:
                self._add_slot(child)

    # -- public API (OTP's supervisor functions) -------------------------------------------------

    async def start(self) -> None:
        """Start the children in order, each started before the next (OTP's init).

        On failure the children already started are terminated in reverse order and
        :class:`StartError` is raised; nothing of this supervisor is left running.
        """
        self.host.bus.emit(Kind.SUPERVISOR_STARTED, self.path, detail=self.spec.strategy.value)
        if self._dynamic:
            # It starts with no children: checkpoints left below it (its previous run was killed
            # before it could delete its children) belong to nobody and must not be handed to a
            # new child that happens to get the same id.
            await self.host.clear_checkpoints_under(self.path)
        try:
            await self._start_children()
        except StartAborted:
            await self._terminate_all()
            self.exit = SupervisorExit("shutdown", requested=True)
            self.finished.set()
            self.host.bus.emit(Kind.SUPERVISOR_STOPPED, self.path, reason="shutdown", requested=True)
            raise
        except _SlotFailed as failed:
            slot, exc = failed.slot, failed.error
            await self._terminate_all()
            self.exit = SupervisorExit("start_failed", requested=False, child=slot.path, cause=str(exc))
            self.finished.set()
            self.host.bus.emit(Kind.SUPERVISOR_STOPPED, self.path, reason="start_failed", child=slot.path)
            raise StartError(f"{slot.path}: {exc}") from None
        self.host.tg.start_soon(self._loop, name=f"supervisor {self.path}")

    async def _start_children(self) -> None:
        """Start the children in list order. With ``start_concurrency`` N > 1, up to N worker and
        command children start at once, still launched in list order; a zygote or a supervisor
        child starts alone, after everything before it is started and before anything after it.
        The first failure stops further launches; the starts in flight are let finish."""
        width = self.spec.start_concurrency
        slots = list(self.slots.values())
        i = 0
        while i < len(slots):
            run = [slots[i]]
            if width > 1 and not _starts_alone(slots[i].spec):
                while i + len(run) < len(slots) and not _starts_alone(slots[i + len(run)].spec):
                    run.append(slots[i + len(run)])
            i += len(run)
            if len(run) == 1:
                if self.host.stopping:
                    raise StartAborted("the tree is stopping")
                try:
                    await self._start_slot(run[0])
                except StartAborted:
                    raise
                except StartError as exc:
                    raise _SlotFailed(run[0], exc) from None
            else:
                await self._start_concurrently(run, width)

    async def _start_concurrently(self, run: list[Slot], width: int) -> None:
        failures: list[tuple[int, _SlotFailed]] = []
        aborted: StartAborted | None = None
        room = anyio.Semaphore(width)

        async def start_one(index: int, slot: Slot) -> None:
            nonlocal aborted
            try:
                await self._start_slot(slot)
            except StartAborted as exc:
                aborted = aborted or exc
            except StartError as exc:
                failures.append((index, _SlotFailed(slot, exc)))
            except Exception as exc:  # never cancel the sibling starts: fail this one, named
                log.exception("%s: start failed unexpectedly", slot.path)
                failures.append((index, _SlotFailed(slot, StartError(f"{type(exc).__name__}: {exc}"))))
            finally:
                room.release()

        async with anyio.create_task_group() as tg:
            for index, slot in enumerate(run):
                await room.acquire()
                if failures or aborted is not None or self.host.stopping:
                    room.release()
                    break
                tg.start_soon(start_one, index, slot, name=f"start {slot.path}")
        if aborted is not None or (self.host.stopping and not failures):
            raise aborted or StartAborted("the tree is stopping")
        if failures:
            raise min(failures, key=lambda f: f[0])[1]  # the first in list order, as OTP would

    async def stop(self) -> None:
        """Terminate all children in reverse start order, then end (the parent's request)."""
        if self.exit is None:
            self._mailbox.put(Stop())
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
        procs = [
            s.instance for _, s in pairs if s.instance is not None and not isinstance(s.instance, Supervisor)
        ]
        for proc in procs:
            proc.kill()
        for proc in procs:
            await proc.wait_killed()
        for sup in sups.values():
            sup.finished.set()
        self.host.bus.emit(Kind.SUPERVISOR_STOPPED, self.path, reason="killed", requested=True)

    async def start_child(self, args: list[str] | None = None) -> str:
        """simple_one_for_one: start one more instance of the template; returns its path."""
        return await self._call(lambda: self._start_dynamic(list(args or [])))  # type: ignore[no-any-return]

    async def terminate_child(self, child_id: str) -> None:
        """Stop a child; it stays in the child list (unless temporary) and is not restarted."""
        await self._call(lambda: self._terminate_child(child_id))

    async def restart_child(self, child_id: str) -> None:
        """Start a stopped child again (OTP's restart_child)."""
        await self._call(lambda: self._restart_child(child_id))

    async def apply_spec(self, new: SupervisorSpec) -> list[str]:
        """Reload: make this supervisor run ``new``, touching only what changed.

        Removed children are stopped, added ones started, changed ones restarted with their new
        spec; unchanged children keep running (same pid). A nested supervisor whose own settings
        are unchanged is updated in place, recursively. Returns one line per change.
        """
        return await self._call(lambda: self._apply_spec(new))  # type: ignore[no-any-return]

    async def operator_restart(self, child_id: str) -> None:
        """Stop a child and start it again (``otp-agents restart``)."""
        await self._call(lambda: self._operator_restart(child_id))

    def which_children(self) -> list[ChildInfo]:
        """Answered from current state, without waiting for the mailbox."""
        out = []
        for rec in self.state.children:
            slot = self.slots[rec.id]
            inst = slot.instance
            kind = "supervisor" if isinstance(slot.spec, SupervisorSpec) else slot.spec.__struct_config__.tag
            out.append(
                ChildInfo(
                    id=rec.id,
                    path=slot.path,
                    kind=str(kind),
                    status="held" if rec.held and rec.status is not Status.RUNNING else rec.status.value,
                    pid=inst.pid if inst is not None and not isinstance(inst, Supervisor) else None,
                    restarts=slot.restarts,
                    started_at=slot.started_at if inst is not None else None,
                )
            )
        return out

    def child(self, child_id: str) -> Slot:
        try:
            return self.slots[child_id]
        except KeyError:
            raise ChildNotFound(f"{self.path}/{child_id}") from None

    # -- mailbox loop ----------------------------------------------------------------------------

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
                    try:
                        await self._handle(msg)
                    except Exception:
                        # A bug in handling one message must not take the supervisor down.
                        log.exception("%s: error while handling %s", self.path, type(msg).__name__)
                    finally:
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
            await self._apply(rules.try_again(self.state, msg.slot_id, time.monotonic()), immediate=True)
        elif isinstance(msg, StartLater):
            rec = self.state.find(msg.child)
            if rec is not None and rec.status is Status.RESTARTING:
                rec.status = Status.STOPPED
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

    # -- handling one event ----------------------------------------------------------------------

    async def _on_child_down(self, slot_id: str, instance: ChildHandle | Supervisor) -> None:
        slot = self.slots.get(slot_id)
        if slot is None or slot.instance is not instance:
            return  # stale: the supervisor already stopped this instance itself
        slot.instance = None
        ex = self._exit_of(instance)
        self._emit_exit(slot, instance, ex)
        if not isinstance(instance, Supervisor) and instance.recycle is not None and ex.normal:
            await self._recycled(slot, instance.recycle)
            return
        decision = rules.child_exited(self.state, slot_id, ex.normal, time.monotonic())
        self._drop_removed()
        await self._apply(decision, cause=(slot.path, ex.describe()), crashed=slot)

    async def _apply(
        self,
        decision: Decision,
        cause: tuple[str, str] | None = None,
        crashed: Slot | None = None,
        immediate: bool = False,
    ) -> None:
        if isinstance(decision, Nothing):
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
        await self._run_plan(decision, crashed, immediate)

    async def _run_plan(self, plan: Restart, crashed: Slot | None, immediate: bool) -> None:
        slot = self.slots.get(plan.child)
        self.host.bus.emit(
            Kind.RESTARTING,
            f"{self.path}/{plan.child}",
            detail=self.spec.strategy.value,
            reason=",".join(plan.start) if len(plan.start) > 1 else None,
        )
        for cid in plan.terminate:
            await self._terminate_slot(cid)
        if slot is None:
            return
        delay = 0.0 if immediate else self._backoff_delay(slot)
        if delay > 0:
            rules.start_failed(self.state, plan.child)  # held as "restarting" until the timer fires
            self.host.bus.emit(Kind.RESTART_DELAYED, slot.path, delay=round(delay, 4))
            self.host.tg.start_soon(self._timer, delay, StartLater(plan.child, plan.start))
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
                rules.start_failed(self.state, cid)
                delay = self._backoff_delay(slot)
                if delay > 0:
                    self.host.bus.emit(Kind.RESTART_DELAYED, slot.path, delay=round(delay, 4))
                    self.host.tg.start_soon(self._timer, delay, TryAgain(cid))
                else:
                    self._post(TryAgain(cid))
                return
            slot.restarts += 1

    async def _recycled(self, slot: Slot, why: str) -> None:
        """The child drained and ended as asked: start it again (no intensity, no siblings)."""
        again = rules.child_recycled(self.state, slot.id)
        self.host.bus.emit(Kind.RECYCLED, slot.path, reason=why, detail="restart" if again else "removed")
        self._drop_removed()
        if again:
            await self._start_ids(slot.id, (slot.id,))

    async def _timer(self, delay: float, msg: Msg) -> None:
        await anyio.sleep(delay)
        self._post(msg)

    def _backoff_delay(self, slot: Slot) -> float:
        backoff: Backoff | None = slot.spec.backoff
        if backoff is None:
            return 0.0
        if slot.started_at and time.monotonic() - slot.started_at >= backoff.reset_after:
            slot.in_a_row = 0
        n = slot.in_a_row
        slot.in_a_row += 1
        base = min(backoff.max, backoff.initial * backoff.factor**n)
        return max(0.0, base * (1 + backoff.jitter * random.uniform(-1, 1)))

    # -- starting and stopping children --------------------------------------------------------

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
                self.host.bus.emit(Kind.START_FAILED, slot.path, detail=str(exc))
            raise
        slot.started_at = time.monotonic()
        rules.child_started(self.state, slot.id)

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
            if not isinstance(inst, Supervisor):
                killed = await inst.stop()
                self._emit_terminated(slot, inst, killed)
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

    # -- operator requests (run inside the mailbox) --------------------------------------------

    async def _start_dynamic(self, args: list[str]) -> str:
        if not self._dynamic:
            raise Refused(f"{self.path} is not a simple_one_for_one supervisor")
        cap = self.spec.max_children
        if cap is not None and len(self.state.children) >= cap:
            raise Refused(f"{self.path} already has max_children={cap} children")
        template = self.spec.children[0]
        child_id = f"{template.id}-{self._next_dynamic}"
        self._next_dynamic += 1
        slot = self._add_slot(_with_args(template, child_id, args))
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
        self.host.bus.emit(Kind.RESTARTING, f"{self.path}/{child_id}", detail="operator")
        await self._terminate_slot(child_id)
        rec = self.state.find(child_id)
        if rec is None:  # a temporary child leaves when stopped
            raise Refused(f"{self.path}/{child_id} is temporary: stopped, not restarted")
        rec.held = False
        rec.status = Status.STOPPED
        await self._start_slot(self.slots[child_id])

    async def _apply_spec(self, new: SupervisorSpec) -> list[str]:
        changes: list[str] = []
        if _flags(self.spec) != _flags(new):
            self.state.strategy, self.state.intensity = new.strategy, new.intensity
            self.state.period, self.state.auto_shutdown = new.period, new.auto_shutdown
            changes.append(f"~ {self.path}: supervisor settings")
        if self._dynamic:
            if self.spec.children != new.children:
                changes.append(f"~ {self.path}: child template (applies to children started from now on)")
            self.spec = new
            return changes
        old_specs = {c.id: c for c in self.spec.children}
        wanted = {c.id: c for c in new.children}
        for rec in reversed(list(self.state.children)):  # removed: reverse start order
            if rec.id not in wanted:
                await self._terminate_slot(rec.id)
                if self.state.find(rec.id) is not None:
                    self.state.children.remove(rec)
                self.slots.pop(rec.id, None)
                changes.append(f"- {self.path}/{rec.id}")
        to_start: list[str] = []
        for child in new.children:
            old = old_specs.get(child.id)
            slot = self.slots.get(child.id)
            if old is None or slot is None:
                self._add_slot(child)
                to_start.append(child.id)
                changes.append(f"+ {self.path}/{child.id}")
            elif old != child:
                inst = slot.instance
                if (
                    isinstance(old, SupervisorSpec)
                    and isinstance(child, SupervisorSpec)
                    and _flags(old) == _flags(child)
                    and isinstance(inst, Supervisor)
                ):
                    changes.extend(await inst.apply_spec(child))
                    slot.spec = child
                    continue
                await self._terminate_slot(child.id)
                slot = self.slots.get(child.id) or self._add_slot(child)
                slot.spec = child
                changed = self.state.find(child.id)
                assert changed is not None
                changed.restart, changed.significant = child.restart, child.significant
                to_start.append(child.id)
                changes.append(f"~ {self.path}/{child.id}")
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
        return changes

    # -- helpers -------------------------------------------------------------------------------

    def _add_slot(self, spec: ChildSpec) -> Slot:
        slot = Slot(spec=spec, path=f"{self.path}/{spec.id}")
        self.slots[spec.id] = slot
        self.state.children.append(rules.ChildRec(spec.id, spec.restart, spec.significant))
        return slot

    def _drop_removed(self) -> None:
        if len(self.slots) != len(self.state.children):
            live = {rec.id for rec in self.state.children}
            for sid in [s for s in self.slots if s not in live]:
                self._forget_checkpoint(self.slots.pop(sid))

    def _forget_checkpoint(self, slot: Slot) -> None:
        """A child deleted for good (dynamic or temporary) takes its checkpoint along."""
        if isinstance(slot.spec, WorkerSpec):
            self.host.forget_checkpoint(slot.path)

    def _all_slots(self) -> list[tuple[Supervisor, Slot]]:
        out: list[tuple[Supervisor, Slot]] = []
        for slot in self.slots.values():
            out.append((self, slot))
            if isinstance(slot.instance, Supervisor):
                out.extend(slot.instance._all_slots())
        return out

    @staticmethod
    def _exit_of(instance: ChildHandle | Supervisor) -> ExitLike:
        ex = instance.exit
        assert ex is not None
        return ex

    def _emit_exit(self, slot: Slot, instance: ChildHandle | Supervisor, ex: ExitLike) -> None:
        if not isinstance(instance, Supervisor) and instance.exit is not None:
            st = instance.exit.status
            self.host.bus.emit(
                Kind.CHILD_EXITED,
                slot.path,
                pid=instance.pid,
                code=st.code,
                signal=_signame(st.signal),
                requested=False,
                reason=instance.exit.fault or ("normal" if ex.normal else "crash"),
                detail=instance.last_words,
            )

    def _emit_terminated(self, slot: Slot, proc: ChildHandle, killed: bool) -> None:
        st = proc.exit.status if proc.exit else None
        self.host.bus.emit(
            Kind.CHILD_TERMINATED,
            slot.path,
            pid=proc.pid,
            code=st.code if st else None,
            signal=_signame(st.signal) if st else None,
            requested=True,
            killed=killed,
        )


def _flags(spec: SupervisorSpec) -> SupervisorSpec:
    """A supervisor spec without its children: what a reload must restart it for."""
    return msgspec.structs.replace(spec, children=[])


def _signame(sig: int | None) -> str | None:
    if sig is None:
        return None
    from otp_agents.linux import signal_name

    return signal_name(sig)


def _with_args(template: ChildSpec, child_id: str, args: list[str]) -> ChildSpec:
    """A dynamic child: the template with a fresh id and extra arguments appended (as OTP does)."""
    if isinstance(template, CommandSpec):
        return msgspec.structs.replace(template, id=child_id, command=[*template.command, *args])
    if isinstance(template, WorkerSpec):
        return msgspec.structs.replace(template, id=child_id, args=[*template.args, *args])
    if args:
        raise Refused("a dynamic supervisor child takes no arguments")
    return msgspec.structs.replace(template, id=child_id)


__all__ = ["ChildInfo", "ChildNotFound", "ProcessSpec", "Refused", "Supervisor", "SupervisorExit"]
