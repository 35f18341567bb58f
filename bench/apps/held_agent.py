"""The app of ``bench/agents_pool.py``: a LiveKit Agents app in the AgentServer style, with the
prewarm real apps have (the Silero VAD, loaded once per process pool) and an entrypoint that
holds its job without ever connecting to the room (the benchmark's LiveKit server is a
protocol-level stand-in: no rooms, no media).

First thing in the entrypoint it writes ``"<time.time()> <pid>"`` to a file named after the
job id in ``$BENCH_MARKS_DIR`` (written aside, then renamed: the benchmark never reads half a
mark); then it holds the job until it is stopped. It runs unmodified under LiveKit's own worker
(``python held_agent.py start``, or ``workers/agents_host.py held_agent.py --server``) and as an
otp-agents app pool (``app = "bench/apps/held_agent.py"``).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from livekit.agents import AgentServer, JobContext, JobProcess, cli
from livekit.plugins import silero

HOLD = 3600.0  # seconds a job is held (the benchmark stops the jobs long before)

server = AgentServer()


def prewarm(proc: JobProcess) -> None:
    proc.userdata["vad"] = silero.VAD.load()


server.setup_fnc = prewarm


def mark(job_id: str) -> None:
    """``"<time.time()> <pid>"`` in ``$BENCH_MARKS_DIR/<job_id>``, atomically."""
    folder = Path(os.environ["BENCH_MARKS_DIR"])
    now = time.time()
    aside = folder / f".{job_id}.{os.getpid()}"
    aside.write_text(f"{now!r} {os.getpid()}\n")
    aside.rename(folder / job_id)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    mark(ctx.job.id)
    assert ctx.proc.userdata["vad"] is not None  # the prewarm's VAD reached the job
    await asyncio.sleep(HOLD)  # never ctx.connect(): the stand-in has no rooms


if __name__ == "__main__":
    cli.run_app(server)
