"""A LiveKit Agents app whose prewarm starts a thread (a metrics pusher, a model server client):
unsafe to fork from, so its zygote refuses it, naming the thread."""

from __future__ import annotations

import threading
import time

from livekit.agents import AgentServer, JobContext, JobProcess

server = AgentServer()


def prewarm(proc: JobProcess) -> None:
    threading.Thread(target=time.sleep, args=(3600,), name="metrics-pusher", daemon=True).start()


server.setup_fnc = prewarm


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
