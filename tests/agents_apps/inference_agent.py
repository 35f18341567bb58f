"""A LiveKit Agents app that registers an inference runner (as a turn detector plugin does for
its end-of-utterance model) and asks its job's inference executor for a result."""

from __future__ import annotations

import logging
import os

from livekit.agents import AgentServer, JobContext
from livekit.agents.inference_runner import _InferenceRunner


class Shout(_InferenceRunner):
    INFERENCE_METHOD = "otp_agents_test_shout"

    def initialize(self) -> None:
        self.loaded_in = os.getpid()

    def run(self, data: bytes) -> bytes | None:
        return data.upper() + f" loaded in {self.loaded_in}".encode()


_InferenceRunner.register_runner(Shout)

server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    said = await ctx.inference_executor.do_inference(Shout.INFERENCE_METHOD, b"ping")
    logging.getLogger("app").warning("inference said %s in job process %d", said, os.getpid())
