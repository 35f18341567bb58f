"""Leaf: one LiveKit Agents job, forked from its app's zygote.

``module = "workers.agents_job:main"``, ``zygote = "<app image>"``; the dispatcher starts one
per accepted job with ``--ticket FILE`` (and ``--job``, ``--room`` and ``--caller`` so that
``status`` and the events say which call a leaf holds). The app and its providers come from the
zygote (``OTP_AGENTS_APP*`` in the environment say which); a leaf started cold, while its zygote
is down, loads them itself. See :mod:`otp_agents.voice.agents_leaf`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from otp_agents.worker import Worker, run


async def main(worker: Worker) -> None:
    p = argparse.ArgumentParser(prog="agents_job")
    p.add_argument("--ticket", required=True, help="the job, as the dispatcher accepted it")
    p.add_argument("--job", default="", help="its id (for status and events; the ticket says)")
    p.add_argument("--room", default="", help="its room (for status and events)")
    p.add_argument("--caller", default="", help="the participant it is for (for status and events)")
    args = p.parse_args(worker.args)
    try:
        from otp_agents.errors import OtpAgentsError
        from otp_agents.voice import agents_ticket, agents_zygote
        from otp_agents.voice.agents_leaf import log_with_job, run_job
    except ImportError as exc:
        await fail(worker, f"livekit-agents is not installed ({exc}); pip install 'otp-agents[agents]'")
    try:
        ticket = agents_ticket.read(args.ticket)
    except OtpAgentsError as exc:
        await fail(worker, str(exc))
    log_with_job(ticket)
    app = agents_zygote.prepared()
    forked = app is not None
    if app is None:  # started cold: load the app here, as the zygote would have
        try:
            app = agents_zygote.load(agents_zygote.AppImage.from_environ())
        except OtpAgentsError as exc:
            await fail(worker, str(exc))
    sys.exit(await run_job(worker, app, ticket, forked=forked))


async def fail(worker: Worker, message: str, code: int = 2) -> NoReturn:
    await worker.log(f"agents job: {message}", logging.ERROR)
    sys.stderr.write(f"agents job: {message}\n")
    worker.exit_reason = message
    sys.exit(code)


if __name__ == "__main__":
    run(main)
