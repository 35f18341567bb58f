"""A protocol worker started as a script (``script = "workers/script_worker.py"``).

It reports its arguments in a log frame, then waits to be stopped.
"""

from __future__ import annotations

from otp_agents.worker import Worker, run


async def main(worker: Worker) -> None:
    await worker.ready()
    await worker.log("args=" + ",".join(worker.args))
    await worker.wait_stopping()


if __name__ == "__main__":
    run(main)
