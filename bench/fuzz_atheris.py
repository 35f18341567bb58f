#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris / libFuzzer) of what reads untrusted input.

Targets:

* ``frames``: the worker protocol's frame decoder, fed in chunks split where the input says;
  only ``FrameError`` may come out, and every decoded message re-encodes to a frame that
  decodes to the same message;
* ``config``: the tree loader on arbitrary TOML text; only ``ConfigError`` may come out;
* ``control``: the control socket's request decoder; only ``FrameError`` may come out.

Usage (libFuzzer flags pass through; a crash writes ``crash-*`` with the input)::

    .venv/bin/python bench/fuzz_atheris.py frames -runs=1000000
    .venv/bin/python bench/fuzz_atheris.py config -max_total_time=600

The hypothesis tests in tests/ cover the same code on every run of the suite; any input that
this finds to crash becomes a test there (tests/test_wire.py, tests/test_config.py).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    from otp_agents.errors import ConfigError
    from otp_agents.ops import control_client as control
    from otp_agents.spec.load import loads
    from otp_agents.wire import framing as wire
    from otp_agents.wire.messages import MAX_FRAME


def _chunks(data: bytes) -> list[bytes]:
    """The first byte says where to cut the rest (so partial frames are exercised)."""
    if not data:
        return []
    step = max(1, data[0])
    body = data[1:]
    return [body[i : i + step] for i in range(0, len(body), step)]


def fuzz_frames(data: bytes) -> None:
    decoder = wire.FrameDecoder(MAX_FRAME if len(data) % 2 else 64)
    try:
        msgs = [m for chunk in _chunks(data) for m in decoder.feed(chunk)]
        decoder.close()
    except wire.FrameError:
        return
    for msg in msgs:
        again = wire.FrameDecoder(MAX_FRAME).feed(wire.encode(msg))
        if again != [msg]:
            raise AssertionError(f"{msg!r} does not round-trip: {again!r}")


def fuzz_config(data: bytes) -> None:
    with contextlib.suppress(ConfigError):
        loads(data.decode("utf-8", errors="replace"), "fuzz.toml")


def fuzz_control(data: bytes) -> None:
    decoder = wire.FrameDecoder(control.MAX_CONTROL_FRAME, decoder=control.DECODER)
    try:
        for chunk in _chunks(data):
            decoder.feed(chunk)
    except wire.FrameError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "frames": fuzz_frames,
    "config": fuzz_config,
    "control": fuzz_control,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
