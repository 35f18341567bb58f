"""Leaf: an unmodified LiveKit Agents app under otp-agents supervision.

``module = "workers.agents_host:main"``, args: ``AGENT_FILE`` and one of
``--console HOST:PORT`` (the console transport, offline: a session against that peer),
``--console-service NAME`` (the same, the peer's address looked up under NAME) or ``--server``
(register with the LiveKit server from LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET).
Needs the ``agents`` extra (``pip install 'otp-agents[agents]'``). See
:mod:`otp_agents.voice.agents_host`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from otp_agents.worker import Worker, run


async def main(worker: Worker) -> None:
    p = argparse.ArgumentParser(prog="agents_host")
    p.add_argument("agent", help="the LiveKit Agents app file (defines an AgentServer)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--console", metavar="HOST:PORT", help="run one console session against this peer")
    mode.add_argument("--console-service", metavar="NAME", help="the console peer's published service name")
    mode.add_argument("--server", action="store_true", help="take jobs from the LiveKit server in the env")
    p.add_argument(
        "--max-job-failures",
        type=int,
        default=3,
        metavar="N",
        help="server mode: end the leaf (exit 1) after N failed jobs in a row (default 3)",
    )
    p.add_argument(
        "--idle-processes",
        type=int,
        metavar="N",
        help="server mode: job processes kept warm (LiveKit's num_idle_processes; default: one per core)",
    )
    args = p.parse_args(worker.args)
    try:
        from otp_agents.voice.agents_app import AgentFileError, load_app
        from otp_agents.voice.agents_host import run_console, run_server
    except ImportError as exc:
        await fail(worker, f"livekit-agents is not installed ({exc}); pip install 'otp-agents[agents]'")
    try:
        server = load_app(args.agent, "start" if args.server else "console")
    except AgentFileError as exc:
        await fail(worker, str(exc))
    if args.server:
        sys.exit(
            await run_server(
                worker,
                server,
                args.agent,
                max_failures=args.max_job_failures,
                idle_processes=args.idle_processes,
            )
        )
    address = args.console
    if args.console_service:
        address = await worker.lookup(args.console_service, timeout=10.0)
        if address is None:
            await fail(worker, f"no service named {args.console_service!r}")
    sys.exit(await run_console(worker, server, address, args.agent))


async def fail(worker: Worker, message: str, code: int = 2) -> NoReturn:
    """Say why in the supervisor's event stream and on stderr, then exit."""
    await worker.log(f"agents host: {message}", logging.ERROR)
    sys.stderr.write(f"agents host: {message}\n")
    worker.exit_reason = message
    sys.exit(code)


if __name__ == "__main__":
    run(main)
