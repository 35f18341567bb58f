"""Demo protocol workers: a steady ticker and a flaky worker that crashes now and then."""

from __future__ import annotations

import random
import sys

import anyio

from otp_agents.worker import Worker


async def ticker(worker: Worker) -> None:
    """Says Ready at once, then ticks every few seconds until asked to stop."""
    await worker.ready()
    n = 0
    while not worker.stopping:
        with anyio.move_on_after(5):
            await worker.wait_stopping()
        n += 1
        if not worker.stopping:
            await worker.log(f"tick {n}")


async def flaky(worker: Worker) -> None:
    """Works for a random while (mean from the first arg, default 20 s), then crashes."""
    mean = float(worker.args[0]) if worker.args else 20.0
    await worker.ready()
    with anyio.move_on_after(random.expovariate(1 / mean)):
        await worker.wait_stopping()
    if not worker.stopping:
        print(f"{worker.path}: simulated crash", file=sys.stderr)
        raise RuntimeError("simulated crash")
