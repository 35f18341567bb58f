"""A supervisor's start: its children in order, each started before the next (OTP's init), or
up to ``start_concurrency`` at once; on a failure, those already started are stopped again."""

from __future__ import annotations

import logging

import anyio

from otp_agents.errors import StartAborted, StartError
from otp_agents.events import Kind
from otp_agents.spec.model import ChildSpec, SupervisorSpec, ZygoteSpec
from otp_agents.tree.node import Node, Slot, SupervisorExit

log = logging.getLogger("otp_agents")


class _SlotFailed(Exception):
    def __init__(self, slot: Slot, error: StartError) -> None:
        super().__init__(str(error))
        self.slot = slot
        self.error = error


def _starts_alone(spec: ChildSpec) -> bool:
    """Zygotes and supervisors are what later children may need: they never start alongside."""
    return isinstance(spec, SupervisorSpec | ZygoteSpec)


class Startup(Node):
    _dynamic: bool

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
        self._begin()

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

    def _begin(self) -> None:
        """Start serving the mailbox."""
        raise NotImplementedError
