"""The LLMs a hosted app gets offline, driven directly with LiveKit's own chat contexts and tools:
the scripted test double (keyed on the caller's words, reading history from the chat context)
and the OpenAI-compatible client for a real local model (against a labelled stand-in server that
speaks the chat-completions streaming format). asyncio only: livekit-agents runs on asyncio."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("livekit.agents")

from aiohttp import web
from livekit.agents import llm

from otp_agents.voice.agents_openai import OpenAICompatibleLLM
from otp_agents.voice.agents_script import Script, ScriptedLLM, ScriptError

from .loopback_http import serve_app

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@llm.function_tool
async def book_table(time: str, name: str) -> str:
    """Book a table."""
    return f"booked {time} for {name}"


SCRIPT = """
greeting = "Hello there."

[[rule]]
when = ["*enter*"]
agent = ["booking desk"]
say = "Booking desk here."

[[rule]]
when = ["book", "table"]
call = [{ tool = "book_table", args = { time = "{user:at (\\\\w+)}", name = "{user:name is (\\\\w+)}" } }]
say = "Done: {result}"

[[rule]]
when = ["my name"]
say = "Your name is {user:name is (\\\\w+)}."

[[rule]]
when = []
say = "Pardon?"
"""


def chat(*items: tuple[str, str], instructions: str = "You are the booking desk.") -> llm.ChatContext:
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="system", content=instructions)
    for role, text in items:
        ctx.add_message(role=role, content=text)  # type: ignore[arg-type]
    return ctx


async def ask(
    model: llm.LLM[Any], ctx: llm.ChatContext, **kwargs: Any
) -> tuple[str, list[llm.FunctionToolCall]]:
    async with model.chat(chat_ctx=ctx, tools=[book_table], **kwargs) as stream:
        text, calls = "", []
        async for chunk in stream:
            if chunk.delta is not None:
                text += chunk.delta.content or ""
                calls.extend(chunk.delta.tool_calls)
    return text, calls


@pytest.fixture
def scripted(tmp_path: Path) -> ScriptedLLM:
    path = tmp_path / "script.toml"
    path.write_text(SCRIPT)
    return ScriptedLLM(path)


async def test_tool_calls_then_the_reply_that_follows_their_results(scripted: ScriptedLLM) -> None:
    ctx = chat(("user", "my name is Ada"), ("assistant", "Hi Ada."), ("user", "book a table at seven"))
    text, calls = await ask(scripted, ctx)
    assert text == "" and [c.name for c in calls] == ["book_table"]
    assert json.loads(calls[0].arguments) == {"time": "seven", "name": "Ada"}  # Ada: from the history
    # the app runs the tool and hands its result back: now the rule's words, with the result
    ctx.insert(llm.FunctionCall(call_id=calls[0].call_id, name="book_table", arguments=calls[0].arguments))
    ctx.insert(
        llm.FunctionCallOutput(call_id=calls[0].call_id, name="book_table", output="booked", is_error=False)
    )
    text, calls = await ask(scripted, ctx)
    assert (text, calls) == ("Done: booked", [])


async def test_keyed_on_words_not_on_how_many_calls_came_before(scripted: ScriptedLLM) -> None:
    """A speculative call, a retry: the same chat gets the same answer, however often it is asked."""
    ctx = chat(("user", "my name is Grace"), ("assistant", "Hello."), ("user", "what is my name"))
    answers = [await ask(scripted, ctx) for _ in range(3)]
    assert answers == [("Your name is Grace.", [])] * 3


async def test_what_an_answer_depends_on_comes_from_the_chat_context(scripted: ScriptedLLM) -> None:
    without = chat(("user", "what is my name"))
    assert (await ask(scripted, without))[0] == "Your name is ."  # nothing in the history: nothing said
    told = chat(("user", "my name is Linus"), ("assistant", "ok"), ("user", "what is my name"))
    assert (await ask(scripted, told))[0] == "Your name is Linus."


async def test_the_agents_own_turn_and_the_greeting(scripted: ScriptedLLM) -> None:
    assert (await ask(scripted, chat(instructions="You are the booking desk.")))[0] == "Booking desk here."
    assert (await ask(scripted, chat(instructions="You are someone else.")))[0] == "Hello there."
    said = chat(("user", "book a table at nine"), instructions="You are the booking desk.")
    assert (await ask(scripted, said, tool_choice="none"))[0] == "Booking desk here."  # no tools now


async def test_a_tool_the_agent_does_not_offer_is_never_called(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[[rule]]\nwhen = ["x"]\ncall = [{ tool = "not_offered" }]\nsay = "no tool"\n')
    text, calls = await ask(ScriptedLLM(path), chat(("user", "x")))
    assert (text, calls) == ("no tool", [])


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[[rule]]\nwhen = "x"\n', "rule[0]"),
        ("[[rule]]\nwhen = []\ncall = [{ args = {} }]\n", "rule[0].call[0]"),
        ('[[rule]]\nwhen = []\nsay = "{user:(}"\n', "rule[0]: bad pattern"),
        ("not toml [", "s.toml"),
    ],
)
def test_a_bad_script_is_refused_naming_the_rule(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ScriptError, match=where.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        Script.load(path)


# -- a real model behind an OpenAI-compatible URL ------------------------------------------------


class ChatCompletions:
    """A stand-in for an OpenAI-compatible server (**not** a model): it records each request and
    streams back a tool call the first time, text after the tool's result."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        deltas: list[dict[str, Any]]
        if body["messages"][-1]["role"] == "tool":
            deltas = [{"content": "Your table "}, {"content": "is booked."}]
        else:  # one tool call, its arguments in two pieces
            first = {"name": "book_table", "arguments": '{"time": "7",'}
            deltas = [
                {"tool_calls": [{"index": 0, "id": "call_1", "function": first}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": ' "name": "Ada"}'}}]},
            ]
        chunks = [{"choices": [{"delta": delta}]} for delta in deltas]
        for chunk in chunks:
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


@asynccontextmanager
async def completions() -> AsyncIterator[tuple[ChatCompletions, str]]:
    stand_in = ChatCompletions()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", stand_in.handle)
    async with serve_app(app) as port:
        yield stand_in, f"http://127.0.0.1:{port}/v1"


async def test_a_real_model_gets_the_history_and_the_tools_and_its_tool_calls_come_back() -> None:
    async with completions() as (server, url):
        model = OpenAICompatibleLLM(url, "my-model")
        ctx = chat(("user", "book a table at seven for Ada"))
        text, calls = await ask(model, ctx)
        assert text == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("book_table", {"time": "7", "name": "Ada"})
        ]
        sent = server.requests[0]
        assert sent["model"] == "my-model" and sent["stream"] is True
        assert sent["messages"][-1] == {"role": "user", "content": "book a table at seven for Ada"}
        assert [t["function"]["name"] for t in sent["tools"]] == ["book_table"]
        ctx.insert(llm.FunctionCall(call_id="call_1", name="book_table", arguments=calls[0].arguments))
        ctx.insert(
            llm.FunctionCallOutput(call_id="call_1", name="book_table", output="booked", is_error=False)
        )
        text, calls = await ask(model, ctx)
        assert (text, calls) == ("Your table is booked.", [])


def test_offline_install_resolves_cloud_providers_and_loads_missing_plugins() -> None:
    """In a fresh interpreter (the install patches LiveKit for the whole process)."""
    import subprocess

    code = (
        "from otp_agents.voice.agents_offline import Offline, install\n"
        "install(Offline())\n"
        "from livekit.agents import inference, AgentSession\n"
        "from livekit.plugins import deepgram, openai, noise_cancellation\n"
        "from livekit.plugins.openai import realtime\n"
        "from livekit.plugins.turn_detector.multilingual import MultilingualModel\n"
        "print(type(inference.STT('deepgram/nova-3', language='multi')).__name__)\n"
        "print(type(inference.TTS.from_model_string('cartesia/sonic-3')).__name__)\n"
        "print(type(inference.llm_from_model_string('openai/gpt-4.1-mini')).__name__)\n"
        "print(type(deepgram.STT(model='nova-3')).__name__, type(openai.LLM(model='x')).__name__)\n"
        "print(noise_cancellation.BVC())\n"
        "print(type(MultilingualModel()).__name__)\n"
        "try:\n    realtime.RealtimeModel(voice='alloy')\nexcept Exception as exc:\n    print(exc)\n"
        # a server the app names itself is the user's own model: kept
        "print(openai.LLM(model='llama3', base_url='http://127.0.0.1:8080/v1').provider)\n"
        "print(openai.LLM.with_ollama(model='llama3').provider)\n"
        "print(type(openai.LLM.with_groq(model='llama3')).__name__)\n"
        "import os; os.environ['OPENAI_BASE_URL'] = 'http://127.0.0.1:8081/v1'\n"
        "print(openai.LLM(model='m').provider)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "SphinxSTT",
        "FliteTTS",
        "RuleLLM",
        "SphinxSTT RuleLLM",
        "None",
        "TurnDetector",
        "livekit.plugins.openai.realtime.RealtimeModel has no offline counterpart (providers = offline)",
        "http://127.0.0.1:8080/v1/chat/completions",
        "http://localhost:11434/v1/chat/completions",
        "RuleLLM",
        "http://127.0.0.1:8081/v1/chat/completions",
    ]
