"""The shared inference process: speech models loaded once per machine, served to every voice
leaf of the tree.

``module = "workers.inference_server:main"``. It starts ``--pool`` pocketsphinx recognisers, each
a child process with one model in memory (pocketsphinx holds the GIL while decoding, so threads
would not run in parallel); requests beyond that many wait in a queue of ``--max-queue``. It listens on a
Unix socket in Linux's abstract namespace, publishes it to the tree as ``--name`` (default
``inference``), and says Ready. Leaves started with ``--inference`` find it with a lookup and
talk to it directly (see ``otp_agents/voice/inference.py``). Like any protocol worker it answers
heartbeats from its event loop, is watched by the memory breaker and dumped before a kill; a
restarted server publishes a new address and leaves find it again.
"""

from __future__ import annotations

import argparse

import anyio

from otp_agents.voice.inference import abstract_address
from otp_agents.voice.inference_server import InferenceServer, ProcessRecognizer, listen
from otp_agents.worker import Worker, run


async def main(worker: Worker) -> None:
    p = argparse.ArgumentParser(prog="inference_server")
    p.add_argument("--name", default="inference", help="service name the leaves look up")
    p.add_argument("--pool", type=int, default=2, help="recognisers (models in memory) serving at once")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond the pool")
    args = p.parse_args(worker.args)
    recognizers = [ProcessRecognizer() for _ in range(args.pool)]
    async with anyio.create_task_group() as loading:  # load the models side by side
        for r in recognizers:
            loading.start_soon(r.start)
    server = InferenceServer(list(recognizers), max_queue=args.max_queue)
    address = abstract_address(worker.path.replace("/", "."))
    listener = await listen(address)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(server.serve, listener)
        await worker.publish(args.name, address)
        await worker.ready()
        await worker.log(f"serving {args.name} at {address} with {args.pool} recognisers")
        last = 0
        while not worker.stopping:
            with anyio.move_on_after(5.0):
                await worker.wait_stopping()
            if server.stats.served != last:
                await worker.report("inference_requests", server.stats.served - last)
                last = server.stats.served
        tg.cancel_scope.cancel()
    for r in recognizers:
        await r.aclose()


if __name__ == "__main__":
    run(main)
