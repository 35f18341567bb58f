#!/usr/bin/env python3
"""The audio gap of a hosted LiveKit Agents call whose process dies, and what checkpointing
costs a turn.

One app pool runs LiveKit's ``basic_agent.py`` (byte for byte, offline by configuration: flite
speech in, pocketsphinx, the scripted LLM, flite out), its one job offered by the protocol
stand-in (``tests/livekit_standin.py``, **not** a LiveKit server) with the caller on LiveKit's
console transport (``ConsoleCall``). Rejoining a real room after a restart cannot be measured
here: there is no LiveKit server on this machine, so the gap below ends at the caller's console
connection, not at a room's media path.

Phases:

* **kill**: ``--kills`` times, SIGKILL the job's leaf while the agent listens. Per kill:
  - *gap (leaf)*: SIGKILL -> the restarted leaf's session listening to the caller again with
    the call restored (its ``resumed_listening`` report, as the supervisor's events record it);
  - *gap (caller)*: SIGKILL -> the caller's console seeing the new connection's session listen;
  - *handshake*: SIGKILL -> the supervisor handing the checkpoint to the new process (RESUMED).
  After the last kill, "What is my name?" must still be answered from before the first one.
* **hang**: ``--hangs`` times, SIGSTOP the leaf: the heartbeat misses (``ping_timeout``), the
  stack dump is taken, the leaf is killed and restarted; the same gap, from the SIGSTOP.
* **recycle**: ``--recycles`` lifetime recycles (``max_lifetime = 8``): each leaf hands the call
  over at a turn boundary (the agent listening, the caller silent) and goes; the gap runs from its
  hand-over to the next leaf listening again.
* **turns**: ``--turns`` turns of a fresh call with checkpoints on (disk) and off: LiveKit's own
  end-to-end latency per reply (``ChatMessage.metrics["e2e_latency"]``, end of the caller's
  speech to the start of the reply), the checkpoint's size, and the longest time one checkpoint
  took to capture and encode (it runs on the job's loop, so that is what it can delay).

    .venv/bin/python bench/agents_resume_gap.py [--kills 10] [--hangs 2] [--recycles 3] [--turns 8]
        [--json PATH]

Every wait is bounded; the tree gets SIGTERM at the end; loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.agents_helpers import EXAMPLES, SCRIPTS, Pool, greeted, pool, say  # noqa: E402

APP, SCRIPT = EXAMPLES / "basic_agent.py", SCRIPTS / "basic_agent.toml"
HEALTH = "health = { ping_interval = 0.5, ping_timeout = 2.0 }"
BOUND = 120.0


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    ms = sorted(v * 1000 for v in values)
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 1),
        "min_ms": round(ms[0], 1),
        "max_ms": round(ms[-1], 1),
    }


def _listening_again(connections: int) -> Any:
    return lambda log: log.connections == connections and log.states[-1:] == ["AS_LISTENING"]


async def _restart(p: Pool, job: str, how: signal.Signals) -> dict[str, float]:
    """Send ``how`` to the job's leaf while it listens; time its restart's way back."""
    call = p.calls[job]
    starts = p.started(job)
    pid, connections = starts[-1]["pid"], call.log.connections
    await call.wait_for(lambda log: log.states[-1:] == ["AS_LISTENING"], BOUND)
    t0 = time.time()
    os.kill(pid, how)
    new = await p.leaf(job, len(starts) + 1)
    await call.wait_for(_listening_again(connections + 1), BOUND)
    t_caller = time.time()

    def reported(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            e
            for e in events
            if e["kind"] == "worker_report"
            and e.get("reason") == "resumed_listening"
            and e.get("pid") == new["pid"]
        ]

    (listening,) = await p.run.until(reported, "the resumed_listening report")
    resumed = [e for e in p.run.events() if e["kind"] == "resumed" and e.get("pid") in (new["pid"], None)]
    handshake = [e["ts"] for e in resumed if e["ts"] >= t0]
    return {
        "gap_leaf": listening["ts"] - t0,
        "gap_caller": t_caller - t0,
        "handshake": (handshake[-1] - t0) if handshake else float("nan"),
    }


async def _kills(tmp: Path, kills: int, hangs: int) -> dict[str, Any]:
    extra = f"intensity = {kills + hangs + 5}\nperiod = 3600\n{HEALTH}"
    async with pool(tmp, APP, SCRIPT, max_jobs=2, extra=extra) as (p, tg):
        call = await p.call("G1", tg)
        await call.wait_for(greeted, BOUND)
        await say(call, "My name is Alice.")
        said = len(call.log.said)
        killed = [await _restart(p, "G1", signal.SIGKILL) for _ in range(kills)]
        hung = [await _restart(p, "G1", signal.SIGSTOP) for _ in range(hangs)]
        spoke_on_restart = len(call.log.said) - said
        await say(call, "What is my name?")
        remembered = "your name is alice" in call.log.said[-1].lower()
        dumps = len([e for e in p.run.events() if e["kind"] == "dump_taken"])
    return {
        "kill": {k: _summary([r[k] for r in killed]) for k in ("gap_leaf", "gap_caller", "handshake")},
        "hang": {k: _summary([r[k] for r in hung]) for k in ("gap_leaf", "gap_caller", "handshake")},
        "kill_rounds": killed,
        "hang_rounds": hung,
        "dumps": dumps,
        "replies_spoken_on_restarts": spoke_on_restart,
        "remembered_after_all_restarts": remembered,
    }


async def _recycles(tmp: Path, recycles: int) -> dict[str, Any]:
    """Lifetime recycles: each leaf hands the call over at a turn boundary; the gap runs from its
    hand-over (its last report) to the next leaf listening again."""
    extra = f"intensity = {recycles + 5}\nperiod = 3600\nhealth = {{ max_lifetime = 8, lifetime_jitter = 0 }}"
    gaps: list[float] = []
    async with pool(tmp, APP, SCRIPT, max_jobs=2, extra=extra) as (p, tg):
        call = await p.call("C1", tg)
        await call.wait_for(greeted, BOUND)
        await say(call, "My name is Alice.")
        for r in range(recycles):
            new = await p.leaf("C1", r + 2)
            old = p.started("C1")[r]

            def both(events: list[dict[str, Any]], old: Any = old, new: Any = new) -> list[float]:
                left = [
                    e["ts"]
                    for e in events
                    if e.get("reason") == "agent_handovers" and e.get("pid") == old["pid"]
                ]
                back = [
                    e["ts"]
                    for e in events
                    if e.get("reason") == "resumed_listening" and e.get("pid") == new["pid"]
                ]
                return [back[0] - left[0]] if left and back else []

            gaps += await p.run.until(both, f"hand-over {r + 1}")
        await say(call, "What is my name?")
        remembered = "your name is alice" in call.log.said[-1].lower()
    return {"gap": _summary(gaps), "gaps_ms": [round(g * 1000, 1) for g in gaps], "remembered": remembered}


async def _turns(tmp: Path, turns: int, checkpoint: str) -> dict[str, Any]:
    async with pool(tmp, APP, SCRIPT, max_jobs=2, extra=f'checkpoint = "{checkpoint}"') as (p, tg):
        call = await p.call("T1", tg)
        await call.wait_for(greeted, BOUND)
        for i in range(turns):
            await say(call, "My name is Alice." if i % 2 == 0 else "What is my name?")
        latencies = [
            e["value"]
            for e in p.run.events()
            if e["kind"] == "worker_report" and e.get("reason") == "voice_turn_latency_seconds"
        ]
        sizes = [e["value"] for e in p.run.events() if e["kind"] == "checkpoint" and e.get("value")]
        p.hang_up("T1")  # the job ends and reports its checkpoints' cost
        reason = "agent_checkpoint_max_seconds" if checkpoint != "off" else "agent_jobs_ended"
        ended = await p.run.until(lambda ev: [e["value"] for e in ev if e.get("reason") == reason], "its end")
        cost: float | None = float(ended[0]) if checkpoint != "off" else None
    return {
        "checkpoint": checkpoint,
        "e2e_latency": _summary(latencies),
        "checkpoints": len(sizes),
        "checkpoint_bytes_max": max(sizes) if sizes else 0,
        "checkpoint_cost_max_ms": round(cost * 1000, 2) if cost is not None else None,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"app": str(APP.relative_to(ROOT)), "machine": os.uname().nodename}
    with tempfile.TemporaryDirectory(prefix="otp-agents-gap-") as name:
        tmp = Path(name)
        for sub in ("kills", "recycles", "on", "off"):
            (tmp / sub).mkdir()
        result["restarts"] = await _kills(tmp / "kills", args.kills, args.hangs)
        if args.recycles:
            result["recycles"] = await _recycles(tmp / "recycles", args.recycles)
        result["turns"] = [
            await _turns(tmp / "on", args.turns, "disk"),
            await _turns(tmp / "off", args.turns, "off"),
        ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--hangs", type=int, default=2)
    parser.add_argument("--recycles", type=int, default=3)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = anyio.run(main_async, args)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text)
    r = result["restarts"]
    for kind in ("kill", "hang"):
        for key in ("gap_leaf", "gap_caller", "handshake"):
            print(f"{kind:5} {key:11} {r[kind][key]}")
    if "recycles" in result:
        recycled = result["recycles"]
        print(f"recycle hand-over gap {recycled['gap']}; remembered: {recycled['remembered']}")
    spoken, kept = r["replies_spoken_on_restarts"], r["remembered_after_all_restarts"]
    print(f"replies spoken on restarts: {spoken}; remembered after them: {kept}")
    for t in result["turns"]:
        size, count = t["checkpoint_bytes_max"], t["checkpoints"]
        print(
            f"turns, checkpoint {t['checkpoint']}: e2e {t['e2e_latency']}; {count} checkpoints, {size} B max"
        )
        print(f"  longest checkpoint capture + encode: {t['checkpoint_cost_max_ms']} ms")


if __name__ == "__main__":
    main()
