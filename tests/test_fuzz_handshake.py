"""Property test of the start handshake: whatever a worker sends before Ready (valid frames in any
order, wrong versions, garbage, truncation, silence, an early exit), the supervisor either starts
it or refuses it with a StartError naming the reason; it never fails any other way and never
leaves the process behind."""

from __future__ import annotations

import struct
import sys

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otp_agents.errors import StartError
from otp_agents.events import Kind
from otp_agents.wire import framing as wire
from otp_agents.wire.messages import Bye, Error, Hello, Log, Ping, Pong, Ready

from .helpers import ROOT, alive, tree_of

pytestmark = pytest.mark.anyio

PEER = str(ROOT / "tests" / "handshake_peer.py")

_frames = st.one_of(
    st.builds(lambda v: wire.encode(Hello(versions=v, pid=1)), st.lists(st.integers(-3, 4), max_size=3)),
    st.just(wire.encode(Ready())),
    st.just(wire.encode(Bye())),
    st.builds(lambda t: wire.encode(Log(level=20, message=t)), st.text(max_size=20)),
    st.builds(lambda t: wire.encode(Error(message=t)), st.text(max_size=20)),
    st.just(wire.encode(Ping(seq=1, sent_ns=1))),
    st.just(wire.encode(Pong(seq=1, sent_ns=1))),
    st.builds(lambda b: struct.pack(">I", len(b)) + b, st.binary(max_size=24)),  # framed junk
    st.binary(max_size=12),  # unframed junk
    st.builds(lambda n: struct.pack(">I", n), st.integers(0, 2**32 - 1)),  # a bare header
    st.builds(
        lambda d: (lambda body: struct.pack(">I", len(body)) + body)(msgspec.msgpack.encode(d)),
        st.dictionaries(
            st.sampled_from(["type", "versions", "pid", "x"]),
            st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5),
        ),
    ),
)
_valid_start = st.just([wire.encode(Hello(versions=[1], pid=1)), wire.encode(Ready())])


def _says_hello_then_ready(payload: bytes) -> bool:
    decoder = wire.FrameDecoder()
    try:
        msgs = decoder.feed(payload)
    except wire.FrameError:
        return False
    hello = next((i for i, m in enumerate(msgs) if isinstance(m, Hello)), None)
    return (
        hello is not None
        and 1 in msgs[hello].versions  # type: ignore[union-attr]
        and any(isinstance(m, Ready) for m in msgs[hello + 1 :])
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.one_of(st.lists(_frames, max_size=5), _valid_start), end=st.sampled_from(["exit", "wait"]))
async def test_any_handshake_starts_or_is_refused_cleanly(frames: list[bytes], end: str) -> None:
    payload = b"".join(frames)
    config = {
        "children": [
            {
                "id": "peer",
                "script": PEER,
                "args": [payload.hex(), end],
                "python": sys.executable,
                "start_timeout": 0.5,
                "shutdown": 1,
                "restart": "temporary",
            }
        ]
    }
    pid: int | None = None
    try:
        async with tree_of(config) as (tree, rec):
            pid = tree.pid("root/peer")
            # Started: then what it sent holds a Hello we can speak, then a Ready.
            assert rec.of(Kind.CHILD_STARTED, "root/peer")
            assert _says_hello_then_ready(payload)
    except StartError as exc:
        assert str(exc).startswith("root/peer: ") and len(str(exc)) > len("root/peer: ")
    if pid is not None:
        assert not alive(pid)
