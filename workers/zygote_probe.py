"""A protocol worker that reports what a forked worker must get right: its own random state, a
working ``logging`` setup, and its file descriptors. Used by the zygote tests.

``module = "workers.zygote_probe:main"``, args: ``LOGFILE``. It logs one line through the
``logging`` module into LOGFILE and sends the supervisor a log line
``probe pid=… random=… numpy=… fds=…`` (numpy only if it is already imported).
"""

from __future__ import annotations

import logging
import os
import random
import sys

from otp_agents.worker import Worker, run


async def main(worker: Worker) -> None:
    logging.basicConfig(filename=worker.args[0], level=logging.INFO, format="%(process)d %(message)s")
    logging.getLogger("probe").info("hello from the probe")
    numpy = sys.modules.get("numpy")
    drawn = numpy.random.randint(0, 2**31) if numpy is not None else -1
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    await worker.log(f"probe pid={os.getpid()} random={random.getrandbits(64)} numpy={drawn} fds={fds}")
    await worker.ready()
    await worker.wait_stopping()


if __name__ == "__main__":
    run(main)
