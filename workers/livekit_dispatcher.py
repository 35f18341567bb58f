"""The LiveKit dispatcher: registers this node with a LiveKit server as an agent worker and runs
every job it accepts as a voice leaf under a simple_one_for_one supervisor (see
``otp_agents/voice/dispatch.py``).

``module = "workers.livekit_dispatcher:main"``, args: ``--jobs PATH`` (the jobs' supervisor),
``--agent-name``, ``--max-jobs``, ``--load-threshold``. Needs LIVEKIT_URL, LIVEKIT_API_KEY and
LIVEKIT_API_SECRET (a missing or malformed one fails the start, naming it). List it *after* the
jobs' supervisor in the tree: it then stops first, and its drain (no new jobs, running calls
finish within the shutdown bound) happens while the calls are still up.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import anyio
from livekit import api

from otp_agents.ops.control_client import CONTROL_SERVICE
from otp_agents.voice.dispatch import Dispatcher
from otp_agents.voice.dispatch_state import Launch
from otp_agents.voice.room import LiveKitEnv
from otp_agents.worker import Worker, run


def job_args(launch: Launch) -> list[str]:
    # The identity the availability answer promised the server (agent-<job id>).
    job = launch.job
    args = ["--room", job.room.name, "--job", job.id, "--identity", f"agent-{job.id}"]
    if job.participant.identity:
        args += ["--listen-to", job.participant.identity]
    return args


async def main(worker: Worker) -> None:
    p = argparse.ArgumentParser(prog="livekit_dispatcher")
    p.add_argument("--jobs", required=True, help="path of the simple_one_for_one supervisor for the jobs")
    p.add_argument("--agent-name", default=None, help="default: the app's, else none")
    p.add_argument("--max-jobs", type=int, default=8)
    p.add_argument("--load-threshold", type=float, default=None, help="default: the app's, else 0.7")
    p.add_argument("--status-interval", type=float, default=2.5)
    p.add_argument(
        "--app",
        action="store_true",
        help="jobs of a LiveKit Agents app (its zygote's, or OTP_AGENTS_APP): its options, tickets",
    )
    p.add_argument("--tickets", type=Path, help="--app: where the jobs' tickets are written")
    args = p.parse_args(worker.args)
    if args.jobs.startswith("../"):  # a sibling of this dispatcher (as an app pool has it)
        args.jobs = f"{worker.path.rpartition('/')[0]}/{args.jobs[3:]}"
    env = LiveKitEnv.from_environ()  # a missing or malformed variable fails the start, named
    app = load_app(args) if args.app else None  # before Ready: a cold load blocks this loop
    await worker.ready()
    # The control socket opens once the whole tree has started, which includes us: look it up now.
    control_socket = None
    with anyio.move_on_after(30):
        while control_socket is None:
            control_socket = await worker.lookup(CONTROL_SERVICE)
            if control_socket is None:
                await anyio.sleep(0.1)
    if control_socket is None:
        raise SystemExit("livekit_dispatcher: no control socket (the tree must run under `otp-agents run`)")

    def token() -> str:
        grants = api.VideoGrants(agent=True)
        return (
            api.AccessToken(env.api_key, env.api_secret)
            .with_identity("otp-agents")
            .with_grants(grants)
            .to_jwt()
        )

    def log(line: str) -> None:
        worker_log.append(line)

    worker_log: list[str] = []
    dispatcher = Dispatcher(
        url=env.url,
        token=token,
        control_socket=control_socket,
        jobs_supervisor=args.jobs,
        job_args=job_args,
        agent_name=args.agent_name or "",
        max_jobs=args.max_jobs,
        load_threshold=0.7 if args.load_threshold is None else args.load_threshold,
        status_interval=args.status_interval,
        log=log,
    )
    if app is not None:
        for line in for_app(dispatcher, app, args, env.url):
            await worker.log(f"livekit_dispatcher: {line}")
    async with anyio.create_task_group() as tg:
        tg.start_soon(dispatcher.run)

        async def forward_log() -> None:
            said: tuple[bool, float] | None = None
            while True:
                while worker_log:
                    await worker.log(worker_log.pop(0))
                # For metrics and alerts: connected to the server? how loaded (running / max)?
                state = (dispatcher.registered, round(dispatcher.load, 3))
                if state != said:
                    await worker.report("dispatcher_connected", float(state[0]))
                    await worker.report("dispatcher_load", state[1])
                    said = state
                await anyio.sleep(0.1)

        tg.start_soon(forward_log)
        await worker.wait_stopping()
        bound = (worker.shutdown_timeout or 10.0) * 0.7
        await dispatcher.drain(bound)
        while worker_log:
            await worker.log(worker_log.pop(0))
        tg.cancel_scope.cancel()


def load_app(args: argparse.Namespace) -> Any:
    """The app: its zygote's, or (started cold) loaded here without its prewarm (no job runs in
    this process)."""
    from otp_agents.voice import agents_zygote

    return agents_zygote.prepared() or agents_zygote.load(
        agents_zygote.AppImage.from_environ(), prewarm=False
    )


def for_app(dispatcher: Dispatcher, app: Any, args: argparse.Namespace, url: str) -> list[str]:
    """Take the app's own options (the tree's overrides win) and launch its jobs from tickets."""
    from otp_agents.voice.agents_dispatch import Tickets, app_options, ticket_args

    options = app_options(
        app.server, agent_name=args.agent_name, load_threshold=args.load_threshold, max_jobs=args.max_jobs
    )
    folder = args.tickets or Path(tempfile.mkdtemp(prefix="otp-agents-tickets-"))
    dispatcher.agent_name = options.agent_name
    dispatcher.load_threshold = options.load_threshold
    dispatcher.load_fnc = options.load_fnc
    dispatcher.job_memory = options.job_memory
    dispatcher.decide = options.decide
    tickets = Tickets(folder)
    dispatcher.job_args = ticket_args(folder, url)
    dispatcher.on_end = tickets.forget
    dispatcher.adopted = tickets.adopted
    return [f"app {app.image.app}", *options.said]


if __name__ == "__main__":
    run(main)
