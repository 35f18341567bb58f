"""The ``otp-agents`` command group and what its verbs share: the tree file's path, the state
dir option, and loading a tree with a one-line error.

Verbs are imported when they are used (:class:`LazyGroup`): ``otp-agents status`` loads the
control client and nothing of the runtime, so it answers as fast as the socket does."""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

import click

from otp_agents.errors import EXIT_CONFIG

if TYPE_CHECKING:
    from otp_agents.spec.model import SupervisorSpec

DEFAULT_TREE = "supervisors/default.toml"

# Which module adds each verb to the group.
VERBS = {
    "run": "otp_agents.cli.run",
    "check": "otp_agents.cli.check",
    "logs": "otp_agents.cli.logs",
    **{
        verb: "otp_agents.cli.operate"
        for verb in (
            "status",
            "restart",
            "terminate",
            "start",
            "start-child",
            "dump",
            "stop",
            "reload",
            "events",
        )
    },
}


class LazyGroup(click.Group):
    """A group whose verbs are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(VERBS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in VERBS:
            importlib.import_module(VERBS[cmd_name])
        return self.commands.get(cmd_name)


def default_state_dir() -> str:
    """``$XDG_STATE_HOME/otp-agents`` (``~/.local/state/otp-agents``): the same wherever the CLI
    is run from, so ``status`` finds the tree that ``run`` started."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "otp-agents")


def tree_path(tree: str | None) -> str:
    return tree or os.environ.get("OTP_AGENTS_TREE") or DEFAULT_TREE


def load(tree: str | None) -> SupervisorSpec:
    from otp_agents.errors import ConfigError
    from otp_agents.spec.load import load_file

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
    default=default_state_dir,
    show_default="$XDG_STATE_HOME/otp-agents",
    help="The tree's state dir: its control socket, logs/, stack dumps (dumps/) and checkpoints/.",
)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="otp-agents", prog_name="otp-agents")
def main() -> None:
    """Erlang/OTP-style supervision trees for OS processes."""


json_option = click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
