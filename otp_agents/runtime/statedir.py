"""The state dir belongs to one supervisor at a time.

A second supervisor started on the same state dir would unlink the first one's control socket
and mix its dumps and checkpoints in. ``claim`` takes an exclusive ``flock`` on
``supervisor.lock`` (with the holder's pid written in it) for the life of the process. The
kernel drops the lock when its holder dies, however it dies, so a supervisor killed with SIGKILL
never leaves a stale lock: the next one claims the dir and clears what is stale (the control
socket; a dead run's signal files), keeping dumps and checkpoints.

The dir is kept inaccessible to other users: mode 0700 when created here, and any
permission for "others" removed from an existing one (a group the operator gave is kept; a
mounted volume we do not own is left as it is, with a warning). The files inside are made
private anyway (dumps and checkpoints 0700 dirs, the socket 0600).
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from pathlib import Path

from otp_agents.errors import StateDirBusy

log = logging.getLogger("otp_agents")

LOCK_NAME = "supervisor.lock"


def claim(state_dir: str | Path) -> int:
    """Lock ``state_dir`` for this process; returns the lock's fd (keep it open)."""
    path = Path(state_dir)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = path.stat().st_mode & 0o777
    if mode & 0o007:  # dumps and the control socket are nobody else's business
        try:
            path.chmod(mode & ~0o007)
        except PermissionError:  # not ours (a volume mounted by someone else): say so, go on
            log.warning("state dir %s is open to other users (mode %o) and is not ours to change", path, mode)
    lock = path / LOCK_NAME
    # Never through a symlink someone planted: it would make us truncate whatever it points to.
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{lock} is not a regular file")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StateDirBusy(f"state dir {path} is in use by the supervisor with pid {holder}") from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
