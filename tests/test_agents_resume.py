"""A LiveKit Agents call that survives its process: LiveKit's own examples, byte for byte and
offline by configuration, run as an app pool (see tests/test_agents_pool.py for how jobs and
callers are played); the job's leaf is SIGKILLed mid-call and its restart picks the call up from
the checkpoint the supervisor kept."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import anyio
import pytest

pytest.importorskip("livekit.agents")

from otp_agents.voice.agents_console import ConsoleCall

from .agents_helpers import APPS, BOUND, EXAMPLES, SCRIPTS, Pool, greeted, pool, say
from .voice_helpers import needs_tts

pytestmark = [pytest.mark.anyio, needs_tts, pytest.mark.timeout(600)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def stored(tmp: Path) -> bytes:
    """Every checkpoint file the supervisor keeps, as bytes."""
    return b"".join(f.read_bytes() for f in sorted((tmp / "state" / "checkpoints").glob("*.ckpt")))


async def until_stored(tmp: Path, needle: bytes) -> bytes:
    with anyio.fail_after(BOUND):
        while needle not in (found := stored(tmp)):  # noqa: ASYNC110 - another process's file
            await anyio.sleep(0.05)
    return found


async def kill_and_resume(p: Pool, job: str, call: ConsoleCall) -> None:
    """SIGKILL the leaf holding ``job`` (its latest start); return once its restart is back in
    the call and listening."""
    starts = len(p.started(job))
    os.kill(p.started(job)[-1]["pid"], signal.SIGKILL)
    await p.leaf(job, starts + 1)
    connections = starts + 1
    await call.wait_for(
        lambda log: log.connections == connections and log.states[-1:] == ["AS_LISTENING"], BOUND
    )


async def test_a_killed_job_resumes_its_call_without_a_new_greeting_and_remembers_it(tmp_path: Path) -> None:
    """LiveKit's basic_agent, byte for byte, offline, its checkpoints kept in memory only: the
    caller gives their name, the job's process is SIGKILLed, and its restart picks the call up
    from its checkpoint: no second greeting, and "what is my name" is answered from the
    conversation before the crash. Nothing of the call was written to disk."""
    script = SCRIPTS / "basic_agent.toml"
    memory_only = 'checkpoint = "memory"'
    async with pool(tmp_path, EXAMPLES / "basic_agent.py", script, max_jobs=2, extra=memory_only) as (p, tg):
        call = await p.call("R1", tg)
        first = await p.leaf("R1")
        await call.wait_for(greeted, BOUND)
        await say(call, "My name is Alice.")
        assert "alice" in call.log.said[-1].lower()
        greetings = len(call.log.said)

        os.kill(first["pid"], signal.SIGKILL)
        again = await p.leaf("R1", 2)
        await call.wait_for(lambda log: log.connections == 2 and log.states[-1:] == ["AS_LISTENING"], BOUND)
        resumed = await p.run.until(
            lambda ev: (
                [e for e in ev if e["path"] == again["path"] and "resumed" in (e.get("detail") or "")]
                or (["stderr"] if "resumed the call" in p.stderr() else [])
            ),
            "the resume",
        )
        assert resumed
        assert len(call.log.said) == greetings  # nothing said again on the restart
        # the restored chat_ctx holds the turns from before the crash (instructions, greeting,
        # the caller's name and its answer)
        restored = re.search(r"resumed the call: (\d+) items of history", p.stderr())
        assert restored is not None and int(restored.group(1)) >= 3
        await say(call, "What is my name?")
        assert "your name is alice" in call.log.said[-1].lower()  # from before the crash
        assert stored(tmp_path) == b""  # memory only: the call never reached the disk
        # measured like the project's own voice leaves: the resume gap and the turns
        reported = {
            e["reason"] for e in p.run.events() if e["kind"] == "worker_report" and e["path"] == again["path"]
        }
        assert {"resumed_listening", "voice_turns"} <= reported  # latency: when LiveKit measured it


async def test_a_killed_restaurant_call_resumes_mid_booking_and_mid_checkout_without_the_card(
    tmp_path: Path,
) -> None:
    """LiveKit's restaurant example, byte for byte, offline.

    A booking: the greeter hands the caller to the reservation agent, the time is given, the
    job's process is SIGKILLed. The restart resumes with the reservation agent still talking (not
    back at the greeter), says nothing on its own, and the next line is taken by the reservation
    agent's own tool.

    A takeaway: ordered, the expense confirmed, the card given to the checkout agent's tool. No
    checkpoint file ever holds the card's number, expiry or CVV. After a SIGKILL the checkout
    agent still has the order and the confirmed expense, and asks for the card again: it was
    never kept."""
    script = SCRIPTS / "restaurant.toml"
    async with pool(tmp_path, EXAMPLES / "restaurant_agent.py", script, max_jobs=2) as (p, tg):
        call = await p.call("B1", tg)
        first = await p.leaf("B1")
        await call.wait_for(greeted, BOUND)
        await say(call, "I would like to make a reservation", replies=2)
        await say(call, "At seven in the evening")
        assert ("greeter", "reservation") in call.log.handoffs
        said, tools = len(call.log.said), len(call.log.tools)

        os.kill(first["pid"], signal.SIGKILL)
        await p.leaf("B1", 2)
        await call.wait_for(lambda log: log.connections == 2 and log.states[-1:] == ["AS_LISTENING"], BOUND)
        await say(call, "My name is Alice")
        assert len(call.log.said) == said + 1  # nothing said on the restart: only this answer
        assert [t.name for t in call.log.tools[tools:]] == ["update_name"]  # the reservation agent's tool
        assert call.log.tools[-1].output == "The name is updated to alice"
        assert call.log.said[-1].lower().startswith("thank you, alice")
        p.hang_up("B1")

        call = await p.call("T1", tg)
        await call.wait_for(greeted, BOUND)
        await say(call, "I would like to order food", replies=2)
        await say(call, "One coffee please")
        await say(call, "That is everything", replies=2)
        await say(call, "Yes")
        card = "four two four two four two four two expiring twelve twenty nine code nine eight seven"
        await say(call, f"My card is {card}")
        names = [t.name for t in call.log.tools]
        assert names == [
            "to_takeaway",
            "update_order",
            "to_checkout",
            "confirm_expense",
            "update_credit_card",
        ], (call.log.heard, call.log.said)
        given = json.loads(call.log.tools[-1].arguments)
        # the checkpoint after the card's tool is on disk, its result scrubbed
        kept = await until_stored(tmp_path, b"The credit card number is updated to [not kept]")
        for value in given.values():
            assert value.encode() not in kept, value
        assert b'"order":["coffee"]' in kept and b"customer_credit_card" not in kept.split(b'"left_out"')[0]

        await kill_and_resume(p, "T1", call)
        assert not [v for v in given.values() if v.encode() in stored(tmp_path)]
        await say(call, "Please check out")
        assert call.log.tools[-1].name == "confirm_checkout"  # still the checkout agent
        # the order and the expense came back; the card did not
        assert call.log.tools[-1].output == "Please provide the credit card information first."


async def test_a_killed_drive_thru_order_survives_with_its_items(tmp_path: Path) -> None:
    """LiveKit's drive_thru example, byte for byte, offline: a cheeseburger is ordered (the app
    keeps it in its ``OrderState`` dataclass of pydantic items), the job's process is SIGKILLed,
    and after the restart the order the app lists still holds the cheeseburger; the menu the
    entrypoint loads is not stored (it is loaded again)."""
    script = SCRIPTS / "drive_thru.toml"
    async with pool(tmp_path, EXAMPLES / "drive_thru" / "agent.py", script, max_jobs=2) as (p, tg):
        call = await p.call("D1", tg)
        await call.wait_for(greeted, BOUND)
        await say(call, "Can I get a cheeseburger please")
        assert [t.name for t in call.log.tools] == ["order_regular_item"]
        kept = await until_stored(tmp_path, b"cheeseburger")
        menu = b'"unchanged":["drink_items","combo_items","happy_items","regular_items","sauce_items"]'
        assert menu in kept
        said = len(call.log.said)

        await kill_and_resume(p, "D1", call)
        assert len(call.log.said) == said  # no second welcome
        await say(call, "Nothing else thanks")
        assert call.log.tools[-1].name == "list_order_items"
        assert "cheeseburger" in call.log.tools[-1].output  # the order from before the crash


async def test_an_app_that_dials_out_rings_the_callee_once_across_a_crash(tmp_path: Path) -> None:
    """An app that dials out over SIP in its entrypoint: the stand-in sees one dial; after a
    SIGKILL the entrypoint runs again but its dial is answered from the checkpoint, not sent,
    and the call goes on without a second introduction."""
    async with pool(tmp_path, APPS / "dialing_agent.py", SCRIPTS / "dialing.toml", max_jobs=2) as (p, tg):
        call = await p.call("O1", tg)
        await call.wait_for(greeted, BOUND)
        (dial,) = p.stand_in.dials
        assert (dial.sip_call_to, dial.participant_identity) == ("+15550100", "callee")
        said = len(call.log.said)

        await kill_and_resume(p, "O1", call)
        await say(call, "Yes that works")
        assert "see you on monday" in call.log.said[-1].lower()
        assert len(call.log.said) == said + 1  # no second introduction
        assert len(p.stand_in.dials) == 1  # and no second ring
        assert "SIP/CreateSIPParticipant #1 not sent again" in p.stderr()


async def test_a_recycled_job_hands_its_call_over_at_a_turn_boundary(tmp_path: Path) -> None:
    """A lifetime recycle of a hosted job (basic_agent): the leaf waits until the agent listens
    and the caller is silent, leaves its checkpoint and goes without ending the job; the next
    leaf resumes the call, says nothing on its own, and still knows the caller's name."""
    script = SCRIPTS / "basic_agent.toml"
    recycle = "health = { max_lifetime = 10, lifetime_jitter = 0 }"
    async with pool(tmp_path, EXAMPLES / "basic_agent.py", script, max_jobs=2, extra=recycle) as (p, tg):
        call = await p.call("H1", tg)
        first = await p.leaf("H1")
        await call.wait_for(greeted, BOUND)
        await say(call, "My name is Alice.")
        said = len(call.log.said)
        recycled = await p.run.until(
            lambda ev: [e for e in ev if e["kind"] == "recycled" and e["path"] == first["path"]],
            "the recycle",
        )
        assert recycled[0]["reason"] == "lifetime"
        await p.leaf("H1", 2)
        await call.wait_for(lambda log: log.connections == 2 and log.states[-1:] == ["AS_LISTENING"], BOUND)
        handed = [
            e for e in p.run.events() if e.get("reason") == "agent_handovers" and e["path"] == first["path"]
        ]
        assert handed, "the first leaf handed the call over"
        assert len(call.log.said) == said  # nothing said on the hand-over
        await say(call, "What is my name?")
        assert "your name is alice" in call.log.said[-1].lower()
