"""``otp-agents run``: check everything that can be checked, then run the tree until stopped."""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import resource
import sys
from typing import Any

import anyio
import click
import msgspec

from otp_agents.cli.app import load, main, state_dir_option, tree_path
from otp_agents.errors import EXIT_CONFIG, EXIT_START_FAILED, PreflightError, StateDirBusy
from otp_agents.ops import control_client, preflight
from otp_agents.ops.serve import run
from otp_agents.proc import guard
from otp_agents.redact import REDACTOR
from otp_agents.retention import Retention
from otp_agents.runtime import statedir
from otp_agents.runtime.reload import file_content


@main.command("run")
@click.argument("tree", required=False)
@click.option("--backend", type=click.Choice(["asyncio", "trio"]), default="asyncio", show_default=True)
@click.option("--events", "events_file", type=click.Path(dir_okay=False), help="Append events as JSON lines.")
@state_dir_option
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--metrics",
    "metrics_at",
    metavar="HOST:PORT",
    envvar="OTP_AGENTS_METRICS",
    help="Serve Prometheus /metrics and /healthz, /readyz there (e.g. 127.0.0.1:9464).",
)
@click.option(
    "--control-group",
    metavar="GROUP",
    help="Also let members of this group use the control socket (mode 0660).",
)
@click.option(
    "--watch-tree",
    type=click.FloatRange(min=0.5),
    metavar="SECONDS",
    envvar="OTP_AGENTS_WATCH_TREE",
    help="Reload the tree file by itself when its content changes, checked this often "
    "(for a Kubernetes ConfigMap); an invalid file is refused and logged, nothing changes.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="stderr log lines: human-readable, or one JSON object per line.",
)
@click.option(
    "--keep-dumps",
    type=click.IntRange(min=1),
    default=Retention.dumps_keep,
    show_default=True,
    help="Stack dumps kept in STATE_DIR/dumps (the newest).",
)
@click.option(
    "--dump-max-days",
    type=click.FloatRange(min=0),
    default=Retention.dumps_max_days,
    show_default=True,
    help="Stack dumps older than this are removed (0: by count only).",
)
@click.option(
    "--events-max-mb",
    type=click.FloatRange(min=0),
    default=Retention.events_max_mb,
    show_default=True,
    help="Rotate the --events file past this size (FILE.1 the newest old one; 0: never).",
)
@click.option(
    "--events-keep",
    type=click.IntRange(min=0),
    default=Retention.events_keep,
    show_default=True,
    help="Rotated --events files kept.",
)
def run_cmd(
    tree: str | None,
    backend: str,
    events_file: str | None,
    state_dir: str,
    log_level: str,
    log_format: str,
    metrics_at: str | None,
    control_group: str | None,
    watch_tree: float | None,
    keep_dumps: int,
    dump_max_days: float,
    events_max_mb: float,
    events_keep: int,
) -> None:
    """Run TREE (default: $OTP_AGENTS_TREE or supervisors/default.toml) until stopped.

    SIGTERM or Ctrl-C stops the tree in reverse start order; a second one kills it.
    Exit codes: 0 stopped, 1 the root supervisor gave up, 2 bad tree file, 3 start failed.
    """
    loaded = file_content(tree_path(tree))  # before loading: what --watch-tree compares to
    spec = load(tree)
    try:
        preflight.check_env(spec, tree_path(tree))
        preflight.check_control_path(control_client.socket_path(state_dir))
    except PreflightError as exc:
        click.echo(f"otp-agents: {exc}", err=True)
        sys.exit(exc.exit_code)
    metrics_address = _address(metrics_at) if metrics_at else None
    group_id = _group(control_group) if control_group else None
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_redact_record)
    handler.setFormatter(
        _Redacting(
            _JsonFormatter()
            if log_format == "json"
            else logging.Formatter("%(asctime)s %(levelname)-7s %(message)s")
        )
    )
    logging.basicConfig(level=getattr(logging, log_level.upper()), handlers=[handler])
    _raise_fd_limit()
    try:
        lock = statedir.claim(state_dir)  # held until this process ends, however it ends
    except (StateDirBusy, OSError) as exc:
        click.echo(f"otp-agents: {exc}", err=True)
        sys.exit(EXIT_START_FAILED)
    # Everything that can be checked is checked before the first child starts.
    try:
        if events_file is not None:
            preflight.open_events_file(events_file)
        metrics_socket = preflight.bind_listener(*metrics_address) if metrics_address else None
    except PreflightError as exc:
        click.echo(f"otp-agents: {exc}", err=True)
        sys.exit(exc.exit_code)
    keeper = guard.start()  # before the event loop: forking is only safe without threads
    keeper.contain()  # into a cgroup of our own, if this machine lets us make one
    logging.getLogger("otp_agents").info(
        "otp-agents %s; tree %s; state dir %s; supervisor pid %d; a death is contained by %s",
        _version(),
        os.path.abspath(tree_path(tree)),
        os.path.abspath(state_dir),
        os.getpid(),
        keeper.containment,
    )
    try:
        outcome = anyio.run(
            lambda: run(
                spec,
                events_file=events_file,
                guard=keeper,
                state_dir=state_dir,
                metrics_socket=metrics_socket,
                tree_file=os.path.abspath(tree_path(tree)),
                control_group=group_id,
                watch_tree=watch_tree,
                tree_loaded=loaded,
                retention=Retention(keep_dumps, dump_max_days, events_max_mb, events_keep),
            ),
            backend=backend,
        )
    finally:
        keeper.close()
        os.close(lock)
    if log_format == "json":  # every line of a JSON log is JSON, the last one too
        logging.getLogger("otp_agents").log(
            logging.INFO if outcome.code == 0 else logging.ERROR, outcome.message
        )
    else:
        click.echo(f"otp-agents: {outcome.message}", err=True)
    sys.exit(outcome.code)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("otp-agents")
    except PackageNotFoundError:
        return "(not installed)"


def _redact_record(record: logging.LogRecord) -> bool:
    """Secret values never reach the log, whatever logged them."""
    try:
        message = record.getMessage()
    except Exception:  # a malformed log call: logging reports it itself, as it always did
        return True
    clean = REDACTOR.scrub(message)
    if clean != message:
        record.msg, record.args = clean, None
    return True


class _Redacting(logging.Formatter):
    """The whole formatted line scrubbed too: tracebacks and stack info are added after the
    message (which the filter above has already cleaned)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return REDACTOR.scrub(self._inner.format(record))


def _raise_fd_limit() -> None:
    """A protocol worker costs the supervisor about two descriptors (its channel and its pidfd):
    raise the soft limit to the hard one, as a fleet of workers needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid if not name.isdigit() else int(name)
    except KeyError:
        click.echo(f"otp-agents: --control-group: no such group {name!r}", err=True)
        sys.exit(EXIT_CONFIG)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        click.echo(f"otp-agents: --metrics: expected HOST:PORT, got {text!r}", err=True)
        sys.exit(EXIT_CONFIG)
    return host.strip("[]"), int(port)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        row: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        event = getattr(record, "otp_event", None)
        if event is not None:
            row["event"] = msgspec.to_builtins(event)
        child = getattr(record, "child", None)
        if child is not None:  # a line a child wrote
            row.update(
                child=child, pid=getattr(record, "child_pid", None), stream=getattr(record, "stream", None)
            )
        if record.exc_info:
            row["exception"] = self.formatException(record.exc_info)
        return json.dumps(row)
