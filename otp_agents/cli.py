"""``otp-agents``: run and check supervision trees."""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import resource
import shutil
import sys
from pathlib import Path
from typing import Any

import anyio
import click
import msgspec

from . import control, guard, preflight, statedir
from .config import ConfigError, load_file
from .redact import REDACTOR
from .runtime import EXIT_CONFIG, EXIT_START_FAILED, run
from .spec import (
    HEALTH_DEFAULTS,
    ChildSpec,
    CommandSpec,
    SupervisorSpec,
    WorkerSpec,
    ZygoteSpec,
    stop_bound,
    walk,
)

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
) -> None:
    """Run TREE (default: $OTP_AGENTS_TREE or supervisors/default.toml) until stopped.

    SIGTERM or Ctrl-C stops the tree in reverse start order; a second one kills it.
    Exit codes: 0 stopped, 1 the root supervisor gave up, 2 bad tree file, 3 start failed.
    """
    loaded = control.file_content(_tree_path(tree))  # before loading: what --watch-tree compares to
    spec = _load(tree)
    try:
        preflight.check_env(spec, _tree_path(tree))
        preflight.check_control_path(control.socket_path(state_dir))
    except preflight.PreflightError as exc:
        click.echo(f"otp-agents: {exc}", err=True)
        sys.exit(exc.code)
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
    except (statedir.StateDirBusy, OSError) as exc:
        click.echo(f"otp-agents: {exc}", err=True)
        sys.exit(EXIT_START_FAILED)
    # Everything that can be checked is checked before the first child starts.
    try:
        if events_file is not None:
            preflight.open_events_file(events_file)
        metrics_socket = preflight.bind_listener(*metrics_address) if metrics_address else None
    except preflight.PreflightError as exc:
        click.echo(f"otp-agents: {exc}", err=True)
        sys.exit(exc.code)
    keeper = guard.start()  # before the event loop: forking is only safe without threads
    keeper.contain()  # into a cgroup of our own, if this machine lets us make one
    logging.getLogger("otp_agents").info(
        "supervisor pid %d; a death is contained by %s", os.getpid(), keeper.containment
    )
    try:
        outcome = anyio.run(
            lambda: run(
                spec,
                events_file=events_file,
                guard=keeper,
                state_dir=state_dir,
                metrics_socket=metrics_socket,
                tree_file=os.path.abspath(_tree_path(tree)),
                control_group=group_id,
                watch_tree=watch_tree,
                tree_loaded=loaded,
            ),
            backend=backend,
        )
    finally:
        keeper.close()
        os.close(lock)
    click.echo(f"otp-agents: {outcome.message}", err=True)
    sys.exit(outcome.code)


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
        if record.exc_info:
            row["exception"] = self.formatException(record.exc_info)
        return json.dumps(row)


@main.command("check")
@click.argument("tree", required=False)
def check_cmd(tree: str | None) -> None:
    """Validate TREE and print it, without starting anything."""
    spec = _load(tree)
    REDACTOR.learn_all(c.env for _, c in walk(spec) if isinstance(c, CommandSpec | WorkerSpec))
    click.echo(f"{_tree_path(tree)}: ok")
    for line in describe(spec):
        click.echo(line)
    bound = stop_bound(spec)
    click.echo(
        f"ordered stop: at most {bound:g}s (give a container or service manager at least this before SIGKILL)"
        if bound is not None
        else 'ordered stop: unbounded (a process child has shutdown = "infinity")'
    )
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
            argv = REDACTOR.scrub(" ".join(child.command))
            lines.append(f"{pad}  {cpath}  command {argv}{_common(child)}")
        elif isinstance(child, ZygoteSpec):
            what = f"image={child.image} preload={','.join(child.preload) or '-'} idle={child.idle}"
            lines.append(f"{pad}  {cpath}  zygote {what}{_common(child)}")
        else:
            target = child.module or child.script
            forked = f" zygote={child.zygote}" if child.zygote else ""
            lines.append(f"{pad}  {cpath}  worker {target}{forked}{_common(child)}")
    return lines


