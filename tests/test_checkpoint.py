"""Crash-resume checkpoints and worker reports, with real worker processes (workers/counter_worker.py).

The counter worker adds one to the counter it is handed back on every start and checkpoints it,
so the counter it reports says which checkpoint its start received.
"""

from __future__ import annotations

import os
import signal
import zlib
from pathlib import Path
from typing import Any

import anyio
import pytest

from otp_agents.events import Event, Kind
from otp_agents.ops.metrics import Metrics
from otp_agents.runtime.checkpoint import MAGIC, encode_file, file_name

from .helpers import WAIT, Recorder, settle, tree_of, worker

pytestmark = pytest.mark.anyio

COUNTER = "workers.counter_worker:main"


def counter(cid: str, backend: str, *args: str, **extra: Any) -> dict[str, Any]:
    return worker(cid, COUNTER, args=list(args), backend=backend, **extra)


def reported(name: str, path: str | None = None) -> Any:
    def match(e: Event) -> bool:
        return e.kind is Kind.WORKER_REPORT and e.reason == name and (path is None or e.path == path)

    return match


async def next_count(rec: Recorder, path: str, start: int) -> float:
    """The counter of the next start of ``path`` (reported before ready), once it has started."""
    event = await rec.wait_for(reported("counter", path), start)
    await rec.wait_kind(Kind.CHILD_STARTED, path, start)
    assert event.value is not None
    return event.value


def _content(file: Path) -> bytes | None:
    try:
        return file.read_bytes()
    except FileNotFoundError:  # not there, or removed while we looked
        return None


async def wait_file(file: Path, content: bytes | None) -> None:
    """Until the background writer has put ``content`` in ``file`` (None: removed it)."""
    with anyio.fail_after(WAIT):
        while _content(file) != content:  # noqa: ASYNC110 - no wakeup for a file
            await anyio.sleep(0.01)


async def kill(tree: Any, path: str) -> None:
    pid = tree.pid(path)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)


async def test_sigkill_restart_resumes_from_last_checkpoint(anyio_backend: str, tmp_path: Path) -> None:
    config = {"intensity": 10, "children": [counter("w", anyio_backend)]}
    file = tmp_path / "checkpoints" / "root%2Fw.ckpt"
    async with tree_of(config, tmp_path) as (tree, rec):
        metrics = Metrics()
        metrics.attach(tree)
        assert await next_count(rec, "root/w", 0) == 1
        assert not rec.of(Kind.RESUMED)  # nothing to resume on the very first start
        await wait_file(file, encode_file(b"1"))  # written while running, not only at the end
        for expected in (2, 3):
            mark = rec.mark()
            await kill(tree, "root/w")
            assert await next_count(rec, "root/w", mark) == expected
        assert [e.value for e in rec.of(Kind.RESUMED, "root/w")] == [1, 1]  # b"1", b"2": one byte
        text = metrics.exposition().decode()
    assert 'otp_agents_resumes_total{path="root/w"} 2.0' in text
    assert 'otp_agents_checkpoints_total{path="root/w"} 2.0' in text
    assert file.read_bytes() == encode_file(b"3")


async def test_last_checkpoint_before_a_crash_is_not_lost(anyio_backend: str) -> None:
    # The worker checkpoints and dies at once (os._exit): the frame is read before the exit is
    # handled, so the restart gets it.
    config = {"intensity": 100, "children": [counter("w", anyio_backend, "crash")]}
    async with tree_of(config) as (_tree, rec):
        assert await next_count(rec, "root/w", 0) == 1
        mark = rec.mark()
        assert await next_count(rec, "root/w", mark) == 11  # resumed from the crash's 10
        exited = rec.of(Kind.CHILD_EXITED, "root/w")[0]
        assert exited.code == 3


