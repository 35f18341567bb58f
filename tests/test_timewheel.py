"""The timer wheel behind the heartbeat and the memory sampler."""

from __future__ import annotations

import math

from otp_agents.health.timewheel import TimeWheel


def test_items_come_out_by_slot_and_only_when_due() -> None:
    wheel: TimeWheel[str] = TimeWheel(0.05)
    assert wheel.next_time() == math.inf and wheel.take_due(1e9) == []
    assert math.isclose(wheel.add("late", 1.01), 1.05)  # rounded up to its slot
    wheel.add("early", 0.2)
    wheel.add("early too", 0.18)  # the same slot as 0.2
    assert math.isclose(wheel.next_time(), 0.2)
    assert wheel.take_due(0.19) == []
    assert sorted(wheel.take_due(0.2)) == ["early", "early too"]
    assert len(wheel) == 1 and wheel.take_due(2.0) == ["late"]


def test_an_infinite_time_is_never_due() -> None:
    wheel: TimeWheel[str] = TimeWheel(0.1)
    assert wheel.add("never", math.inf) == math.inf
    assert len(wheel) == 0 and wheel.next_time() == math.inf
