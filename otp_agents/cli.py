"""``otp-agents``: run and check supervision trees."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import anyio
import click

from . import guard
from .config import ConfigError, load_file
from .runtime import EXIT_CONFIG, run
from .spec import HEALTH_DEFAULTS, ChildSpec, CommandSpec, SupervisorSpec, WorkerSpec

DEFAULT_TREE = "supervisors/default.toml"


def _tree_path(tree: str | None) -> str:
    return tree or os.environ.get("OTP_AGENTS_TREE") or DEFAULT_TREE


def _load(tree: str | None) -> SupervisorSpec:
    path = _tree_path(tree)
    try:
        return load_file(path)
    except ConfigError as exc:
        click.echo(f"otp-agents: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Erlang/OTP-style supervision trees for OS processes."""


@main.command("run")
@click.argument("tree", required=False)
@click.option("--backend", type=click.Choice(["asyncio", "trio"]), default="asyncio", show_default=True)
@click.option("--events", "events_file", type=click.Path(dir_okay=False), help="Append events as JSON lines.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    envvar="OTP_AGENTS_STATE_DIR",
    default="state",
    show_default=True,
    help="Where stack dumps (dumps/) are kept.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def run_cmd(tree: str | None, backend: str, events_file: str | None, state_dir: str, log_level: str) -> None:
    """Run TREE (default: $OTP_AGENTS_TREE or supervisors/default.toml) until stopped.

    SIGTERM or Ctrl-C stops the tree in reverse start order; a second one kills it.
    Exit codes: 0 stopped, 1 the root supervisor gave up, 2 bad tree file, 3 start failed.
    """
    spec = _load(tree)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)-7s %(message)s",
    )
    keeper = guard.start()  # before the event loop: forking is only safe without threads
    try:
        outcome = anyio.run(
            lambda: run(spec, events_file=events_file, guard=keeper, state_dir=state_dir), backend=backend
        )
    finally:
        keeper.close()
    click.echo(f"otp-agents: {outcome.message}", err=True)
    sys.exit(outcome.code)


@main.command("check")
@click.argument("tree", required=False)
def check_cmd(tree: str | None) -> None:
    """Validate TREE and print it, without starting anything."""
    spec = _load(tree)
    click.echo(f"{_tree_path(tree)}: ok")
    for line in describe(spec):
        click.echo(line)
    for warning in _warnings(spec):
        click.echo(f"warning: {warning}", err=True)


def describe(spec: SupervisorSpec, path: str | None = None, depth: int = 0) -> list[str]:
    """The tree as indented lines (what ``check`` prints)."""
    here = path or spec.id
    pad = "  " * depth
    head = f"{pad}{here}  supervisor {spec.strategy.value} intensity={spec.intensity} period={spec.period:g}s"
    if spec.auto_shutdown.value != "never":
        head += f" auto_shutdown={spec.auto_shutdown.value}"
    if spec.max_children is not None:
        head += f" max_children={spec.max_children}"
    if depth:
        head += _common(spec)
    lines = [head]
    for child in spec.children:
        cpath = f"{here}/{child.id}"
        if isinstance(child, SupervisorSpec):
            lines.extend(describe(child, cpath, depth + 1))
        elif isinstance(child, CommandSpec):
            lines.append(f"{pad}  {cpath}  command {' '.join(child.command)}{_common(child)}")
        else:
            target = child.module or child.script
            lines.append(f"{pad}  {cpath}  worker {target}{_common(child)}")
    return lines


def _common(child: ChildSpec) -> str:
    text = f" restart={child.restart.value} shutdown={child.shutdown}"
    if child.significant:
        text += " significant"
    if child.backoff is not None:
        text += f" backoff={child.backoff.initial:g}..{child.backoff.max:g}s"
    if isinstance(child, CommandSpec | WorkerSpec):
        changed = {
            name: getattr(child.settings, name)
            for name in child.settings.__struct_fields__
            if getattr(child.settings, name) != getattr(HEALTH_DEFAULTS, name)
        }
        if changed:
            text += (
                " health("
                + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changed.items())
                + ")"
            )
    return text


def _warnings(spec: SupervisorSpec, path: str | None = None) -> list[str]:
    here = path or spec.id
    out: list[str] = []
    for child in spec.children:
        cpath = f"{here}/{child.id}"
        if isinstance(child, SupervisorSpec):
            out.extend(_warnings(child, cpath))
        elif isinstance(child, CommandSpec):
            prog = child.command[0]
            cwd = Path(child.cwd) if child.cwd else Path.cwd()
            found = (cwd / prog).exists() if "/" in prog else shutil.which(prog) is not None
            if not found:
                out.append(f"{cpath}: program {prog!r} not found (from {cwd})")
        elif isinstance(child, WorkerSpec) and child.script is not None:
            base = Path(child.cwd) if child.cwd else Path.cwd()
            if not (base / child.script).exists():
                out.append(f"{cpath}: script {child.script!r} not found (from {base})")
    return out


if __name__ == "__main__":
    main()
