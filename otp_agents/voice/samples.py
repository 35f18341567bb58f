"""Sample conversations: a short script of what the caller says, spoken by flite.

Script format, one item per line::

    # a comment
    My favorite color is green.
    pause 3.5
    What is my favorite color?

Each text line is spoken with the caller's voice; ``pause N`` inserts N seconds of silence
(the default pause after a line is ``gap`` seconds). The result is cached next to the output,
keyed by the script's text and voice, so a restarted leaf does not synthesize it again.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import numpy as np

from otp_agents.errors import OtpAgentsError
from otp_agents.voice.audio import SAMPLE_RATE, resample
from otp_agents.voice.local_io import WavWriter
from otp_agents.voice.tts import parse_wav

_PAUSE = re.compile(r"^pause\s+(\d+(?:\.\d+)?)\s*$", re.IGNORECASE)


class ScriptError(OtpAgentsError, ValueError):
    pass


def parse_script(text: str, source: str = "<script>") -> list[str | float]:
    items: list[str | float] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _PAUSE.match(line)
        if m:
            items.append(float(m.group(1)))
        elif line.lower().startswith("pause"):
            raise ScriptError(f"{source}:{n}: 'pause' needs a number of seconds, got {line!r}")
        else:
            items.append(line)
    if not any(isinstance(i, str) for i in items):
        raise ScriptError(f"{source}: no lines to say")
    return items


def speak_flite(text: str, voice: str) -> np.ndarray:
    done = subprocess.run(
        ["flite", "-voice", voice, "-o", "/dev/stdout", "-t", text],
        capture_output=True,
        check=False,
        timeout=30,
    )
    if done.returncode != 0:
        raise ScriptError(f"flite failed on {text!r}: {done.stderr.decode(errors='replace').strip()}")
    samples, rate = parse_wav(done.stdout, "flite")
    return resample(samples, rate, SAMPLE_RATE)


def render_script(
    script: Path, out_dir: Path, *, voice: str = "slt", lead: float = 0.5, gap: float = 3.0
) -> Path:
    """The caller's side of ``script`` as a 16 kHz WAV in ``out_dir`` (cached)."""
    text = script.read_text()
    items = parse_script(text, str(script))
    key = hashlib.sha256(f"{voice}|{lead}|{gap}|{text}".encode()).hexdigest()[:12]
    target = out_dir / f"caller-{key}.wav"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    parts: list[np.ndarray] = [np.zeros(int(lead * SAMPLE_RATE), dtype=np.int16)]
    for i, item in enumerate(items):
        if isinstance(item, float):
            parts.append(np.zeros(int(item * SAMPLE_RATE), dtype=np.int16))
            continue
        parts.append(speak_flite(item, voice))
        if i + 1 < len(items) and isinstance(items[i + 1], float):
            continue
        parts.append(np.zeros(int(gap * SAMPLE_RATE), dtype=np.int16))
    tmp = target.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    writer = WavWriter(tmp, SAMPLE_RATE)
    writer.write(np.concatenate(parts))
    writer.close()
    tmp.replace(target)
    return target
