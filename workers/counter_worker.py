"""A protocol worker that counts its own starts through checkpoints, for the checkpoint tests.

On every start it reads the counter it was handed back (``worker.resumed``, JSON), adds one,
checkpoints and reports it (``counter``), all before ``ready()``, then does what its first
argument says and waits to be stopped:

* ``steady``: nothing more;
* ``big``: sends a checkpoint one byte over its limit, bypassing the library's own check as a
  worker in another language might, then reports ``big_sent``;
* ``clear``: clears its checkpoint (the work is complete), then reports ``cleared``;
* ``voice``: reports a turn latency, a provider error and a turn (the metrics catalogue);
* ``crash``: checkpoints ten times its counter and dies at once (``os._exit(3)``, no ``bye``).
"""

from __future__ import annotations

import os

import msgspec

from otp_agents.wire.messages import Checkpoint
from otp_agents.worker import Worker


async def main(worker: Worker) -> None:
    count = msgspec.json.decode(worker.resumed, type=int) if worker.resumed else 0
    count += 1
    await worker.checkpoint(msgspec.json.encode(count))
    await worker.report("counter", count)
    await worker.ready()
    mode = worker.args[0] if worker.args else "steady"
    if mode == "big":
        await worker._channel.send(Checkpoint(data=b"x" * (worker.checkpoint_max + 1)))
        await worker.report("big_sent", 1)
    elif mode == "clear":
        await worker.clear_checkpoint()
        await worker.report("cleared", 1)
    elif mode == "voice":
        await worker.report("voice_turn_latency_seconds", 0.42)
        await worker.report("voice_provider_errors", 1, provider="deepgram" + "x" * 40, kind="timeout")
        await worker.report("voice_turns", 1)
        await worker.report("voice_done", 1)
    elif mode == "crash":
        await worker.checkpoint(msgspec.json.encode(count * 10))
        os._exit(3)
    await worker.wait_stopping()
