"""One pocketsphinx recogniser in a process of its own, for the shared inference server.

pocketsphinx holds the GIL while it decodes, so recognisers on threads of the server would run
one at a time and stall the server's event loop (its heartbeats, its accepts). Each one runs here
instead, a child of the server that dies with it (PR_SET_PDEATHSIG), reading requests on stdin
and answering on stdout: a 4-byte big-endian length, then int16 16 kHz audio / UTF-8 text.

    python -m otp_agents.voice.recognizer_proc PARENT_PID
"""

from __future__ import annotations

import os
import signal
import struct
import sys
from collections.abc import Callable

from otp_agents import linux

_LEN = struct.Struct(">I")
MAX_REQUEST = 60 * 16_000 * 2


def _read_exact(stream: object, n: int) -> bytes:
    read = stream.read  # type: ignore[attr-defined]
    buf = b""
    while len(buf) < n:
        chunk = read(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def sphinx_recognizer() -> Callable[[bytes], str]:
    """A blocking recogniser over its own pocketsphinx decoder (one model in memory)."""
    from pocketsphinx import Decoder

    decoder = Decoder(loglevel="FATAL")

    def decode(raw: bytes) -> str:
        decoder.start_utt()
        decoder.process_raw(raw, False, True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr.strip() if hyp is not None else ""

    return decode


def main() -> None:
    parent = int(sys.argv[1])
    linux._prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the server died before we could ask to die with it
        os._exit(70)
    decode = sphinx_recognizer()
    decode(b"\0\0" * 1600)  # load everything before the first real request
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(_LEN.pack(0))  # ready
    stdout.flush()
    while True:
        try:
            (size,) = _LEN.unpack(_read_exact(stdin, 4))
            if size > MAX_REQUEST:
                os._exit(65)
            raw = _read_exact(stdin, size)
        except EOFError:
            return
        try:
            text = decode(raw).encode()
        except Exception as exc:  # one bad input costs its request, not the model
            text = f"\0error: {type(exc).__name__}: {exc}".encode()
        stdout.write(_LEN.pack(len(text)) + text)
        stdout.flush()


if __name__ == "__main__":
    main()
