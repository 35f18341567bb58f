"""The offline recogniser as a streaming LiveKit Agents STT: each utterance is decoded while the
caller speaks, so the transcript is ready as soon as the utterance ends.

LiveKit puts a VAD in front of a non-streaming STT and hands it the whole utterance once the VAD
says it ended: the decode (0.3 s for 1.6 s of speech here, longer under load) then sits between
the end of speech and the reply, and a burst of it lands on the CPU at every turn's end.
pocketsphinx also holds the GIL for a whole ``process_raw`` call, so one call over the whole
utterance stalls the job's event loop (its audio, its turn detector) for as long.

This stream runs the same VAD the session does (``inference.VAD(model="silero")``, LiveKit's
default) on its own input, only to know where utterances are, and feeds the decoder 100 ms at a
time from the start of speech on (the second before it included: the VAD says "speech" only
after some of it), on a worker thread, one chunk per call. At the VAD's end of speech only the
last chunk is left to decode. Events are what LiveKit's own adapter emits: START_OF_SPEECH,
END_OF_SPEECH, then FINAL_TRANSCRIPT.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
from livekit import rtc
from livekit.agents import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions, LanguageCode, stt, utils
from livekit.agents.vad import VADEventType

from otp_agents.voice.audio import SAMPLE_RATE, pcm, resample

if TYPE_CHECKING:
    from otp_agents.voice.stt import PocketSphinxSTT

LEAD = 1.0  # seconds of audio before the VAD's start of speech handed to the decoder too


class SphinxRecognizeStream(stt.RecognizeStream):
    def __init__(self, owner: stt.STT[Any], engine: PocketSphinxSTT, language: str) -> None:
        # LiveKit's own stateful resampler brings the input to 16 kHz before it reaches us:
        # resampling each 10 ms frame on its own leaves seams the recogniser hears
        super().__init__(stt=owner, conn_options=DEFAULT_API_CONNECT_OPTIONS, sample_rate=SAMPLE_RATE)
        self._engine = engine
        self._language = language
        self._lead: deque[np.ndarray] = deque()  # the last LEAD seconds heard, 16 kHz
        self._lead_len = 0
        self._utterance: Any = None  # the decoder's stream while the caller speaks

    async def _run(self) -> None:
        from livekit.agents import inference

        vad_stream = inference.VAD(model="silero").stream()

        async def forward() -> None:
            async for item in self._input_ch:
                if isinstance(item, self._FlushSentinel):
                    vad_stream.flush()
                    continue
                vad_stream.push_frame(item)
                await self._hear(item)
            vad_stream.end_input()

        async def segment() -> None:
            async for event in vad_stream:
                if event.type == VADEventType.START_OF_SPEECH:
                    self._event_ch.send_nowait(stt.SpeechEvent(stt.SpeechEventType.START_OF_SPEECH))
                    await self._begin()
                elif event.type == VADEventType.END_OF_SPEECH:
                    end = time.time() - event.silence_duration - event.inference_duration
                    self._event_ch.send_nowait(
                        stt.SpeechEvent(stt.SpeechEventType.END_OF_SPEECH, speech_end_time=end)
                    )
                    text = await self._finish()
                    if text:
                        self._event_ch.send_nowait(self._final(text, end))

        tasks = [asyncio.create_task(forward()), asyncio.create_task(segment())]
        try:
            await asyncio.gather(*tasks)
        finally:
            await utils.aio.cancel_and_wait(*tasks)
            await vad_stream.aclose()
            if self._utterance is not None:
                await self._utterance.aclose()
                self._utterance = None

    async def _hear(self, frame: rtc.AudioFrame) -> None:
        samples = pcm(frame)
        if frame.num_channels > 1:
            samples = samples.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
        samples = resample(samples, frame.sample_rate, SAMPLE_RATE)  # already 16 kHz: a no-op
        if self._utterance is not None:
            await self._utterance.push(samples)
        # the last LEAD seconds, always: an utterance that starts right after another one (a
        # short noise the VAD took for speech) still gets its first words
        self._lead.append(samples.copy())
        self._lead_len += len(samples)
        while self._lead and self._lead_len - len(self._lead[0]) >= LEAD * SAMPLE_RATE:
            self._lead_len -= len(self._lead.popleft())

    async def _begin(self) -> None:
        if self._utterance is not None:
            return
        self._utterance = self._engine.stream()
        if self._lead:
            await self._utterance.push(np.concatenate(self._lead))

    async def _finish(self) -> str:
        utterance, self._utterance = self._utterance, None
        if utterance is None:
            return ""
        try:
            return str(await utterance.finish())
        finally:
            await utterance.aclose()

    def _final(self, text: str, end: float) -> stt.SpeechEvent:
        return stt.SpeechEvent(
            type=stt.SpeechEventType.FINAL_TRANSCRIPT,
            request_id=utils.shortuuid("sphinx_"),
            alternatives=[stt.SpeechData(language=LanguageCode(self._language), text=text)],
            speech_end_time=end,
        )


def stream(owner: stt.STT[Any], engine: PocketSphinxSTT, language: str, conn: APIConnectOptions) -> Any:
    del conn  # local: nothing to connect or retry
    return SphinxRecognizeStream(owner, engine, language)


__all__ = ["LEAD", "SphinxRecognizeStream", "stream"]
