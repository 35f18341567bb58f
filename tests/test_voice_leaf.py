"""The voice leaf as a supervised OS process: crash-resume from its checkpoint, drain and
recycle in the middle of a call, heartbeats while it speaks, turn latency reported, and the
default tree's calls end to end through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from otp_agents.events import Kind

from .helpers import ROOT, tree_of, worker
from .voice_helpers import needs_tts

pytestmark = [pytest.mark.anyio, needs_tts]

CALL = 90.0  # failure bound for a whole call in real time; never a speed claim


def leaf(name: str, out: Path, script: str, *extra: str, **spec: Any) -> dict[str, Any]:
    path = out / f"{name}.txt"
    path.write_text(script)
    return worker(
        name,
        "workers.voice_agent:main",
        args=["--conversation", str(path), "--out", str(out / name), "--caller-voice", "rms", *extra],
        restart="transient",
        shutdown=10,
        start_timeout=30,
        **spec,
    )


def transcript(out: Path) -> list[str]:
    return (out / "transcript.txt").read_text().splitlines()


def events(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line.strip()]


MEMORY_SCRIPT = (
    "Remember the number three.\nMy favorite color is purple.\npause 6\n"
    "What is my favorite color?\nWhat number did I tell you?\n"
)


async def test_sigkilled_leaf_resumes_its_conversation_from_the_checkpoint(tmp_path: Path) -> None:
    config = {
        "id": "root",
        "intensity": 3,
        "period": 60,
        "children": [
            leaf("caller", tmp_path, MEMORY_SCRIPT, health={"ping_interval": 0.25, "ping_timeout": 3})
        ],
    }
    async with tree_of(config, state_dir=tmp_path / "state") as (_tree, rec):
        path = "root/caller"
        started = await rec.wait_kind(Kind.CHILD_STARTED, path)
        pid = started.pid
        assert pid is not None
        with anyio.fail_after(CALL):
            while len([e for e in rec.of(Kind.CHECKPOINT, path) if (e.value or 0) > 0]) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)  # mid-conversation: two turns done, two to go
        resumed = await rec.wait_kind(Kind.RESUMED, path)
        assert resumed.value is not None and resumed.value > 0
        with anyio.fail_after(CALL):
            exit_event = await rec.wait_for(
                lambda e: e.kind is Kind.CHILD_EXITED and e.path == path and e.pid != pid, 0
            )
        assert exit_event.code == 0
        # heartbeats were answered all along, speaking or not
        assert rec.of(Kind.HANG, path) == []
        reports = [e for e in rec.of(Kind.WORKER_REPORT, path) if e.reason == "voice_turn_latency_seconds"]
        assert len(reports) >= 3 and all((e.value or 0) > 0 for e in reports)
    lines = transcript(tmp_path / "caller")
    resumed_at = next(i for i, line in enumerate(lines) if line.startswith("-- resumed (incarnation 2)"))
    after = "\n".join(lines[resumed_at:])
    assert "Your favorite color is purple." in after
    assert "You told me the number three." in after
    starts = [e for e in events(tmp_path / "caller") if e["kind"] == "input_started"]
    assert len(starts) == 2
    gap = starts[1]["wall"] - killed_at
    assert gap > 0
    print(f"audio gap after SIGKILL: {gap:.3f}s")


async def test_drain_finishes_the_turn_and_the_recycled_leaf_resumes(tmp_path: Path) -> None:
    """A lifetime limit drains the leaf in the middle of the call; it finishes its turn,
    exits 0, is restarted as a recycle, and carries on with what it knew."""
    script = "Remember the number three.\npause 7\nWhat number did I tell you?\npause 2\n"
    config = {
        "id": "root",
        "children": [leaf("caller", tmp_path, script, health={"max_lifetime": 4.5, "lifetime_jitter": 0})],
    }
    async with tree_of(config, state_dir=tmp_path / "state") as (_tree, rec):
        path = "root/caller"
        recycled = await rec.wait_kind(Kind.RECYCLED, path)
        assert recycled is not None
        await rec.wait_kind(Kind.RESUMED, path)
        with anyio.fail_after(CALL):
            answered = "You told me the number three."
            while not any(answered in line for line in transcript(tmp_path / "caller")):  # noqa: ASYNC110
                await anyio.sleep(0.1)  # the transcript is a file: nothing to wait on
        assert rec.of(Kind.CHILD_EXITED, path)[0].code == 0
    lines = transcript(tmp_path / "caller")
    # every turn the first incarnation heard was answered before it left
    first = lines[: next(i for i, line in enumerate(lines) if line.startswith("-- resumed"))]
    assert sum("caller:" in line for line in first) == sum("receptionist:" in line for line in first) >= 1


async def test_unreadable_checkpoint_starts_the_call_afresh(tmp_path: Path) -> None:
    """Bytes the supervisor accepted but the leaf cannot decode: a fresh call, not a crash loop."""
    from otp_agents.events import EventBus
    from otp_agents.runtime.checkpoint import CheckpointStore, encode_file

    state = tmp_path / "state"
    file = CheckpointStore(state, EventBus()).file("root/caller")
    assert file is not None
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(encode_file(b"\x93not a voice checkpoint"))  # a sound file, foreign contents
    config = {"id": "root", "children": [leaf("caller", tmp_path, "What time is it?\n", "--virtual-clock")]}
    async with tree_of(config, state_dir=state) as (_tree, rec):
        path = "root/caller"
        await rec.wait_kind(Kind.RESUMED, path)
        exited = await rec.wait_kind(Kind.CHILD_EXITED, path)
        assert exited.code == 0
        assert len(rec.of(Kind.CHILD_STARTED, path)) == 1
    lines = transcript(tmp_path / "caller")
    assert not any(line.startswith("-- resumed") for line in lines)
    assert any(line.startswith("[") and "receptionist: It is" in line for line in lines)


def test_room_mode_without_livekit_env_fails_to_start_naming_the_variable(tmp_path: Path) -> None:
    tree = tmp_path / "room.toml"
    tree.write_text(
        f"""
