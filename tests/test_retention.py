"""The tree's own record stays bounded: stack dumps by count and age, the events file rotated by
size (through the real CLI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otp_agents.events import EventBus, Kind
from otp_agents.proc.handle import ChildProcess
from otp_agents.retention import Retention, prune, rotate_if_large
from otp_agents.runtime.tree import running
from otp_agents.spec.load import from_dict

from .helpers import ROOT, WAIT, Recorder, poll, worker


def test_prune_keeps_the_newest_and_drops_the_old(tmp_path: Path) -> None:
    now = time.time()
    for i in range(5):
        f = tmp_path / f"d{i}.txt"
        f.write_text("x")
        os.utime(f, (now - i * 60, now - i * 60))  # d0 the newest
    ancient = tmp_path / "old.txt"
    ancient.write_text("x")
    os.utime(ancient, (now - 40 * 86400, now - 40 * 86400))
    (tmp_path / "keep.log").write_text("not a dump")
    assert prune(tmp_path, ".txt", 3, 30) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d0.txt", "d1.txt", "d2.txt", "keep.log"]


def test_rotation_shifts_the_old_files_and_drops_the_oldest(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    for n, text in ((1, "one"), (2, "two")):
        Path(f"{path}.{n}").write_text(text)
    path.write_text("x" * 2048)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert not rotate_if_large(fd, str(path), 0.01, 2)  # 2 KiB is under 10 KiB
        assert rotate_if_large(fd, str(path), 0.001, 2)
    finally:
        os.close(fd)
    assert not path.exists() and Path(f"{path}.1").read_text() == "x" * 2048
    assert Path(f"{path}.2").read_text() == "one" and not Path(f"{path}.3").exists()


@pytest.mark.anyio
async def test_only_the_newest_dumps_are_kept(tmp_path: Path, anyio_backend: str) -> None:
    spec = from_dict({"children": [worker("w", "workers.chaos:steady", backend=anyio_backend)]})
    bus = EventBus()
    rec = Recorder(bus)
    async with running(spec, bus=bus, state_dir=tmp_path, retention=Retention(dumps_keep=2)) as tree:
        await rec.wait_kind(Kind.CHILD_STARTED, "root/w")
        proc = tree.root.slots["w"].instance
        assert isinstance(proc, ChildProcess)
        taken = []
        for _ in range(4):  # within a second or so: each its own file all the same
            dump = await tree.host.dumper.take(proc, "operator")
            assert dump is not None
            taken.append(dump.file)
    kept = sorted((tmp_path / "dumps").glob("*.txt"))
    assert kept == sorted(taken[-2:])


def test_the_events_file_is_rotated_by_size_through_the_cli(tmp_path: Path) -> None:
    tree = tmp_path / "tree.toml"
    tree.write_text('intensity = 1000000\nperiod = 1\n\n[[children]]\nid = "flap"\ncommand = ["false"]\n')
    events = tmp_path / "events.jsonl"
    cmd = [sys.executable, "-m", "otp_agents.cli", "run", str(tree), "--state-dir", str(tmp_path / "state")]
    cmd += ["--events", str(events), "--events-max-mb", "0.002", "--events-keep", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        poll(lambda: Path(f"{events}.2").exists())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=WAIT)
    assert not Path(f"{events}.3").exists()
    for part in (events, Path(f"{events}.1"), Path(f"{events}.2")):
        lines = part.read_text().splitlines()
        assert lines and all(json.loads(line)["kind"] for line in lines), part  # whole lines only
    assert Path(f"{events}.1").stat().st_size < 64 * 1024  # rotated near its bound
