"""End of turn by meaning (voice/eot.py): LiveKit's audio turn-detector-v1-mini, run locally,
decides how long the pipeline waits after the caller stops speaking. Real flite callers, real
Silero VAD, pocketsphinx and the real model; its scores for these recordings are fixed (the
model and flite are deterministic), which is what the expectations rest on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from otp_agents.voice.eot import LocalEOT, TurnSettings, tail
from otp_agents.voice.pipeline import PipelineSettings

from .voice_helpers import FAST_RETRY, caller, hold_call, needs_tts

pytestmark = [pytest.mark.anyio, needs_tts]

PAUSED = "My favorite color is\npause 0.7\ngreen.\n"


def quick() -> PipelineSettings:
    return PipelineSettings(retry=FAST_RETRY, min_endpointing_delay=0.1)


@pytest.mark.parametrize("realtime", [False, True], ids=["virtual-clock", "real-time"])
async def test_a_pause_mid_sentence_is_not_the_end_of_the_turn(tmp_path: Path, realtime: bool) -> None:
    # Silence alone at this delay splits the sentence (test_voice_pipeline shows it); the model
    # scores "my favorite color is" as unfinished, so the pipeline waits and hears it out.
    wav = caller(tmp_path, PAUSED)
    call = await hold_call(tmp_path, wav, settings=quick(), turn_model=LocalEOT(), realtime=realtime)
    assert call.said("user_said") == ["my favorite color is green"]
    assert call.conversation.userdata["color"] == "green"
    first = call.of("end_of_turn")[0]
    assert first.value is not None and first.value < TurnSettings().threshold
    assert first.fields["delay"] == TurnSettings().max_endpointing_delay


async def test_a_finished_sentence_is_answered_after_the_min_delay(tmp_path: Path) -> None:
    wav = caller(tmp_path, "Can I get a cheeseburger please.\npause 2\n", voice="kal16")
    call = await hold_call(tmp_path, wav, settings=quick(), turn_model=LocalEOT())
    [judged] = call.of("end_of_turn")
    assert judged.value is not None and judged.value >= TurnSettings().threshold
    assert judged.fields["delay"] == 0.1
    [end] = call.of("user_turn_end")
    assert end.value is not None and end.value < 1.0  # taken well before the max delay
    assert len(call.said()) == 1


class BrokenModel:
    """A stand-in turn model whose every prediction fails."""

    name = "broken"
    window = 19200

    async def probability(self, samples: np.ndarray) -> float:
        raise RuntimeError("model file missing")


async def test_a_failing_model_falls_back_to_silence(tmp_path: Path) -> None:
    wav = caller(tmp_path, PAUSED)
    call = await hold_call(tmp_path, wav, settings=quick(), turn_model=BrokenModel())
    errors = call.of("end_of_turn_error")
    assert errors and errors[0].text == "broken: model file missing"
    assert len(call.said("user_said")) == 2  # as silence-only endpointing at 0.1 s would do
    assert len(call.said()) == 2


def test_settings_and_tail() -> None:
    with pytest.raises(ValueError, match="max_endpointing_delay"):
        PipelineSettings(min_endpointing_delay=2.0, turn=TurnSettings(max_endpointing_delay=1.0)).check()
    with pytest.raises(ValueError, match="threshold"):
        TurnSettings(threshold=1.5).check(0.5)
    chunks = [np.full(160, i, dtype=np.int16) for i in range(5)]
    assert tail(chunks, 200).tolist() == [3] * 40 + [4] * 160
    assert len(tail(chunks, 10_000)) == 800
    assert len(tail([], 100)) == 0