id = "root"
[[children]]
id = "agent"
module = "workers.voice_agent:main"
args = ["--room", "demo", "--out", "{tmp_path / "out"}"]
cwd = "{ROOT}"
start_timeout = 30
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEKIT_")}
    proc = subprocess.run(
        [sys.executable, "-m", "otp_agents.cli", "run", str(tree), "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 3, proc.stderr.decode()
    assert b"LIVEKIT_URL" in proc.stderr


def test_default_tree_holds_three_calls_and_survives_the_provoked_crash(tmp_path: Path) -> None:
    """`make run`'s tree, through the CLI: every call ends, Carol's leaf is killed after her
    second turn and her next answers still know what she said."""
    out = tmp_path / "voice-out"
    text = (ROOT / "supervisors" / "default.toml").read_text().replace('"voice-out/', f'"{out}/')
    tree = tmp_path / "default.toml"
    tree.write_text(text.replace('"supervisors/', f'"{ROOT}/supervisors/'))
    proc = subprocess.run(
        [sys.executable, "-m", "otp_agents.cli", "run", str(tree), "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        timeout=180,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    for name in ("alice", "bob", "carol"):
        lines = transcript(out / name)
        assert lines[-1] == "-- conversation over --", lines
        assert (out / name / "call.wav").stat().st_size > 100_000
    carol = "\n".join(transcript(out / "carol"))
    assert "-- resumed (incarnation 2)" in carol
    assert "Your favorite color is purple." in carol.split("-- resumed")[1]
    assert "You told me the number three." in carol.split("-- resumed")[1]
    bob = "\n".join(transcript(out / "bob"))
    assert "(caller interrupted" in bob
    alice = "\n".join(transcript(out / "alice"))
    assert "(hand-off receptionist -> support)" in alice
    assert "I see your favorite color is green." in alice
