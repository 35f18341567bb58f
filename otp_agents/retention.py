"""How much of the tree's own record it keeps on disk: stack dumps by count and age, and the
``--events`` file by size, rotated like logrotate would (``events.jsonl.1`` the newest old one).

Both run in worker threads, after a dump is written or an events batch is appended: the
supervisor's loop never waits on them.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Retention:
    dumps_keep: int = 200  # newest stack dumps kept
    dumps_max_days: float = 30.0  # older dumps are removed (0: by count only)
    events_max_mb: float = 100.0  # the events file is rotated past this size (0: never)
    events_keep: int = 5  # rotated events files kept (events.jsonl.1 .. .N)


DEFAULT = Retention()


def prune(directory: Path, suffix: str, keep: int, max_days: float) -> int:
    """Remove the files ending in ``suffix`` beyond the newest ``keep``, and any older than
    ``max_days``. Returns how many went. In a worker thread."""
    files: list[tuple[float, Path]] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.name.endswith(suffix) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    files.append((entry.stat(follow_symlinks=False).st_mtime, Path(entry.path)))
    files.sort(reverse=True)
    cutoff = time.time() - max_days * 86400 if max_days > 0 else None
    removed = 0
    for i, (mtime, path) in enumerate(files):
        if i >= keep or (cutoff is not None and mtime < cutoff):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


def rotate_if_large(fd: int, path: str, max_mb: float, keep: int) -> bool:
    """Rotate ``path`` (open as ``fd``) once it is over ``max_mb``: ``path.N-1`` -> ``path.N``,
    ..., ``path`` -> ``path.1``; the oldest beyond ``keep`` goes. The writer then reopens
    ``path`` as a new file. In a worker thread."""
    if max_mb <= 0:
        return False
    try:
        if os.fstat(fd).st_size <= max_mb * 1024 * 1024:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}.{keep}")
        for n in range(keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{path}.{n}", f"{path}.{n + 1}")
        if keep > 0:
            os.replace(path, f"{path}.1")
        else:
            os.unlink(path)
    except OSError:
        return False
    return True


__all__ = ["DEFAULT", "Retention", "prune", "rotate_if_large"]
