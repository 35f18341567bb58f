"""Where the children's log files are: ``STATE_DIR/logs/<child path>/<start>-<pid>.log``, each
rotated into ``.1`` ... ``.N``. Shared by the writer (:mod:`otp_agents.runtime.logs`) and
``otp-agents logs``, which reads the files directly (so it works when the tree is down)."""

from __future__ import annotations

import time
from pathlib import Path


def instance_name(started: float, pid: int) -> str:
    """``20261206T010203-12345.log``: sorts by start time, names the pid."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(started)) + f"-{pid}.log"


def child_dir(root: Path, path: str) -> Path:
    """A child's log folder: its path in the tree (ids have no ``/`` and no ``..``)."""
    return root.joinpath(*path.split("/"))


def instances(folder: Path) -> list[Path]:
    """A child path's instance files, oldest first (rotated pieces not included)."""
    try:
        return sorted(p for p in folder.iterdir() if p.suffix == ".log" and p.is_file())
    except OSError:
        return []


def pieces(instance: Path) -> list[Path]:
    """An instance's files, oldest first: ``x.log.N`` ... ``x.log.1``, ``x.log``."""
    rotated = []
    for piece in instance.parent.glob(instance.name + ".*"):
        suffix = piece.name[len(instance.name) + 1 :]
        if suffix.isdigit():
            rotated.append((int(suffix), piece))
    return [p for _, p in sorted(rotated, reverse=True)] + ([instance] if instance.exists() else [])


def last_lines(instance: Path, count: int) -> list[str]:
    """The last ``count`` lines of an instance, across its rotated pieces."""
    out: list[str] = []
    for piece in reversed(pieces(instance)):
        try:
            lines = piece.read_text(errors="replace").splitlines()
        except OSError:
            continue
        out = lines + out
        if len(out) >= count:
            break
    return out[-count:] if count else []