async def test_too_large_checkpoint_is_dropped_and_the_previous_one_kept(anyio_backend: str) -> None:
    config = {"intensity": 10, "children": [counter("w", anyio_backend, "big", checkpoint_max_bytes=16)]}
    async with tree_of(config) as (tree, rec):
        await rec.wait_for(reported("big_sent"))
        [dropped] = rec.of(Kind.CHECKPOINT_DROPPED, "root/w")
        assert (dropped.reason, dropped.value, dropped.threshold) == ("too_large", 17, 16)
        await settle(tree)
        assert not rec.of(Kind.CHILD_EXITED)  # a checkpoint over the limit costs no restart
        mark = rec.mark()
        await kill(tree, "root/w")
        assert await next_count(rec, "root/w", mark) == 2  # the checkpoint before it, handed back


async def test_checkpoints_off(anyio_backend: str) -> None:
    config = {"intensity": 10, "children": [counter("w", anyio_backend, checkpoint_max_bytes=0)]}
    async with tree_of(config) as (tree, rec):
        assert await next_count(rec, "root/w", 0) == 1
        assert rec.of(Kind.CHECKPOINT_DROPPED, "root/w")[0].reason == "disabled"
        mark = rec.mark()
        await kill(tree, "root/w")
        assert await next_count(rec, "root/w", mark) == 1
        assert not rec.of(Kind.RESUMED)


async def test_a_memory_only_checkpoint_resumes_but_never_touches_the_disk(
    anyio_backend: str, tmp_path: Path
) -> None:
    on_disk = counter("w", anyio_backend)
    config = {"children": [counter("w", anyio_backend, checkpoint_store="memory")]}
    file = tmp_path / "checkpoints" / file_name("root/w")
    async with tree_of({"children": [on_disk]}, tmp_path) as (_tree, rec):
        assert await next_count(rec, "root/w", 0) == 1
    assert file.exists()  # an earlier run's setting wrote it
    async with tree_of(config, tmp_path) as (tree, rec):
        assert await next_count(rec, "root/w", 0) == 2
        await wait_file(file, None)  # now memory-only: the old file goes
        mark = rec.mark()
        await kill(tree, "root/w")
        assert await next_count(rec, "root/w", mark) == 3  # resumed from memory
        assert not file.exists()
    async with tree_of(config, tmp_path) as (_tree, rec):
        assert await next_count(rec, "root/w", 0) == 1  # a new supervisor: nothing was kept
    assert not file.exists()


async def test_checkpoint_survives_a_supervisor_restart(anyio_backend: str, tmp_path: Path) -> None:
    config = {"children": [counter("w", anyio_backend)]}
    async with tree_of(config, tmp_path) as (_tree, rec):
        assert await next_count(rec, "root/w", 0) == 1
    async with tree_of(config, tmp_path) as (_tree, rec):
        assert await next_count(rec, "root/w", 0) == 2
        assert [e.value for e in rec.of(Kind.RESUMED, "root/w")] == [1]
    async with tree_of(config, tmp_path) as (_tree, rec):
        assert await next_count(rec, "root/w", 0) == 3


def _framed(data: bytes, size: int | None = None, crc: int | None = None) -> bytes:
    header = len(data) if size is None else size
    check = zlib.crc32(data) if crc is None else crc
    return MAGIC + header.to_bytes(4, "big") + check.to_bytes(4, "big") + data


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(b"not a checkpoint at all", "bad_magic", id="garbage"),
        pytest.param(b"", "bad_magic", id="empty"),
        pytest.param(MAGIC + b"\x00\x00", "truncated", id="cut-header"),
        pytest.param(_framed(b"41")[:-1], "truncated", id="cut-data"),
        pytest.param(_framed(b"41", crc=12345), "bad_crc", id="bad-crc"),
        pytest.param(_framed(b"41") + b"\x00", "bad_length", id="trailing"),
        pytest.param(_framed(b"4" * 100), "too_large", id="over-limit"),
    ],
)
async def test_damaged_checkpoint_file_means_a_fresh_start(
    anyio_backend: str, tmp_path: Path, content: bytes, reason: str
) -> None:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    file = directory / file_name("root/w")
    file.write_bytes(content)
    config = {"children": [counter("w", anyio_backend, checkpoint_max_bytes=64)]}
    async with tree_of(config, tmp_path) as (_tree, rec):
        assert await next_count(rec, "root/w", 0) == 1  # started fresh, not failed
        [dropped] = rec.of(Kind.CHECKPOINT_DROPPED, "root/w")
        assert dropped.reason == reason
        assert dropped.file == str(file)
        assert (directory / (file.name + ".bad")).read_bytes() == content
        await wait_file(file, encode_file(b"1"))  # and its new checkpoint replaces it


