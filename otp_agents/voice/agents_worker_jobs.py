"""What a hosted LiveKit worker's own job processes get (``agents_host --server``), so the same
jobs run the same way there as in the app pool:

- **offline providers**: LiveKit forks its job processes from a forkserver, a fresh interpreter
  that never saw the host's :func:`~otp_agents.voice.agents_offline.install`. The host names
  :mod:`otp_agents.voice.agents_offline_preload` in the server's ``preload_modules`` and passes
  the configuration in the environment, so the forkserver installs the offline providers before
  it imports the app, and every job process inherits them.
- **a stand-in's console audio**: a job offered by the protocol stand-in (no rooms, no media)
  carries its caller's console address in its metadata (:data:`CONSOLE_KEY`). Such a job is
  launched as a fake job (LiveKit's mock room) and its entrypoint first wires LiveKit's console
  I/O to that address, as the pool's leaves do. Other jobs are untouched.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from livekit.agents import AgentServer

    from otp_agents.voice.agents_offline import Offline

CONSOLE_KEY = "otp_agents_console"  # stand-in jobs: the console peer, in the job's metadata
ENV_OFFLINE = "OTP_AGENTS_OFFLINE"  # JSON: the Offline configuration for the forkserver
PRELOAD = "otp_agents.voice.agents_offline_preload"

Entry = Callable[[Any], Awaitable[None]]


def metadata_console(metadata: str | None) -> str | None:
    """The console address a stand-in's job metadata names, if any."""
    try:
        found = json.loads(metadata or "{}").get(CONSOLE_KEY)
    except (ValueError, AttributeError, TypeError):
        return None
    return str(found) if found else None


def offline_env(offline: Offline) -> str:
    return json.dumps(
        {
            "llm_script": str(offline.llm_script) if offline.llm_script else None,
            "llm_url": offline.llm_url,
            "llm_model": offline.llm_model,
            "voice": offline.voice,
        }
    )


def offline_from_env() -> Offline | None:
    from otp_agents.voice.agents_offline import Offline

    raw = os.environ.get(ENV_OFFLINE)
    if not raw:
        return None
    found = json.loads(raw)
    script = found.get("llm_script")
    return Offline(
        llm_script=Path(script) if script else None,
        llm_url=found.get("llm_url"),
        llm_model=found.get("llm_model") or "local",
        voice=found.get("voice") or "kal16",
    )


def prepare(server: AgentServer, offline: Offline | None) -> None:
    """Before ``server.run()``: offline providers for its forkserver, console jobs for its entry."""
    if offline is not None:
        os.environ[ENV_OFFLINE] = offline_env(offline)
        preload = list(getattr(server, "_preload_modules", None) or [])
        server._preload_modules = [PRELOAD, *[m for m in preload if m != PRELOAD]]
    app_entry = server._entrypoint_fnc
    if app_entry is not None:
        # a partial of module-level functions: it reaches the job process by reference
        server._entrypoint_fnc = functools.partial(console_or_app, app_entry)


def fake_console_jobs(pool: Any) -> None:
    """Launch a stand-in's console jobs as fake jobs (a mock room: there is no room to join)."""
    launch = pool.launch_job

    async def launch_job(info: Any) -> None:
        if metadata_console(info.job.metadata):
            info.fake_job = True
        await launch(info)

    pool.launch_job = launch_job


def use_console(transport: Any) -> None:
    """Point LiveKit's console I/O (its audio input and output) at ``transport``, on the job's
    own loop: the session then hears and speaks over it instead of a room."""
    from livekit.agents.cli.cli import AgentsConsole
    from livekit.agents.cli.tcp_console import TcpAudioInput, TcpAudioOutput

    console = AgentsConsole.get_instance()
    console.enabled = True
    console.record = False
    console._tcp_transport = transport
    console._tcp_audio_input = TcpAudioInput()
    console._tcp_audio_output = TcpAudioOutput(transport)


async def console_or_app(app_entry: Entry, ctx: Any) -> None:
    """The job's entrypoint in LiveKit's job process: console I/O first if the job asks for it."""
    address = metadata_console(ctx.job.metadata)
    if address is not None:
        from livekit.agents.voice.remote_session import TcpSessionTransport

        host, _, port = address.rpartition(":")
        use_console(TcpSessionTransport(host, int(port)))
    await app_entry(ctx)


__all__ = [
    "CONSOLE_KEY",
    "console_or_app",
    "fake_console_jobs",
    "metadata_console",
    "offline_from_env",
    "prepare",
    "use_console",
]