def _common(child: ChildSpec) -> str:
    text = f" restart={child.restart.value} shutdown={child.shutdown}"
    if child.significant:
        text += " significant"
    if child.backoff is not None:
        text += f" backoff={child.backoff.initial:g}..{child.backoff.max:g}s"
    if isinstance(child, CommandSpec | WorkerSpec):
        # What environment it gets, by name only (values may be secret).
        names = ",".join(sorted(child.env)) or "-"
        text += f" env=only({names})" if child.clear_env else (f" env=+({names})" if child.env else "")
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


# -- operator commands (talk to a running tree over its control socket) -----------------------

EXIT_NOT_FOUND = 4
EXIT_REFUSED = 5
EXIT_NOT_RUNNING = 6
EXIT_ERROR = 1
_CODES = {
    "ok": 0,
    "not_found": EXIT_NOT_FOUND,
    "refused": EXIT_REFUSED,
    "denied": EXIT_ERROR,
    "error": EXIT_ERROR,
}

json_option = click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")


def _ask(state_dir: str, op: str, path: str = "", args: tuple[str, ...] = ()) -> control.Reply:
    try:
        replies = control.request(
            control.socket_path(state_dir), control.Request(op=op, path=path, args=list(args))
        )
    except control.NotRunning as exc:
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
    sys.exit(_CODES.get(reply.code, EXIT_ERROR))


@main.command("status")
@state_dir_option
@json_option
def status_cmd(state_dir: str, as_json: bool) -> None:
    """Show the tree: state, pid, uptime, restarts, memory, last ping RTT of every child."""
    reply = _ask(state_dir, "status")
    if as_json or not reply.ok:
        _finish(reply, as_json)
    colour = sys.stdout.isatty()
    root = reply.data
    click.echo(f"{root['path']}  supervisor {root['strategy']}  pid {root['pid']}  up {_age(root['uptime'])}")
    for line in _status_lines(root["children"], 1, colour):
        click.echo(line)


_COLOURS = {"running": "green", "stopped": "yellow", "restarting": "red", "held": "blue"}


def _status_lines(children: list[dict[str, Any]], depth: int, colour: bool) -> list[str]:
    lines = []
    for c in children:
        state = c["status"]
        shown = click.style(f"{state:<10}", fg=_COLOURS.get(state)) if colour else f"{state:<10}"
        parts = [f"{'  ' * depth}{c['path']:<32}", shown, f"{c['kind']:<10}"]
        parts.append(f"pid {c['pid']:<7}" if c.get("pid") else " " * 11)
        parts.append(f"up {_age(c['uptime']):<8}" if c.get("uptime") is not None else " " * 11)
        parts.append(f"restarts {c['restarts']:<3}")
        if c.get("memory_mb") is not None:
            parts.append(f"mem {c['memory_mb']:.1f} MB")
        if c.get("rtt_ms") is not None:
            parts.append(f"rtt {c['rtt_ms']:.2f} ms")
        lines.append("  ".join(parts).rstrip())
        if "children" in c:
            lines.extend(_status_lines(c["children"], depth + 1, colour))
    return lines


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{seconds:.1f}s" if s < 10 else f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


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
        sys.exit(0)
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
@state_dir_option
@json_option
def reload_cmd(state_dir: str, as_json: bool) -> None:
    """Re-read the tree file and apply the difference; print it (+ added, - removed, ~ changed).

    Unchanged children keep running. An invalid file is refused and nothing changes.
    """
    _finish(_ask(state_dir, "reload"), as_json)


@main.command("events")
@click.option("--path", "prefix", default="", help="Only events of this path and below.")
@click.option("--kind", "kinds", multiple=True, help="Only these kinds (repeatable).")
@state_dir_option
def events_cmd(prefix: str, kinds: tuple[str, ...], state_dir: str) -> None:
    """Follow the event stream as JSON lines until the tree stops (Ctrl-C to leave)."""
    req = control.Request(op="events", path=prefix, kinds=list(kinds))
    try:
        for reply in control.stream_requests(control.socket_path(state_dir), req, timeout=None):
            for row in reply.data or []:
                click.echo(json.dumps(row))
    except control.NotRunning as exc:
        click.echo(f"otp-agents: {exc}", err=True)
        sys.exit(EXIT_NOT_RUNNING)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
