"""The operator verbs: each talks to a running tree over its control socket and prints the
answer (``status``, ``restart``, ``terminate``, ``start``, ``start-child``, ``dump``, ``stop``,
``reload``, ``events``)."""

from __future__ import annotations

import json
import os
import sys
import time

import click
import msgspec

from otp_agents.cli.app import json_option, main, state_dir_option
from otp_agents.cli.table import render
from otp_agents.errors import EXIT_ERROR, EXIT_NOT_RUNNING, REPLY_EXIT, NotRunning
from otp_agents.ops import control_client as control


def _ask(
    state_dir: str, op: str, path: str = "", args: tuple[str, ...] = (), *, dry_run: bool = False
) -> control.Reply:
    request = control.Request(op=op, path=path, args=list(args), dry_run=dry_run)
    try:
        replies = control.request(control.socket_path(state_dir), request)
    except NotRunning as exc:
        click.echo(f"otp-agents: {exc}", err=True)
        sys.exit(EXIT_NOT_RUNNING)
    except OSError as exc:
        click.echo(f"otp-agents: control socket error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    if not replies:
        click.echo("otp-agents: the supervisor closed the connection without answering", err=True)
        sys.exit(EXIT_ERROR)
    return replies[-1]


def _finish(reply: control.Reply, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(reply), indent=None))
    elif reply.ok:
        if reply.message:
            click.echo(reply.message)
    else:
        click.echo(f"otp-agents: {reply.message}", err=True)
    sys.exit(REPLY_EXIT.get(reply.code, EXIT_ERROR))


@main.command("status")
@click.argument("path", required=False, default="")
@click.option(
    "--watch", type=click.FloatRange(min=0.2), metavar="SECONDS", help="Redraw every SECONDS until Ctrl-C."
)
@state_dir_option
@json_option
def status_cmd(path: str, watch: float | None, state_dir: str, as_json: bool) -> None:
    """Show the tree, or the child or subtree at PATH: state, pid, uptime, restarts, how and when
    it last exited and why, when a restarting child is tried next, CPU, memory, ping RTT."""
    colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    while True:
        reply = _ask(state_dir, "status", path)
        if as_json or not reply.ok:
            _finish(reply, as_json)
        lines = render(reply.data, colour)
        if watch is None:
            click.echo("\n".join(lines))
            return
        if sys.stdout.isatty():
            click.clear()
        click.echo("\n".join(lines))
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return


def _path_command(name: str, help_text: str) -> None:
    @main.command(name, help=help_text)
    @click.argument("path")
    @state_dir_option
    @json_option
    def command(path: str, state_dir: str, as_json: bool) -> None:
        _finish(_ask(state_dir, name, path), as_json)


_path_command("restart", "Stop the child at PATH and start it again (not counted as a crash).")
_path_command(
    "terminate", "Stop the child at PATH; it stays down, whatever its siblings do, until `start PATH`."
)
_path_command("start", "Start the stopped (or terminated) child at PATH.")


@main.command("dump")
@click.argument("path")
@state_dir_option
@json_option
def dump_cmd(path: str, state_dir: str, as_json: bool) -> None:
    """Take a stack dump of the child at PATH now, without killing it; print it."""
    reply = _ask(state_dir, "dump", path)
    if reply.ok and not as_json:
        click.echo(reply.data["text"])
        click.echo(f"(kept in {reply.data['file']})", err=True)
        sys.exit(0 if reply.data.get("complete", True) else EXIT_ERROR)
    _finish(reply, as_json)


@main.command("start-child")
@click.argument("supervisor")
@click.argument("args", nargs=-1)
@state_dir_option
@json_option
def start_child_cmd(supervisor: str, args: tuple[str, ...], state_dir: str, as_json: bool) -> None:
    """Start one more child of the simple_one_for_one SUPERVISOR, with ARGS appended."""
    _finish(_ask(state_dir, "start-child", supervisor, args), as_json)


@main.command("stop")
@state_dir_option
@json_option
def stop_cmd(state_dir: str, as_json: bool) -> None:
    """Stop the whole tree gracefully (reverse start order, each child within its shutdown)."""
    _finish(_ask(state_dir, "stop"), as_json)


@main.command("reload")
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
@state_dir_option
@json_option
def reload_cmd(dry_run: bool, state_dir: str, as_json: bool) -> None:
    """Re-read the tree file and apply the difference; print it field by field (+ started,
    - stopped, ~ changed: in place, or restarted when its process changed).

    Running children are kept unless their own process changed: supervisor settings
    (intensity, max_children, ...) and health limits apply in place. An invalid file is refused
    and nothing changes.
    """
    _finish(_ask(state_dir, "reload", dry_run=dry_run), as_json)


@main.command("events")
@click.option("--path", "prefix", default="", help="Only events of this path and below.")
@click.option("--kind", "kinds", multiple=True, help="Only these kinds (repeatable).")
@state_dir_option
def events_cmd(prefix: str, kinds: tuple[str, ...], state_dir: str) -> None:
    """Follow the event stream as JSON lines until the tree stops (Ctrl-C to leave)."""
    req = control.Request(op="events", path=prefix, kinds=list(kinds))
    try:
        for reply in control.stream_requests(control.socket_path(state_dir), req, timeout=None):
            if not reply.ok:  # a filter it refused (an unknown kind, a path not in the tree)
                _finish(reply, False)
            for row in reply.data or []:
                click.echo(json.dumps(row))
    except NotRunning as exc:
        click.echo(f"otp-agents: {exc}", err=True)
        sys.exit(EXIT_NOT_RUNNING)
    except KeyboardInterrupt:
        pass
