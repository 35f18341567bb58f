"""``otp-agents logs PATH``: what a child wrote on stdout and stderr, read from its log files in
the state dir (so it works while the tree is down, after a crash of the supervisor itself)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from otp_agents.cli.app import main, state_dir_option
from otp_agents.errors import EXIT_NOT_FOUND
from otp_agents.runtime.logfiles import child_dir, instances, last_lines, pieces

POLL = 0.25  # seconds between looks at a followed file


@main.command("logs")
@click.argument("path")
@click.option("-n", "--lines", "count", type=click.IntRange(min=0), default=50, show_default=True)
@click.option("-f", "--follow", is_flag=True, help="Keep printing as it writes, across its restarts.")
@click.option("--previous", is_flag=True, help="The instance before the newest (the one that crashed).")
@click.option("--list", "listing", is_flag=True, help="List the instances kept, oldest first.")
@state_dir_option
def logs_cmd(path: str, count: int, follow: bool, previous: bool, listing: bool, state_dir: str) -> None:
    """Print the last lines the child at PATH wrote (its newest instance; each line is
    ``<UTC time> <out|err> <text>``)."""
    root = Path(state_dir) / "logs"
    folder = child_dir(root, path.strip("/"))
    kept = instances(folder)
    if not kept:
        _none(path, folder, root)
    if listing:
        for instance in kept:
            size = sum(p.stat().st_size for p in pieces(instance) if p.exists())
            click.echo(f"{instance.name}  {size} bytes  {len(pieces(instance)) - 1} rotated")
        return
    if previous and len(kept) < 2:
        click.echo(f"otp-agents: {path} has no instance before the newest", err=True)
        sys.exit(EXIT_NOT_FOUND)
    current = kept[-2] if previous else kept[-1]
    for line in last_lines(current, count):
        click.echo(line)
    if follow:
        try:
            _follow(folder, current)
        except KeyboardInterrupt:
            return


def _none(path: str, folder: Path, root: Path) -> None:
    children = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if children:
        click.echo(
            f"otp-agents: {path} has no log of its own; children with logs: {', '.join(children)}", err=True
        )
    else:
        click.echo(f"otp-agents: no logs for {path} in {root}", err=True)
    sys.exit(EXIT_NOT_FOUND)


def _follow(folder: Path, current: Path) -> None:
    """Print what is appended to ``current``; through its rotations; then on to newer instances."""
    offset = current.stat().st_size if current.exists() else 0
    inode = _inode(current)
    while True:
        now = _inode(current)
        if now is not None and now != inode:  # rotated: finish the old file (now .1), start anew
            _print_from(Path(f"{current}.1"), offset)
            offset, inode = 0, now
        offset = _print_from(current, offset)
        newest = instances(folder)
        if newest and newest[-1].name > current.name:
            offset = _print_from(current, offset)
            current = newest[-1]
            click.echo(f"==> {current.name} (a new instance)")
            offset, inode = 0, _inode(current)
            continue
        time.sleep(POLL)


def _print_from(file: Path, offset: int) -> int:
    try:
        with open(file, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return offset
    if data:
        sys.stdout.write(data.decode("utf-8", "replace"))
        sys.stdout.flush()
    return offset + len(data)


def _inode(file: Path) -> int | None:
    try:
        return os.stat(file).st_ino
    except OSError:
        return None
