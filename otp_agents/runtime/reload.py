"""Reloading a running tree from its file (``otp-agents reload``, SIGHUP, ``--watch-tree``): only
the difference is applied; a file that does not load changes nothing."""

from __future__ import annotations

import logging

import anyio

from otp_agents.errors import ChildNotFound, ConfigError, Refused, StartError
from otp_agents.events import Kind
from otp_agents.redact import REDACTOR
from otp_agents.runtime.tree import Tree
from otp_agents.spec.diff import plan
from otp_agents.spec.load import load_file
from otp_agents.spec.model import CommandSpec, WorkerSpec, walk

log = logging.getLogger("otp_agents")


async def reload_tree(tree: Tree, tree_file: str, *, dry_run: bool = False) -> list[str]:
    """Re-read ``tree_file`` and apply only the difference, logged before it is applied; one
    line per change (:mod:`otp_agents.spec.diff`). ``dry_run``: the lines, nothing applied.
    :class:`Refused` (nothing changed) if the file is invalid or renames the root."""
    try:
        new = load_file(tree_file)
        if new.id != tree.root.spec.id:
            raise Refused(
                f"reload refused, nothing changed: the root id changed ({tree.root.spec.id} -> {new.id})"
            )
    except (ConfigError, Refused) as exc:
        why = str(exc) if isinstance(exc, Refused) else f"reload refused, nothing changed: {exc}"
        if not dry_run:
            log.error("%s", why)
            tree.bus.emit(Kind.RELOAD, tree.root.path, reason="refused", file=tree_file, detail=why)
        raise Refused(why) from None
    REDACTOR.learn_all(c.env for _, c in walk(new) if isinstance(c, CommandSpec | WorkerSpec))
    lines = [change.line() for change in plan(tree.root.spec, new, tree.root.path)]
    if dry_run:
        return lines
    log.info("reloading %s: %s", tree_file, "; ".join(lines) or "no changes")
    detail = "\n".join(lines) or "no changes"
    tree.bus.emit(Kind.RELOAD, tree.root.path, reason="applied", file=tree_file, detail=detail)
    await tree.root.apply_spec(new)
    return lines


async def watch_tree_file(tree: Tree, tree_file: str, every: float, loaded: bytes | None = None) -> None:
    """Reload when the file's content changes (a Kubernetes ConfigMap update swaps it in
    place). Checked every ``every`` seconds against ``loaded``, the content the tree was started
    from (read before it was loaded), so a change made while the tree was starting is applied
    at the first check. A file that does not load is refused like a ``reload`` request, and
    the tree keeps running as it was."""
    last = loaded if loaded is not None else file_content(tree_file)
    while True:
        await anyio.sleep(every)
        now = await anyio.to_thread.run_sync(file_content, tree_file)
        if now is None or now == last:
            continue
        last = now
        try:
            changes = await reload_tree(tree, tree_file)
        except (Refused, ChildNotFound, StartError) as exc:
            log.error("%s changed: %s", tree_file, exc)
            continue
        except Exception:  # a reload must never take the running tree down
            log.exception("%s changed: the reload failed", tree_file)
            continue
        log.info("%s changed, reloaded: %s", tree_file, "; ".join(changes) or "no changes")


def file_content(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None
