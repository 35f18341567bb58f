"""LiveKit's own example apps, unmodified, run offline by configuration only (``--providers
offline`` and a scripted LLM), as supervised leaves in console mode.

The caller speaks each line with flite when the agent listens; the app's own session hears it
with pocketsphinx, its scripted LLM calls the app's real function tools, hand-offs really switch
agents, and the agent's audio that comes back is run through the real VAD and STT again. The
examples are kept byte for byte (tests/agents_apps/livekit/SOURCE.md; their hashes are checked
in test_agents_server.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from .helpers import ROOT, tree_of, worker
from .voice_helpers import listen, needs_tts

pytest.importorskip("livekit.agents")

from otp_agents.events import Kind
from otp_agents.voice.agents_console import WIRE_RATE, CallLog, ConsoleCall
from otp_agents.voice.audio import SAMPLE_RATE, resample
from otp_agents.voice.samples import speak_flite

pytestmark = [pytest.mark.anyio, needs_tts]

EXAMPLES = ROOT / "tests" / "agents_apps" / "livekit"
SCRIPTS = ROOT / "tests" / "agents_apps" / "scripts"
STEP = 90.0  # failure bound for one step of a call in real time; never a speed claim


def listening(log: CallLog) -> bool:
    return log.states[-1:] == ["AS_LISTENING"]


@asynccontextmanager
async def offline_call(app: Path, script: Path) -> AsyncIterator[ConsoleCall]:
    call = ConsoleCall()
    async with anyio.create_task_group() as tg:
        address = await tg.start(call.serve)
        args = [str(app), "--console", address, "--providers", "offline", "--llm-script", str(script)]
        leaf = worker("agent", "workers.agents_host:main", args=args, restart="transient", shutdown=10)
        config = {"id": "root", "intensity": 0, "children": [{**leaf, "start_timeout": 90}]}
        async with tree_of(config) as (_tree, rec):
            yield call
            assert rec.of(Kind.CHILD_EXITED) == []  # the call held: no crash, no restart
        tg.cancel_scope.cancel()


async def converse(call: ConsoleCall, lines: list[tuple[str, int]], greeted: int) -> None:
    """Speak each line once the agent listens; wait for the ``n`` replies it makes."""
    await call.wait_for(lambda log: len(log.said) >= greeted and listening(log), STEP)
    for text, replies in lines:
        before = len(call.log.said)
        await call.say(speak_flite(text, "kal16"), SAMPLE_RATE)
        await call.wait_for(lambda log: len(log.said) >= before + replies and listening(log), STEP)  # noqa: B023


async def heard_back(log: CallLog, word: str) -> bool:
    """Some reply of the agent, run back through the real VAD and STT, has ``word`` in it."""
    for reply in log.replies:
        segments = await listen(resample(reply.audio, WIRE_RATE, SAMPLE_RATE))
        if word in " ".join(words for _s, _e, words in segments).lower():
            return True
    return False


async def test_basic_agent_calls_its_weather_tool_and_answers_from_history() -> None:
    async with offline_call(EXAMPLES / "basic_agent.py", SCRIPTS / "basic_agent.toml") as call:
        lines = [("What is the weather like today", 1), ("My name is Alice", 1), ("What is my name", 1)]
        await converse(call, lines, greeted=1)
    log = call.log
    assert [t.name for t in log.tools] == ["lookup_weather"]
    assert log.tools[0].output == "sunny with a temperature of 70 degrees."  # the app's own tool ran
    assert "sunny with a temperature of 70 degrees" in log.said[1]
    # "what is my name" is answered from the chat context: the name is nowhere in the script
    assert log.said[3].lower() == "your name is alice."
    assert len(log.said) == 1 + len(lines)  # every line answered
    assert await heard_back(log, "alice")


async def test_restaurant_hands_off_to_its_reservation_agent_whose_tools_run() -> None:
    script = SCRIPTS / "restaurant.toml"
    async with offline_call(EXAMPLES / "restaurant_agent.py", script) as call:
        lines = [
            ("I would like to make a reservation", 2),
            ("At seven in the evening", 1),
            ("My name is Alice", 1),
        ]
        await converse(call, lines, greeted=1)
    log = call.log
    assert ("greeter", "reservation") in log.handoffs  # the app's own agents switched
    names = [t.name for t in log.tools]
    assert names == ["to_reservation", "update_reservation_time", "update_name"]
    assert log.tools[1].output.startswith("The reservation time is updated to")
    assert log.tools[2].output == "The name is updated to alice"
    assert log.said[2].startswith("This is reservations")  # the reservation agent speaking
    assert await heard_back(log, "reservation")


async def test_drive_thru_takes_an_order_through_its_order_tool() -> None:
    async with offline_call(EXAMPLES / "drive_thru" / "agent.py", SCRIPTS / "drive_thru.toml") as call:
        await converse(call, [("Can I get a cheeseburger please", 1), ("Nothing else thanks", 1)], greeted=0)
    log = call.log
    names = [t.name for t in log.tools]
    assert names == ["order_regular_item", "list_order_items"]
    assert log.tools[0].output.startswith("The item was added")
    assert "cheeseburger" in log.tools[1].output  # the order the app keeps, as it lists it
    assert await heard_back(log, "cheeseburger")
