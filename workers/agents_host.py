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
from pathlib import Path
from typing import NoReturn

from otp_agents.worker import Worker, run


async def main(worker: Worker) -> None:
    # LiveKit Agents logs what goes wrong in a job (a tool that raised, a provider error) and
    # nothing else says it: to stderr, which the supervisor keeps in this leaf's log.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
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
    p.add_argument(
        "--providers",
        choices=["app", "offline"],
        default="app",
        help="app: the providers the app's code names; offline: local ones in their place (no network)",
    )
    p.add_argument(
        "--llm-script", type=Path, metavar="FILE", help="offline: the scripted test-double LLM's script"
    )
    p.add_argument(
        "--llm-url", metavar="URL", help="offline: a real model, an OpenAI-compatible /v1 base URL"
    )
    p.add_argument("--llm-model", default="local", metavar="NAME", help="the model name sent to --llm-url")
    args = p.parse_args(worker.args)
    try:
        from otp_agents.voice.agents_app import AgentFileError, load_app
        from otp_agents.voice.agents_host import run_console, run_server
    except ImportError as exc:
        await fail(worker, f"livekit-agents is not installed ({exc}); pip install 'otp-agents[agents]'")
    offline = None
    if args.providers == "offline":
        from otp_agents.voice.agents_offline import Offline, install

        offline = Offline(llm_script=args.llm_script, llm_url=args.llm_url, llm_model=args.llm_model)
        for line in install(offline):
            await worker.log(f"agents host: offline: {line}")
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
                offline=offline,
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
