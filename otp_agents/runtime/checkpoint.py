"""Crash-resume checkpoints: a worker's last small state, handed back whenever it (re)starts.

A protocol worker sends ``Checkpoint(data)`` when its state changes; the supervisor keeps the
newest one per child path, in memory and, when there is a state dir and the child's
``checkpoint_store`` is ``disk``, on disk (``memory``: never written, so a restart of the
supervisor itself starts the child afresh), and puts it in the
``Welcome`` of the child's next start: after a crash, a hang kill, a recycle, an operator restart
or a restart of the supervisor itself. It is forgotten only when the worker sends an empty
checkpoint, or when the child leaves the tree for good (a dynamic or temporary child deleted).

Disk writes never run on the supervisor's loop: :meth:`CheckpointStore.put` records the newest
data per path and one writer task hands the batch to a worker thread, so a child that checkpoints
faster than the disk writes has only its newest state queued. Each file is written under a
temporary name and renamed over the old one, so a reader finds the old or the new checkpoint,
never half of one. There is no fsync: the aim is surviving process crashes; after a power loss
the header's CRC turns a torn file into an event and a fresh start.

File format, ``STATE_DIR/checkpoints/<percent-encoded path>.ckpt``::

    b"OTPCKPT1" | data length (4 bytes, big-endian) | CRC-32 of data (4 bytes, big-endian) | data
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path
from urllib.parse import quote, unquote

import anyio
import anyio.abc
import anyio.to_thread

from otp_agents.errors import OtpAgentsError
from otp_agents.events import EventBus, Kind
from otp_agents.wire.messages import MAX_CHECKPOINT

log = logging.getLogger("otp_agents")

MAGIC = b"OTPCKPT1"
_HEADER = struct.Struct(">8sII")
SUFFIX = ".ckpt"


def file_name(path: str) -> str:
    """``root/voice/leaf-3`` -> ``root%2Fvoice%2Fleaf-3.ckpt`` (reversible, prefix-preserving)."""
    return quote(path, safe="") + SUFFIX


def encode_file(data: bytes) -> bytes:
    return _HEADER.pack(MAGIC, len(data), zlib.crc32(data)) + data


class Damaged(OtpAgentsError):
    """A checkpoint file that cannot be trusted. ``reason`` is a short word for events."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def decode_file(raw: bytes, limit: int) -> bytes:
    """The data of a checkpoint file, or :class:`Damaged`. ``raw`` may be cut after limit + 1
    data bytes: anything longer is refused on its header."""
    if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
        raise Damaged("bad_magic", "not a checkpoint file (wrong magic)")
    if len(raw) < _HEADER.size:
        raise Damaged("truncated", f"header cut short ({len(raw)} bytes)")
    _, size, crc = _HEADER.unpack_from(raw)
    if size > limit:
        raise Damaged("too_large", f"{size} bytes, over the limit of {limit}")
    data = raw[_HEADER.size :]
    if len(data) < size:
        raise Damaged("truncated", f"{len(data)} of {size} bytes")
    if len(data) > size:
        raise Damaged("bad_length", f"{len(data) - size} bytes after the declared {size}")
    if zlib.crc32(data) != crc:
        raise Damaged("bad_crc", f"CRC mismatch over {size} bytes")
    return data


def _read_file(file: Path, limit: int) -> tuple[bytes | None, Damaged | None]:
    """In a worker thread: the file's data, or why it was set aside (renamed to ``.bad``)."""
    try:
        with open(file, "rb") as f:
            raw = f.read(_HEADER.size + limit + 1)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, Damaged("unreadable", exc.strerror or str(exc))
    try:
        return decode_file(raw, limit), None
    except Damaged as exc:
        try:
            os.replace(file, file.with_name(file.name + ".bad"))
        except OSError:
            file.unlink(missing_ok=True)
        return None, exc


