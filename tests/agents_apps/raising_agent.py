"""A LiveKit Agents app whose entrypoint raises at once (its process and import are fine)."""

from livekit.agents import AgentServer, JobContext, cli

server = AgentServer()


class BrokenConfiguration(RuntimeError):
    pass


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    raise BrokenConfiguration(f"no prompt configured for room {ctx.room.name}")


if __name__ == "__main__":
    cli.run_app(server)
