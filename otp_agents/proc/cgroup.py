"""Containment in a cgroup (v2): every process of the tree, however it was started, in one group.

Process groups miss a grandchild that calls ``setsid()``; adoption (the supervisor is a child
subreaper) catches orphans only while the supervisor lives. A cgroup catches both: membership is
inherited by every descendant and cannot be left without privileges, and ``cgroup.kill`` ends
all members at once. This is what systemd's ``KillMode=control-group`` does.

The supervisor moves itself into a new cgroup ``otp-agents.PID`` beside the one it was started
in, after the guard was forked (the guard stays outside, so it can kill the group when the
supervisor dies). Each child process then gets a cgroup of its own below it
(``otp-agents.PID/root.voice.leaf-3.4711``), entered as soon as it is spawned or forked: when
the child is killed, and whenever its main process ends, everything left in its cgroup is killed
too, however it got there (``setsid``, a double fork), as systemd does for a unit.

Where no writable cgroup2 hierarchy exists (no permission, cgroup v1 only, a typical Kubernetes
pod without delegation), or ``OTP_AGENTS_CGROUP=off``, the tree runs without one: process
groups, the guard and adoption apply, and a grandchild that left its process group with
``setsid`` outlives its parent until the tree stops. ``status`` says which is in force.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

KILL_WAIT = 5.0  # seconds to wait for a killed cgroup to empty


def _mount() -> tuple[Path, str] | None:
    """Where the cgroup2 hierarchy is mounted, and which of its paths is mounted there ("/"
    unless a subtree is, as in some containers). None without one."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    fields = left.split(" ")
                    return Path(fields[4]), fields[3]
    except OSError:
        pass
    return None


def _own_path() -> str | None:
    """This process's cgroup2 path (the ``0::`` line of /proc/self/cgroup)."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def disabled() -> bool:
    """``OTP_AGENTS_CGROUP=off``: the tree makes no cgroups (to run as on a host without)."""
    return os.environ.get("OTP_AGENTS_CGROUP", "").lower() == "off"


def make_with(path: Path, pid: int) -> bool:
    """Create the cgroup ``path`` (v1 or v2) and move ``pid`` into it; False, and nothing left
    behind, if either cannot be done."""
    try:
        path.mkdir(exist_ok=True)
        (path / "cgroup.procs").write_text(f"{pid}\n")
    except OSError:
        with contextlib.suppress(OSError):
            path.rmdir()
        return False
    return True


class Cgroup:
    """A cgroup made for this tree. ``enter`` moves the calling process into it."""

    def __init__(self, path: Path, parent: Path) -> None:
        self.path = path
        self.parent = parent

    @classmethod
    def create(cls) -> tuple[Cgroup | None, str]:
        """A new cgroup beside this process's own; or None and the reason there is none."""
        if disabled():
            return None, "OTP_AGENTS_CGROUP=off"
        mounted, own = _mount(), _own_path()
        if mounted is None or own is None:
            return None, "no cgroup2 hierarchy mounted"
        mount, root = mounted
        if root != "/" and (own == root or own.startswith(root + "/")):
            own = own[len(root) :]  # our path as seen below the mounted subtree
        parent = mount / own.lstrip("/")
        path = parent / f"otp-agents.{os.getpid()}"
        try:
            path.mkdir()
        except FileExistsError:
            pass  # our pid's stale group from an earlier life of this pid: reuse it
        except OSError as exc:
            return None, f"cannot create a cgroup in {parent}: {exc.strerror or exc}"
        return cls(path, parent), str(path)

    def child(self, name: str, pid: int) -> Cgroup | None:
        """A cgroup below this one with ``pid`` moved in; None if that cannot be done."""
        path = self.path / name
        return Cgroup(path, self.path) if make_with(path, pid) else None

    def enter(self) -> str | None:
        """Move this process in (its future children follow); an error text if it could not."""
        try:
            (self.path / "cgroup.procs").write_text(f"{os.getpid()}\n")
        except OSError as exc:
            self.remove()
            return f"cannot join {self.path}: {exc.strerror or exc}"
        return None

    def leave(self) -> bool:
        """Move this process back to the parent group (before the group is killed)."""
        try:
            (self.path.parent / "cgroup.procs").write_text(f"{os.getpid()}\n")
        except OSError:
            return False
        return True

    def pids(self) -> list[int]:
        """Every member, in this cgroup and the children's below it."""
        out: list[int] = []
        for group in self._groups():
            with contextlib.suppress(OSError, ValueError):
                out += [int(p) for p in (group / "cgroup.procs").read_text().split()]
        return out

    def _groups(self) -> list[Path]:
        """This cgroup and every one below it, deepest first."""
        below: list[Path] = []
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.path):
                if entry.is_dir(follow_symlinks=False):
                    below += Cgroup(Path(entry.path), self.path)._groups()
        return [*below, self.path]

    def kill(self) -> None:
        """SIGKILL every member (``cgroup.kill``; one by one on kernels without it)."""
        try:
            (self.path / "cgroup.kill").write_text("1\n")
            return
        except OSError:
            pass
        for _ in range(100):  # bounded: members forking while we kill them
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def wait_empty(self, limit: float = KILL_WAIT) -> bool:
        deadline = time.monotonic() + limit
        while self.pids():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def remove(self) -> bool:
        """Remove this cgroup and the (empty) ones below it; False if one is still in use."""
        for group in self._groups():
            try:
                group.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                return False
        return True
