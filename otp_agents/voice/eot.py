"""End of turn by meaning, not only by silence: after the caller stops speaking, a model scores
the last 1.2 s of their audio for "this turn is finished". A likely end is answered after
``min_endpointing_delay``; an unlikely one ("I'd like to book a table for...") is given up to
``max_endpointing_delay`` before the agent takes the turn, unless the caller goes on first.

The default model is LiveKit's ``turn-detector-v1-mini``, run natively by
``livekit-local-inference`` (its weights ship in the wheel; about 40 ms a prediction on one core;
it releases the GIL, so it runs in a worker thread and never stalls the audio loop). It is the
local model LiveKit Agents' own pipelines use, with the same English threshold. Any object with
``window`` and an async ``probability`` plugs in instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio
import numpy as np


class TurnModel(Protocol):
    """Scores the tail of an utterance (int16, 16 kHz, at most ``window`` samples): P(turn over)."""

    name: str
    window: int

    async def probability(self, samples: np.ndarray) -> float: ...


@dataclass(frozen=True)
class TurnSettings:
    max_endpointing_delay: float = 3.0  # quiet after an unlikely end before the turn is taken
    threshold: float = 0.36  # P(turn over) at or above which the turn ends after the min delay

    def check(self, min_endpointing_delay: float) -> None:
        if self.max_endpointing_delay < min_endpointing_delay:
            raise ValueError("max_endpointing_delay must be >= min_endpointing_delay")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError("the end-of-turn threshold must be within [0, 1]")


class LocalEOT:
    """LiveKit's audio end-of-turn model (turn-detector-v1-mini), in-process."""

    name = "turn-detector-v1-mini"

    def __init__(self) -> None:
        from livekit.local_inference import EOT, EOT_MAX_SAMPLES

        self._eot = EOT()
        self.window = int(EOT_MAX_SAMPLES)

    async def probability(self, samples: np.ndarray) -> float:
        tail = np.ascontiguousarray(samples[-self.window :], dtype=np.int16)
        return float(await anyio.to_thread.run_sync(self._eot.predict, tail))


def tail(chunks: Sequence[np.ndarray], size: int) -> np.ndarray:
    """The last ``size`` samples of ``chunks`` (all of them if there are fewer)."""
    picked: list[np.ndarray] = []
    have = 0
    for chunk in reversed(chunks):
        if have >= size:
            break
        picked.append(chunk)
        have += len(chunk)
    if not picked:
        return np.zeros(0, dtype=np.int16)
    return np.concatenate(picked[::-1])[-size:]


__all__ = ["LocalEOT", "TurnModel", "TurnSettings", "tail"]
