"""``otp-agents check``: validate a tree file and print it, without starting anything."""

from __future__ import annotations

import click

from otp_agents.cli.app import load, main, tree_path
from otp_agents.redact import REDACTOR
from otp_agents.spec.describe import describe, warnings
from otp_agents.spec.model import CommandSpec, WorkerSpec, stop_bound, walk


@main.command("check")
@click.argument("tree", required=False)
def check_cmd(tree: str | None) -> None:
    """Validate TREE and print it, without starting anything."""
    spec = load(tree)
    REDACTOR.learn_all(c.env for _, c in walk(spec) if isinstance(c, CommandSpec | WorkerSpec))
    click.echo(f"{tree_path(tree)}: ok")
    for line in describe(spec):
        click.echo(line)
    bound = stop_bound(spec)
    click.echo(
        f"ordered stop: at most {bound:g}s (give a container or service manager at least this before SIGKILL)"
        if bound is not None
        else 'ordered stop: unbounded (a process child has shutdown = "infinity")'
    )
    for warning in warnings(spec):
        click.echo(f"warning: {warning}", err=True)
