"""The stability contract: what users and tools depend on, pinned against golden files in
tests/golden/ so that moving code cannot change it by accident.

Pinned: the event kinds and the JSON event lines ``--events`` writes, the control protocol's
requests and replies (bytes on the wire and the shape of a status reply), the metric names and
their labels, the CLI's verbs, options and exit codes, the tree-file schema, the zygote's
``python -m otp_agents.zygote`` entry, and the imports the README documents for embedding.

A deliberate change regenerates the files: ``OTP_GOLDEN_UPDATE=1 pytest tests/test_contract.py``,
and the diff of tests/golden/ is the change to review.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import msgspec
import pytest

from .helpers import ROOT, WAIT, tree_of, worker

GOLDEN = ROOT / "tests" / "golden"
UPDATE = bool(os.environ.get("OTP_GOLDEN_UPDATE"))


def golden(name: str, actual: Any) -> None:
    path = GOLDEN / name
    text = json.dumps(actual, indent=1, sort_keys=True) + "\n"
    if UPDATE or not path.exists():
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert json.loads(path.read_text()) == json.loads(text), f"{name} changed; see tests/golden/{name}"


def _shape(row: dict[str, Any]) -> dict[str, Any]:
    """An event line with what varies from run to run replaced by its type."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in ("ts", "pid", "value", "delay", "output"):  # what varies (output: paths, lines)
            out[key] = type(value).__name__
        else:
            out[key] = value
    return out


def test_event_kinds_and_fields() -> None:
    from otp_agents.events import Event, Kind

    golden("event_kinds.json", [k.value for k in Kind])
    golden("event_fields.json", list(Event.__struct_fields__))


def test_event_lines_of_a_crash_loop_that_exhausts_the_root(tmp_path: Path) -> None:
    tree = tmp_path / "tree.toml"
    tree.write_text(
        f'id = "root"\nintensity = 1\nperiod = 600\n\n[[children]]\nid = "w"\n'
        f'module = "workers.chaos:crash_after"\nshutdown = 2\ncwd = "{ROOT}"\n'
    )
    events = tmp_path / "events.jsonl"
    argv = [sys.executable, "-m", "otp_agents.cli", "run", str(tree), "--events", str(events)]
    argv += ["--state-dir", str(tmp_path / "state")]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=WAIT * 3, check=False)
    assert done.returncode == 1
    rows = [_shape(json.loads(line)) for line in events.read_text().splitlines()]
    golden("event_lines_crash_loop.json", rows)


def test_control_protocol_frames() -> None:
    from otp_agents.ops.control_client import OPS, Reply, Request
    from otp_agents.wire import framing as wire

    samples = [
        Request(op="status"),
        Request(op="restart", path="root/pool/flaky-1"),
        Request(op="start-child", path="root/rooms", args=["--room", "r1"]),
        Request(op="events", path="root/pool", kinds=["hang", "child_exited"]),
        Reply(ok=True, message="restarted root/pool/flaky-1"),
        Reply(ok=False, code="not_found", message="no such child: root/x"),
        Reply(ok=True, data=[{"kind": "hang"}], more=True),
    ]
    golden(
        "control_protocol.json",
        {
            "ops": list(OPS),
            "frames": [wire.encode(m).hex() for m in samples],
            "request_fields": list(Request.__struct_fields__),
            "reply_fields": list(Reply.__struct_fields__),
        },
    )


def _keys(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: None for k in row if k != "children"}
    if "children" in row:
        out["children"] = [_keys(c) for c in row["children"]]
    return out


@pytest.mark.anyio
async def test_status_reply_shape() -> None:
    from otp_agents.ops.status import status

    config = {
        "id": "root",
        "children": [
            worker("w", "workers.chaos:steady"),
            {"id": "c", "command": ["sleep", "1000"], "shutdown": 2},
            {"id": "sub", "children": [{"id": "x", "command": ["sleep", "1000"], "shutdown": 2}]},
        ],
    }
    async with tree_of(config) as (tree, _rec):
        data = status(tree)
    shape = _keys(data)
    golden("status_reply_keys.json", shape)


@pytest.mark.anyio
async def test_metric_names_and_labels() -> None:
    from otp_agents.ops.metrics import Metrics

    config = {
        "id": "root",
        "children": [
            worker("w", "workers.chaos:steady"),
            {
                "id": "pool",
                "strategy": "simple_one_for_one",
                "children": [worker("job", "workers.chaos:steady")],
            },
        ],
    }
    async with tree_of(config) as (tree, _rec):
        metrics = Metrics()
        metrics.attach(tree)
        await tree.supervisor("root/pool").start_child([])
        text = metrics.exposition().decode()
    families: dict[str, list[str]] = {}
    for fam in metrics.registry.collect():  # what a scrape shows, labels included
        if fam.name.startswith("otp_agents_"):
            labels = {label for sample in fam.samples for label in sample.labels if label != "le"}
            families[fam.name] = [fam.type, *sorted(labels)]
    for metric in vars(metrics).values():  # declared ones, seen or not in this run
        if hasattr(metric, "_labelnames"):
            families[f"{metric._name}"] = [metric._type, *sorted(metric._labelnames)]
    assert "otp_agents_children" in text
    golden("metrics.json", families)


def _cli_shape(command: click.Command) -> dict[str, Any]:
    params = sorted(
        (
            sorted([*p.opts, *p.secondary_opts]) if isinstance(p, click.Option) else [f"<{p.name}>"]
            for p in command.params
        ),
        key=lambda opts: opts[0],
    )
    out: dict[str, Any] = {"params": params}
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        subs = {name: command.get_command(ctx, name) for name in command.list_commands(ctx)}
        out["commands"] = {name: _cli_shape(sub) for name, sub in sorted(subs.items()) if sub is not None}
    return out


def test_cli_verbs_options_and_exit_codes() -> None:
    from otp_agents import errors
    from otp_agents.cli import main

    golden("cli.json", _cli_shape(main))
    golden(
        "exit_codes.json",
        {
            "run": {"ok": 0, "gave_up": 1, "config": 2, "start_failed": 3},
            "operator": dict(sorted(errors.REPLY_EXIT.items())),
            "not_running": errors.EXIT_NOT_RUNNING,
        },
    )
    run_codes = (errors.EXIT_OK, errors.EXIT_GAVE_UP, errors.EXIT_CONFIG, errors.EXIT_START_FAILED)
    assert run_codes == (0, 1, 2, 3)


def test_tree_file_schema() -> None:
    from otp_agents.spec.model import SupervisorSpec

    golden("tree_schema.json", _without_descriptions(msgspec.json.schema(SupervisorSpec)))


def _without_descriptions(node: Any) -> Any:
    """The schema without its prose (docstrings are documentation, not the contract)."""
    if isinstance(node, dict):
        return {k: _without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_without_descriptions(v) for v in node]
    return node


def test_zygote_is_started_as_a_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "otp_agents.zygote", "--help"],
        cwd=ROOT,
        capture_output=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 0
    assert "--image" in done.stdout.decode() and "--preload" in done.stdout.decode()
