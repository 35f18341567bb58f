"""A user's LLM as the agent: the chat-completions agent against a stand-in server on loopback
that speaks the OpenAI streaming protocol (server-sent events), inside a real call.

asyncio only: the agent uses aiohttp, which has no trio support."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from otp_agents.voice.agent import ChatMessage, Conversation, Session
from otp_agents.voice.llm_agent import ChatCompletionsAgent
from otp_agents.voice.providers import ProviderError, ProviderStats

from .loopback_http import serve_app
from .voice_helpers import FAST_RETRY, caller, hold_call, needs_tts

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class StandIn:
    """Answers /v1/chat/completions: fails with the queued statuses first, then streams."""

    def __init__(self, answer: str, fail: list[int] | None = None) -> None:
        self.answer = answer
        self.fail = list(fail or [])
        self.requests: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.fail:
            status = self.fail.pop(0)
            return web.Response(status=status, text=json.dumps({"error": {"message": f"status {status}"}}))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in self.answer.split(" "):
            chunk = {"choices": [{"index": 0, "delta": {"content": word + " "}}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def serve(stand_in: StandIn) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", stand_in.handle)
    async with serve_app(app) as port:
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture
async def green() -> AsyncIterator[tuple[StandIn, str]]:
    stand_in = StandIn("Your favorite color is green. Anything else?")
    async for url in serve(stand_in):
        yield stand_in, url


async def test_streams_the_reply_and_sends_history_and_user_data(green: tuple[StandIn, str]) -> None:
    stand_in, url = green
    agent = ChatCompletionsAgent("llm", url, "tiny-model", api_key="k")
    convo = Conversation(
        agent="llm",
        history=[ChatMessage("user", "hello"), ChatMessage("assistant", "hi")],
        userdata={"name": "anna"},
    )
    chunks = [c async for c in agent.reply("what is my favorite color", Session(convo))]
    assert len(chunks) > 3  # token by token, not one block
    assert "".join(chunks).strip() == "Your favorite color is green. Anything else?"
    sent = stand_in.requests[0]
    assert sent["model"] == "tiny-model" and sent["stream"] is True
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["system", "system", "user", "assistant", "user"]
    assert "name=anna" in sent["messages"][1]["content"]


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [(503, "server", True), (429, "rate_limit", True), (401, "auth", False), (400, "bad_request", False)],
)
async def test_http_errors_become_provider_errors(status: int, kind: str, retryable: bool) -> None:
    stand_in = StandIn("unused", fail=[status])
    async for url in serve(stand_in):
        agent = ChatCompletionsAgent("llm", url, "m")
        with pytest.raises(ProviderError) as info:
            async for _ in agent.reply("hi", Session(Conversation(agent="llm"))):
                pass
        assert (info.value.kind, info.value.retryable) == (kind, retryable)


async def test_nothing_listening_is_a_retryable_connection_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        agent = ChatCompletionsAgent("llm", f"http://127.0.0.1:{port}/v1", "m")
        with pytest.raises(ProviderError) as info:
            async for _ in agent.reply("hi", Session(Conversation(agent="llm"))):
                pass
    assert info.value.kind == "connection" and info.value.retryable


@needs_tts
async def test_in_a_call_a_flaky_llm_is_retried_and_its_answer_spoken(tmp_path: Path) -> None:
    stand_in = StandIn("Your favorite color is green. Anything else?", fail=[503, 503])
    async for url in serve(stand_in):
        agent = ChatCompletionsAgent("receptionist", url, "m")
        stats = ProviderStats()
        wav = caller(tmp_path, "What is my favorite color?\n")
        call = await hold_call(tmp_path, wav, agents={"receptionist": agent}, stats=stats)
    assert stats.errors[("receptionist", "server")] == 2
    assert call.said() == ["Your favorite color is green. Anything else?"]
    assert stand_in.requests[-1]["messages"][-1] == {"role": "user", "content": "what is my favorite color"}


@needs_tts
async def test_in_a_call_a_refusing_llm_gives_the_fallback_line(tmp_path: Path) -> None:
    stand_in = StandIn("unused", fail=[401] * 10)
    async for url in serve(stand_in):
        agent = ChatCompletionsAgent("receptionist", url, "m")
        stats = ProviderStats()
        wav = caller(tmp_path, "What is my favorite color?\n")
        call = await hold_call(tmp_path, wav, agents={"receptionist": agent}, stats=stats)
    assert len(stand_in.requests) == 1  # auth errors are not retried
    assert stats.errors[("receptionist", "auth")] == 1
    assert len(call.of("fallback")) == 1
    assert FAST_RETRY.retries == 3
