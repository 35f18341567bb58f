"""The audio gap of a voice call whose process goes: SIGKILL (or SIGSTOP) a voice leaf mid-call,
or let it recycle, and time how long until its next process is back in the call with its
checkpoint.

One leaf (workers/voice_agent.py, offline stack, real time) holds a long call. Each round waits
for the leaf's next checkpoint and then, by ``--kind``:

* ``kill``: SIGKILLs the leaf;
* ``hang``: SIGSTOPs it: the heartbeat misses (ping every 0.5 s, 2 s timeout), the stack is
  dumped, the leaf is killed and restarted;
* ``recycle``: lets it reach its lifetime (8 s): it finishes the turn in progress, exits, and is
  started again.

It reads from the leaf's events.jsonl when its audio input started again. Reported per round:

* gap: SIGKILL/SIGSTOP (recycle: the old process's input ending) -> the new process consuming
  the caller's audio again (what a caller hears as silence on the agent's side, beyond the turn
  that was in progress);
* handshake: SIGKILL -> the supervisor handing the checkpoint back (RESUMED event);
* the next answer after the restarts still uses the checkpointed context (checked).

    .venv/bin/python bench/voice_resume_gap.py [--rounds 5] [--kind kill|hang|recycle] [--zygote]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from otp_agents.events import Event, EventBus, Kind
from otp_agents.runtime.tree import running
from otp_agents.spec.load import from_dict

ROOT = Path(__file__).resolve().parent.parent
TURN = "Remember the number seven.\nWhat number did I tell you?\n"


def _answered_after(transcript: Path, incarnation: int) -> bool:
    tail = transcript.read_text().split(f"incarnation {incarnation})")[-1]
    return "You told me the number seven." in tail


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _starts(out: Path) -> list[dict[str, Any]]:
    return [e for e in _events(out / "events.jsonl") if e["kind"] == "input_started"]


HEALTH = {
    "kill": {},
    "hang": {"ping_interval": 0.5, "ping_timeout": 2.0},
    "recycle": {"max_lifetime": 8.0, "lifetime_jitter": 0},
}


async def measure(rounds: int, zygote: bool = False, kind: str = "kill") -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="otp-voice-gap-") as tmp_name:
        tmp = Path(tmp_name)
        script = tmp / "call.txt"
        script.write_text(TURN * (rounds + 2))
        out = tmp / "leaf"
        config = {
            "id": "root",
            "intensity": rounds + 2,
            "period": 3600,
            "children": [
                {
                    "id": "leaf",
                    "module": "workers.voice_agent:main",
                    "args": ["--conversation", str(script), "--out", str(out), "--caller-voice", "rms"],
                    "restart": "transient",
                    "shutdown": 10,
                    "start_timeout": 60,
                    "cwd": str(ROOT),
                    "health": HEALTH[kind],
                    **({"zygote": "voice"} if zygote else {}),
                }
            ],
        }
        if zygote:  # the leaf is forked by a zygote that imported the voice stack once
            zygote_spec = {"id": "zygote", "image": "voice", "preload": ["workers.voice_agent:preload"]}
            config["children"].insert(0, zygote_spec | {"cwd": str(ROOT)})  # type: ignore[attr-defined]
        bus = EventBus()
        seen: list[Event] = []
        bus.listen(seen.append)
        gaps: list[float] = []
        handshakes: list[float] = []
        remembered = 0
        async with running(from_dict(config), bus=bus, state_dir=tmp / "state"):
            for r in range(rounds):
                # a checkpoint taken by the current incarnation, then kill it
                with anyio.fail_after(120):
                    while True:
                        pids = [e.pid for e in seen if e.kind is Kind.CHILD_STARTED]
                        if pids and any(e.kind is Kind.CHECKPOINT and e.pid == pids[-1] for e in seen):
                            break
                        await anyio.sleep(0.05)
                pid = pids[-1]
                assert pid is not None
                if kind == "recycle":  # the leaf drains at its lifetime, at the end of a turn
                    with anyio.fail_after(120):
                        while len(starts := _starts(out)) < r + 2:  # noqa: ASYNC110 - a file
                            await anyio.sleep(0.02)
                    finished = [e for e in _events(out / "events.jsonl") if e["kind"] == "input_finished"]
                    gaps.append(starts[r + 1]["wall"] - finished[r]["wall"])
                    continue
                await anyio.sleep(1.0)  # mid-turn, not right at the checkpoint
                killed = time.time()
                os.kill(pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
                with anyio.fail_after(120):
                    while not [e for e in seen if e.kind is Kind.RESUMED and e.ts >= killed]:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                    resumed = next(e for e in seen if e.kind is Kind.RESUMED and e.ts >= killed)
                    handshakes.append(resumed.ts - killed)
                    while len(starts := _starts(out)) < r + 2:  # noqa: ASYNC110 - a file
                        await anyio.sleep(0.02)
                gaps.append(starts[r + 1]["wall"] - killed)
            # let the last incarnation answer once more, then check it remembered
            with anyio.fail_after(120):
                while not _answered_after(out / "transcript.txt", rounds + 1):  # noqa: ASYNC110 - a file
                    await anyio.sleep(0.1)
            remembered = 1
        return {
            "rounds": rounds,
            "gap_median_s": round(statistics.median(gaps), 3),
            "gap_max_s": round(max(gaps), 3),
            "gap_min_s": round(min(gaps), 3),
            "handshake_median_s": round(statistics.median(handshakes), 3) if handshakes else None,
            "remembered_after_last_restart": bool(remembered),
            "gaps": [round(g, 3) for g in gaps],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--zygote", action="store_true", help="fork the leaf from a zygote")
    parser.add_argument("--kind", default="kill", choices=sorted(HEALTH), help="how the leaf goes")
    args = parser.parse_args()
    result = anyio.run(measure, args.rounds, args.zygote, args.kind, backend=args.backend)
    result["backend"] = args.backend
    result["zygote"] = args.zygote
    result["kind"] = args.kind
    print(json.dumps(result))


if __name__ == "__main__":
    main()
