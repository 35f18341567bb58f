"""A LiveKit Agents session's state as a checkpoint: what is kept, what never is, and what comes
back on a fresh session (LiveKit's own ChatContext and Agent classes)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import BaseModel

pytest.importorskip("livekit.agents")

from livekit.agents import Agent
from livekit.agents.llm import ChatContext

from otp_agents.voice.agents_state import agent_in, capture, decode, encode, fingerprints, restore_userdata


class Greeter(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Greet and route.")


class Reservation(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Take the reservation.")


@dataclass
class Booking:  # shaped like the restaurant example's UserData
    customer_name: str | None = None
    reservation_time: str | None = None
    order: list[str] | None = None
    customer_credit_card: str | None = None
    customer_credit_card_expiry: str | None = None
    customer_credit_card_cvv: str | None = None
    agents: dict[str, Agent] = field(default_factory=dict)
    prev_agent: Agent | None = None
    lock: Any = field(default_factory=threading.Lock)


def booking() -> Booking:
    return Booking(agents={"greeter": Greeter(), "reservation": Reservation()})


def a_call() -> tuple[ChatContext, Booking, Agent]:
    history = ChatContext.empty()
    history.add_message(role="system", content="You are the restaurant.")
    history.add_message(role="assistant", content="Welcome! How can I help?")
    history.add_message(role="user", content="A table for two at seven, my name is Alice.")
    history.add_message(role="assistant", content="Thanks Alice. What card will you use?")
    history.add_message(role="user", content="4111 1111 1111 1111, expiry 12/29, cvv 123")
    data = booking()
    data.customer_name, data.reservation_time, data.order = "Alice", "7pm", ["soup"]
    data.customer_credit_card, data.customer_credit_card_expiry = "4111111111111111", "12/29"
    data.customer_credit_card_cvv = "123"
    data.prev_agent = data.agents["greeter"]
    return history, data, data.agents["reservation"]


def test_the_state_keeps_the_conversation_the_agent_and_plain_fields_never_the_card() -> None:
    history, data, active = a_call()
    state = decode(encode(capture(history, active, data, participant="sip-alice"), 65536))
    said = [item["content"] for item in state.history["items"]]
    assert ["A table for two at seven, my name is Alice."] in said
    assert state.agent is not None and state.agent.endswith(":Reservation")
    assert state.agent_ref == "agents.reservation" and state.participant == "sip-alice"
    assert state.userdata["customer_name"] == "Alice" and state.userdata["order"] == ["soup"]
    assert set(state.left_out) >= {
        "customer_credit_card",
        "customer_credit_card_expiry",
        "customer_credit_card_cvv",
        "lock",
    }
    for name in ("customer_credit_card", "customer_credit_card_cvv"):
        assert name not in state.userdata
    assert ChatContext.from_dict(state.history).items  # LiveKit reads it back


def test_a_private_field_never_reaches_the_bytes() -> None:
    history, data, active = a_call()
    raw = encode(capture(history, active, data), 65536)
    # not as a field, and not where the caller read it out: the conversation is scrubbed too
    for said in (b"4111111111111111", b"4111 1111 1111 1111", b"12/29", b"cvv 123"):
        assert said not in raw, said
    assert b"my name is Alice" in raw  # the rest of what was said stays
    # a field the app names private is left out too
    data.customer_name = "Alice"
    raw = encode(capture(history, active, data, never=("name",)), 65536)
    assert b'"customer_name"' not in raw.split(b'"left_out"')[0]


def test_a_fresh_session_gets_the_fields_back_and_the_references_point_at_the_new_agents() -> None:
    history, data, active = a_call()
    state = decode(encode(capture(history, active, data), 65536))
    fresh = booking()  # what the entrypoint builds again after a restart
    restored = restore_userdata(fresh, state)
    assert {"customer_name", "reservation_time", "order", "prev_agent"} <= set(restored)
    assert fresh.customer_name == "Alice" and fresh.order == ["soup"]
    assert fresh.prev_agent is fresh.agents["greeter"]
    assert agent_in(fresh, state) is fresh.agents["reservation"]
    assert fresh.customer_credit_card is None  # never kept, so never restored


def test_at_the_size_limit_the_oldest_turns_go_and_the_instructions_stay() -> None:
    history, data, active = a_call()
    for i in range(200):
        history.add_message(role="user", content=f"turn {i} " + "words " * 20)
    whole = encode(capture(history, active, data), 10_000_000)
    raw = encode(capture(history, active, data), 8_000)
    assert len(raw) <= 8_000 < len(whole)
    state = decode(raw)
    assert state.trimmed > 0
    roles = [item["role"] for item in state.history["items"]]
    assert roles[0] == "system"
    assert state.history["items"][-1]["content"] == ["turn 199 " + "words " * 20]  # the newest stay


class Item(BaseModel):  # shaped like the drive-thru example's ordered items
    item_id: str
    size: str | None = None


@dataclass
class Order:
    items: dict[str, Item]
    on_change: Any = None  # the app wires a callback in


@dataclass
class Cart:
    order: Order
    menu: list[Item]
    visits: int = 0

    def otp_agents_checkpoint(self) -> dict[str, Any]:
        return {"visits": self.visits}

    def otp_agents_resume(self, state: dict[str, Any]) -> None:
        self.visits = state["visits"] + 100


def cart() -> Cart:
    menu = [Item(item_id=f"item-{i}") for i in range(50)]
    return Cart(order=Order(items={}, on_change=lambda: None), menu=menu)


def test_dataclasses_and_models_go_back_into_the_fresh_userdata_and_unchanged_fields_are_not_stored() -> None:
    history = ChatContext.empty()
    data = cart()
    baseline = fingerprints(data)
    data.order.items["O_1"] = Item(item_id="cheeseburger")
    data.visits = 2
    raw = encode(capture(history, None, data, baseline=baseline), 65536)
    state = decode(raw)
    assert state.unchanged == ["menu"] and b"item-49" not in raw  # the menu is built again
    assert state.left_out == {"order.on_change": "not plain data (function)"}
    assert state.extra == {"visits": 2}

    fresh = cart()
    callback = fresh.order.on_change
    restored = restore_userdata(fresh, state)
    assert set(restored) == {"order", "visits", "otp_agents_resume"}
    assert fresh.order.items == {"O_1": Item(item_id="cheeseburger")}
    assert isinstance(fresh.order.items["O_1"], Item)
    assert fresh.order.on_change is callback  # what the entrypoint wired in stays
    assert fresh.visits == 102  # the fields first, then the app's own hook


def test_a_resumed_session_is_linked_to_the_caller_it_was_with_unless_the_app_names_one() -> None:
    from livekit.agents.voice.room_io import RoomOptions

    from otp_agents.voice.agents_resume import _linked_to

    room = object()
    linked = _linked_to("sip-alice", {"room": room})
    assert linked["room_options"].participant_identity == "sip-alice"
    own = RoomOptions(close_on_disconnect=False)
    linked = _linked_to("sip-alice", {"room": room, "room_options": own})
    assert linked["room_options"].participant_identity == "sip-alice"
    assert linked["room_options"].close_on_disconnect is False  # the app's options stay
    named = RoomOptions(participant_identity="sip-bob")
    assert _linked_to("sip-alice", {"room": room, "room_options": named})["room_options"] is named
