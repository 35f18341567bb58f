"""Text to speech, one sentence at a time (the pipeline starts speaking after the first
sentence of a reply, not after the whole reply).

The offline defaults run Debian's ``flite`` or ``espeak-ng`` as a subprocess writing WAV to a
pipe (first audio in ~10-50 ms). The pipeline takes a list of them and falls through to the next
when one keeps failing, so a broken voice still leaves the call with a voice.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Sequence
from typing import Protocol

import anyio
import numpy as np

from otp_agents.voice.providers import ProviderError


class TTS(Protocol):
    name: str

    async def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        """int16 mono samples and their sample rate."""
        ...


def parse_wav(raw: bytes, source: str) -> tuple[np.ndarray, int]:
    """Samples and rate of a 16-bit mono PCM WAV held in memory. Tolerates the placeholder
    sizes a program writes when its output is a pipe (it cannot seek back to fix them)."""
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise ProviderError(source, "bad_audio", f"not a WAV file ({len(raw)} bytes)", retryable=True)
    pos, rate, channels, bits = 12, 0, 0, 0
    while pos + 8 <= len(raw):
        tag, size = raw[pos : pos + 4], struct.unpack_from("<I", raw, pos + 4)[0]
        body = pos + 8
        if tag == b"fmt ":
            _, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", raw, body)
        elif tag == b"data":
            if channels != 1 or bits != 16:
                raise ProviderError(
                    source, "bad_audio", f"{channels} ch {bits} bit, want mono 16 bit", retryable=False
                )
            data = raw[body : body + min(size, len(raw) - body)]
            data = data[: len(data) // 2 * 2]
            return np.frombuffer(data, dtype=np.int16).copy(), rate
        pos = body + size + (size & 1)
    raise ProviderError(source, "bad_audio", "WAV without a data chunk", retryable=True)


_rendered: dict[tuple[str, ...], tuple[np.ndarray, int]] = {}  # argv -> audio, made ahead


def render_ahead(tts: CommandTTS, text: str) -> tuple[np.ndarray, int]:
    """Synthesize ``text`` now, blocking (a zygote's preload), and keep it: the processes forked
    from here say it without running the program (the fallback line, rendered at every start)."""
    argv = [*tts.argv_prefix, text]
    done = subprocess.run(argv, capture_output=True, timeout=tts.timeout, check=True)
    audio = parse_wav(done.stdout, tts.name)
    _rendered[tuple(argv)] = audio
    return audio


class CommandTTS:
    """A synthesizer program that writes a WAV to stdout."""

    name = "command"
    timeout = 10.0

    def __init__(self, argv_prefix: Sequence[str]) -> None:
        self.argv_prefix = list(argv_prefix)

    def available(self) -> bool:
        return shutil.which(self.argv_prefix[0]) is not None

    async def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        argv = [*self.argv_prefix, text]
        if (ahead := _rendered.get(tuple(argv))) is not None:
            return ahead[0].copy(), ahead[1]
        try:
            with anyio.fail_after(self.timeout):
                done = await anyio.run_process(argv, check=False)
        except FileNotFoundError:
            raise ProviderError(
                self.name, "missing", f"{self.argv_prefix[0]} is not installed", retryable=False
            ) from None
        except TimeoutError:
            raise ProviderError(
                self.name, "timeout", f"no audio within {self.timeout}s", retryable=True
            ) from None
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()[:200]
            raise ProviderError(self.name, "exit", f"exit {done.returncode}: {err}", retryable=True)
        return parse_wav(done.stdout, self.name)


class FliteTTS(CommandTTS):
    name = "flite"

    def __init__(self, voice: str = "kal16") -> None:
        super().__init__(["flite", "-voice", voice, "-o", "/dev/stdout", "-t"])
        self.voice = voice


class EspeakTTS(CommandTTS):
    name = "espeak-ng"

    def __init__(self, voice: str = "en-us", words_per_minute: int = 170) -> None:
        super().__init__(["espeak-ng", "-v", voice, "-s", str(words_per_minute), "--stdout", "--"])
        self.voice = voice