async def test_empty_checkpoint_clears(anyio_backend: str, tmp_path: Path) -> None:
    config = {"intensity": 10, "children": [counter("w", anyio_backend, "clear")]}
    file = tmp_path / "checkpoints" / "root%2Fw.ckpt"
    async with tree_of(config, tmp_path) as (tree, rec):
        await rec.wait_for(reported("cleared"))
        assert [(e.value, e.reason) for e in rec.of(Kind.CHECKPOINT, "root/w")] == [(1, None), (0, "cleared")]
        await wait_file(file, None)
        mark = rec.mark()
        await kill(tree, "root/w")
        assert await next_count(rec, "root/w", mark) == 1  # nothing handed back
        assert not rec.of(Kind.RESUMED)


async def test_dynamic_child_removed_for_good_takes_its_checkpoint(
    anyio_backend: str, tmp_path: Path
) -> None:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    # left by a run that was killed before it could delete its dynamic children
    stale = directory / file_name("root/pool/leaf-1")
    stale.write_bytes(encode_file(b"41"))
    template = counter("leaf", anyio_backend)
    config = {"children": [{"id": "pool", "strategy": "simple_one_for_one", "children": [template]}]}
    async with tree_of(config, tmp_path) as (tree, rec):
        pool = tree.supervisor("root/pool")
        assert await pool.start_child() == "root/pool/leaf-1"
        assert await next_count(rec, "root/pool/leaf-1", 0) == 1  # not 42: the stale one is gone
        assert not rec.of(Kind.RESUMED)
        await wait_file(stale, encode_file(b"1"))
        await pool.terminate_child("leaf-1")
        await wait_file(stale, None)
        assert await tree.host.checkpoints.get("root/pool/leaf-1") is None


async def test_reports_reach_events_and_metrics(anyio_backend: str) -> None:
    template = counter("leaf", anyio_backend, checkpoint_max_bytes=16)
    config = {"children": [{"id": "pool", "strategy": "simple_one_for_one", "children": [template]}]}
    async with tree_of(config) as (tree, rec):
        metrics = Metrics()
        metrics.attach(tree)
        pool = tree.supervisor("root/pool")
        await pool.start_child(["voice"])
        await rec.wait_for(reported("voice_done"))
        await pool.start_child(["big"])
        await rec.wait_for(reported("big_sent"))
        text = metrics.exposition().decode()
    errors = [
        e for e in rec.of(Kind.WORKER_REPORT, "root/pool/leaf-1") if e.reason == "voice_provider_errors"
    ]
    provider = "deepgram" + "x" * 40
    assert [(e.value, e.detail) for e in errors] == [(1.0, f"provider={provider},kind=timeout")]
    latency = [e.value for e in rec.of(Kind.WORKER_REPORT) if e.reason == "voice_turn_latency_seconds"]
    assert latency == [0.42]
    leaf = 'path="root/pool/leaf"'  # dynamic instances share their template's label
    assert f"otp_agents_voice_turn_latency_seconds_count{{{leaf}}} 1.0" in text
    assert f'otp_agents_voice_turn_latency_seconds_bucket{{le="0.5",{leaf}}} 1.0' in text
    assert f'otp_agents_voice_turn_latency_seconds_bucket{{le="0.3",{leaf}}} 0.0' in text
    cut = provider[:32]
    assert f'otp_agents_voice_provider_errors_total{{kind="timeout",{leaf},provider="{cut}"}} 1.0' in text
    assert f"otp_agents_voice_turns_total{{{leaf}}} 1.0" in text
    assert f"otp_agents_checkpoints_total{{{leaf}}} 2.0" in text
    assert f'otp_agents_checkpoints_dropped_total{{{leaf},reason="too_large"}} 1.0' in text
    assert "voice_done" not in text and "otp_agents_counter" not in text  # not in the catalogue: events only
