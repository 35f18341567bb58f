"""The ``otp-agents`` command group and what its verbs share: the tree file's path, the state
dir option, and loading a tree with a one-line error."""

from __future__ import annotations

import os
import sys

import click

from otp_agents.errors import EXIT_CONFIG, ConfigError
from otp_agents.spec.load import load_file
from otp_agents.spec.model import SupervisorSpec

DEFAULT_TREE = "supervisors/default.toml"


def tree_path(tree: str | None) -> str:
    return tree or os.environ.get("OTP_AGENTS_TREE") or DEFAULT_TREE


def load(tree: str | None) -> SupervisorSpec:
    path = tree_path(tree)
    try:
        return load_file(path)
    except ConfigError as exc:
        click.echo(f"otp-agents: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    envvar="OTP_AGENTS_STATE_DIR",
    default="state",
    show_default=True,
    help="The tree's state dir: its control socket, stack dumps (dumps/) and checkpoints (checkpoints/).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Erlang/OTP-style supervision trees for OS processes."""


json_option = click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
