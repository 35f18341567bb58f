"""A stand-in for a voice leaf in the dispatcher tests: takes the leaf's job arguments
(``--room NAME --job ID``) and behaves by the room's name, so each job outcome can be provoked:

* ``fail-*``: exits with code 3 at once (a crash);
* ``done-*``: exits 0 after half a second (a call that ended);
* anything else: runs until stopped.
"""

from __future__ import annotations

import argparse

import anyio

from otp_agents.worker import Worker, run


async def main(worker: Worker) -> None:
    p = argparse.ArgumentParser(prog="job_probe")
    p.add_argument("--room", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--listen-to", default=None)
    p.add_argument("--identity", default=None)
    args = p.parse_args(worker.args)
    await worker.ready()
    if args.room.startswith("fail-"):
        raise SystemExit(3)
    if args.room.startswith("done-"):
        await anyio.sleep(0.5)
        return
    await worker.wait_stopping()


if __name__ == "__main__":
    run(main)
