"""A LiveKit Agents app that loads in the host but cannot be loaded by its job processes (which
run the file as ``__mp_main__``), as an app whose dependency is missing there would: every job
process dies before it is ready."""

from livekit.agents import AgentServer, JobContext, cli

if __name__ == "__mp_main__":
    raise ImportError("a dependency this app needs is not importable in its job processes")

server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()


if __name__ == "__main__":
    cli.run_app(server)