class CheckpointStore:
    """The newest checkpoint of every child, by path. Lives in the supervisor's loop."""

    def __init__(self, state_dir: Path | None, bus: EventBus, tg: anyio.abc.TaskGroup | None = None) -> None:
        self.dir = state_dir / "checkpoints" if state_dir is not None else None
        self._bus = bus
        self._tg = tg  # where the writer task runs; without one, writes wait for flush()
        self._mem: dict[str, bytes] = {}
        self._pending: dict[str, bytes | None] = {}  # newest unwritten state per path; None: delete
        self._disk: set[str] = set()  # paths this run wrote to disk or read from it
        self._writing = False
        self._written: anyio.Event | None = None
        # Paths with a file from an earlier run not read yet (listed once, on first need), so a
        # child without a checkpoint costs no disk access at all.
        self._leftover: set[str] | None = None

    def file(self, path: str) -> Path | None:
        return self.dir / file_name(path) if self.dir is not None else None

    # -- the supervisor's side -------------------------------------------------------------------

    def put(self, path: str, data: bytes, limit: int, pid: int | None = None, *, disk: bool = True) -> None:
        """Keep ``data`` as ``path``'s checkpoint (``disk``: on disk too); empty data forgets it.
        Never blocks."""
        size = len(data)
        if not size:
            self.clear(path)
            self._bus.emit(Kind.CHECKPOINT, path, pid=pid, value=0, reason="cleared")
            return
        if size > limit:
            # The previous checkpoint stays: resuming from older state beats losing all of it.
            reason = "disabled" if limit == 0 else "too_large"
            self._bus.emit(Kind.CHECKPOINT_DROPPED, path, pid=pid, reason=reason, value=size, threshold=limit)
            return
        on_disk = path in self._disk
        self._mem[path] = data
        if self._leftover is not None:
            on_disk = on_disk or path in self._leftover
            self._leftover.discard(path)
        if self.dir is not None and disk:
            self._disk.add(path)
            self._pending[path] = data
            self._kick()
        elif on_disk:  # now memory-only: what an earlier setting wrote goes
            self._disk.discard(path)
            self._pending[path] = None
            self._kick()
        self._bus.emit(Kind.CHECKPOINT, path, pid=pid, value=size)

    def clear(self, path: str) -> None:
        """Forget ``path``'s checkpoint, in memory and on disk."""
        known = self._mem.pop(path, None) is not None or path in self._pending
        self._disk.discard(path)
        if self._leftover is not None:
            known = known or path in self._leftover
            self._leftover.discard(path)
        if self.dir is not None and (known or self._leftover is None):
            self._pending[path] = None
            self._kick()

    async def clear_under(self, prefix: str) -> None:
        """Forget every checkpoint below ``prefix``: a simple_one_for_one supervisor starts with
        no children, so anything left there (its previous run was killed) belongs to nobody."""
        await self._load_listing()
        below = prefix + "/"
        for path in [p for p in (*self._mem, *(self._leftover or ())) if p.startswith(below)]:
            self.clear(path)

    async def get(self, path: str, limit: int = MAX_CHECKPOINT) -> bytes | None:
        """``path``'s checkpoint: from memory, else from a file an earlier run left. Never raises:
        a damaged file is reported, set aside, and the child starts fresh."""
        if path in self._mem:
            return self._mem[path]
        if self.dir is None or path in self._pending:  # pending without memory: a delete
            return None
        file = self.dir / file_name(path)
        try:
            await self._load_listing()
            if self._leftover is None or path not in self._leftover:
                return None
            self._leftover.discard(path)
            data, damage = await anyio.to_thread.run_sync(_read_file, file, limit)
        except Exception:  # a bug here must cost the checkpoint, never the start
            log.exception("%s: cannot read checkpoint %s", path, file)
            return None
        if damage is not None:
            self._bus.emit(
                Kind.CHECKPOINT_DROPPED,
                path,
                reason=damage.reason,
                file=str(file),
                detail=f"{damage} (set aside as {file.name}.bad; starting fresh)",
            )
            return None
        if data is not None and path not in self._pending:
            self._mem[path] = data
            self._disk.add(path)  # on disk: a memory-only put takes it off
        return data

    async def flush(self) -> None:
        """Wait until every checkpoint so far is on disk (the runtime calls it at the end)."""
        while self._writing:
            if self._written is None or self._written.is_set():
                self._written = anyio.Event()
            await self._written.wait()
        if self._pending:
            self._writing = True
            await self._drain()

    # -- disk --------------------------------------------------------------------------------------

    def _kick(self) -> None:
        if not self._writing and self._tg is not None:
            self._writing = True
            self._tg.start_soon(self._drain, name="checkpoint writer")

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, {}
                failures = await anyio.to_thread.run_sync(self._write, batch)
                for path, file, problem in failures:
                    log.warning("%s: cannot write checkpoint %s: %s", path, file, problem)
                    self._bus.emit(
                        Kind.CHECKPOINT_DROPPED,
                        path,
                        reason="write_failed",
                        file=file,
                        detail=f"{problem} (kept in memory only)",
                    )
        finally:
            self._writing = False
            if self._written is not None:
                self._written.set()

    def _write(self, batch: dict[str, bytes | None]) -> list[tuple[str, str, str]]:
        """In a worker thread: write or delete each file of the batch; returns the failures."""
        assert self.dir is not None
        failures: list[tuple[str, str, str]] = []
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            return [(path, str(self.dir), exc.strerror or str(exc)) for path in batch]
        for path, data in batch.items():
            file = self.dir / file_name(path)
            try:
                if data is None:
                    file.unlink(missing_ok=True)
                else:
                    tmp = file.with_name(file.name + ".tmp")
                    tmp.write_bytes(encode_file(data))
                    os.replace(tmp, file)
            except OSError as exc:
                failures.append((path, str(file), exc.strerror or str(exc)))
        return failures

    async def _load_listing(self) -> None:
        if self._leftover is not None or self.dir is None:
            return
        found = await anyio.to_thread.run_sync(_list, self.dir)
        if self._leftover is None:  # a concurrent first call may have filled it meanwhile
            self._leftover = {p for p in found if p not in self._mem and p not in self._pending}


def _list(directory: Path) -> set[str]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return set()
    except OSError as exc:
        log.warning("cannot list checkpoints in %s: %s", directory, exc.strerror or exc)
        return set()
    return {unquote(n[: -len(SUFFIX)]) for n in names if n.endswith(SUFFIX)}
