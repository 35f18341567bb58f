"""The wire contract: golden frames, framing edge cases, decoder robustness, the async channel."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import tracemalloc
import types
import typing
from itertools import pairwise
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from otp_agents.wire import framing as wire
from otp_agents.wire.channel import Channel, ChannelClosed
from otp_agents.wire.framing import FrameDecoder, FrameError
from otp_agents.wire.messages import (
    ALL_MESSAGES,
    MAX_CHECKPOINT,
    MAX_FRAME,
    Bye,
    Checkpoint,
    Drain,
    Dump,
    DumpRequest,
    Error,
    Hello,
    Located,
    Log,
    Lookup,
    Message,
    Ping,
    Pong,
    Publish,
    Ready,
    Reject,
    Report,
    Shutdown,
    Welcome,
)

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ROOT / "protocols"
GOLDEN = PROTOCOLS / "golden"
INDEX: list[dict[str, Any]] = json.loads((GOLDEN / "index.json").read_text(encoding="utf-8"))

# One message of every type, with non-default values wherever a field has a default.
SAMPLES: list[Message] = [
    Hello(versions=[1, 2, 7], pid=31337),
    Welcome(version=1, path="root/sup/w", checkpoint=b"\x00\xff" * 100, checkpoint_max=MAX_CHECKPOINT),
    Reject(reason="no common protocol version"),
    Ready(),
    Ping(seq=2**63, sent_ns=2**64 - 1),
    Pong(seq=0, sent_ns=-(2**63), loop_lag_ms=12.75),
    Shutdown(timeout=0.0, reason="restart"),
    Drain(reason="lifetime"),
    DumpRequest(id=2**40),
    Dump(id=1, text="Thread 1:\n" * 500),
    Bye(reason="crash"),
    Log(level=40, message="\u00e9\u00e8 \U0001f600 " + "x" * 1000),
    Error(message=""),
    Checkpoint(data=b""),
    Report(name="voice_turn_latency_seconds", value=0.25, labels={"provider": "x" * 64}),
    Publish(name="inference", address="@otp-agents/root.inference/4242"),
    Lookup(id=3, name="inference"),
    Located(id=3, name="inference", address=None),
]


def tag_of(cls: type[msgspec.Struct]) -> str:
    value = cls.__struct_config__.tag
    assert isinstance(value, str)
    return value


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def raw(value: Any) -> bytes:
    """A frame whose body is any MessagePack value, bypassing the Structs."""
    return frame(msgspec.msgpack.encode(value))


def feed_chunks(data: bytes, cuts: list[int], max_frame: int = MAX_FRAME) -> list[Message]:
    """Decode ``data`` fed in pieces split at ``cuts``; raise FrameError on a bad frame."""
    decoder = FrameDecoder(max_frame)
    out: list[Message] = []
    for chunk in _split(data, cuts):
        out += decoder.feed(chunk)
    decoder.check()
    decoder.close()
    return out


# -- golden frames ---------------------------------------------------------------------------------


def test_golden_covers_every_message_type_once() -> None:
    assert sorted(e["type"] for e in INDEX) == sorted(tag_of(cls) for cls in ALL_MESSAGES)
    on_disk = {p.name for p in GOLDEN.iterdir()} - {"index.json"}
    assert on_disk == {e["file"] for e in INDEX}


@pytest.mark.parametrize("entry", INDEX, ids=[e["type"] for e in INDEX])
def test_golden_frame_decodes_to_index_value_and_reencodes_identically(entry: dict[str, Any]) -> None:
    data = (GOLDEN / entry["file"]).read_bytes()
    assert len(data) == entry["size"] and data.hex() == entry["hex"]
    (size,) = struct.unpack(">I", data[:4])
    assert size == len(data) - 4
    decoder = FrameDecoder()
    [msg] = decoder.feed(data)
    assert decoder.pending == 0
    assert tag_of(type(msg)) == entry["type"]
    assert msgspec.to_builtins(msg) == entry["value"]
    # what a plain MessagePack reader sees (index.json shows bin values as base64)
    assert msgspec.to_builtins(msgspec.msgpack.decode(data[4:])) == entry["value"]
    assert msgspec.convert(entry["value"], Message) == msg
    assert wire.encode(msg) == data


def test_generator_check_passes() -> None:
    result = subprocess.run(
        [sys.executable, str(PROTOCOLS / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_schema_describes_every_message() -> None:
    schema = json.loads((PROTOCOLS / "schema.json").read_text(encoding="utf-8"))
    assert set(schema["$defs"]) == {cls.__name__ for cls in ALL_MESSAGES}
    assert set(schema["discriminator"]["mapping"]) == {tag_of(cls) for cls in ALL_MESSAGES}
    for definition in schema["$defs"].values():
        assert "type" in definition["required"]
        assert definition.get("additionalProperties", True) is True  # extra keys stay legal


# -- round trip and chunking -----------------------------------------------------------------------


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in SAMPLES} == set(ALL_MESSAGES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    data = wire.encode(msg)
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    assert wire.decode_body(data[4:]) == msg
    assert FrameDecoder().feed(data) == [msg]


def test_split_at_every_byte_boundary() -> None:
    data = b"".join(wire.encode(m) for m in SAMPLES[:4] + SAMPLES[5:8])
    expected = SAMPLES[:4] + SAMPLES[5:8]
    for cut in range(len(data) + 1):
        assert feed_chunks(data, [cut]) == expected, cut
    decoder = FrameDecoder()
    out: list[Message] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    assert out == expected and decoder.pending == 0


def test_several_frames_in_one_chunk() -> None:
    data = b"".join(wire.encode(m) for m in SAMPLES)
    decoder = FrameDecoder()
    assert decoder.feed(data) == SAMPLES
    assert decoder.pending == 0
    # and a chunk that ends inside the next frame keeps that frame's head back
    half = wire.encode(Ready())[:7]
    assert decoder.feed(wire.encode(Bye()) + half) == [Bye()]
    assert decoder.pending == len(half)


def test_empty_feed_and_clean_close() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    decoder.close()
    assert decoder.feed(memoryview(wire.encode(Ready()))) == [Ready()]
    decoder.close()


def test_unknown_fields_are_ignored() -> None:
    data = raw({"type": "ping", "seq": 1, "sent_ns": 2, "future": {"nested": [1, None, "x"]}})
    assert FrameDecoder().feed(data) == [Ping(seq=1, sent_ns=2)]


def test_key_order_does_not_matter_and_defaults_may_be_sent() -> None:
    data = raw({"reason": "shutdown", "timeout": 3, "type": "shutdown"})
    assert FrameDecoder().feed(data) == [Shutdown(timeout=3.0)]


def test_defaults_are_left_out_on_the_wire() -> None:
    assert msgspec.msgpack.decode(wire.encode(Shutdown(timeout=2.0))[4:]) == {
        "type": "shutdown",
        "timeout": 2.0,
    }
    assert msgspec.msgpack.decode(wire.encode(Bye())[4:]) == {"type": "bye"}


# -- bad frames ----------------------------------------------------------------------------------


def test_good_frame_then_garbage_in_one_chunk() -> None:
    decoder = FrameDecoder()
    garbage = frame(b"\xc1\xc1")
    assert decoder.feed(wire.encode(Ready()) + garbage) == [Ready()]
    with pytest.raises(FrameError) as info:
        decoder.feed(wire.encode(Bye()))
    assert info.value.kind == "malformed"
    # the error is sticky: the stream cannot be resynchronised
    with pytest.raises(FrameError):
        decoder.check()
    with pytest.raises(FrameError):
        decoder.feed(b"")


def test_oversized_declared_length_is_refused_on_the_header_without_allocating() -> None:
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(FrameError) as info:
            decoder.feed(struct.pack(">I", 0xFFFFFFFF) + b"\x81")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.kind == "oversized"
    assert str(0xFFFFFFFF) in info.value.detail
    assert peak < 64 * 1024
    assert decoder.pending == 0


def test_max_frame_boundary() -> None:
    # a body of exactly max_frame bytes is accepted; one more byte is refused
    overhead = len(msgspec.msgpack.encode({"type": "ready", "pad": ""}))
    pad = MAX_FRAME - overhead - 4  # str8/16 header grows to str32 (5 bytes) past 65535
    body = msgspec.msgpack.encode({"type": "ready", "pad": "x" * pad})
    assert len(body) == MAX_FRAME
    assert FrameDecoder().feed(frame(body)) == [Ready()]
    with pytest.raises(FrameError) as info:
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME + 1))
    assert info.value.kind == "oversized"
    small = FrameDecoder(max_frame=16)
    assert small.feed(wire.encode(Ready())) == [Ready()]  # 12-byte body
    with pytest.raises(FrameError, match="oversized"):
        small.feed(struct.pack(">I", 17))


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 15])
def test_truncated_at_close(cut: int) -> None:
    decoder = FrameDecoder()
    data = wire.encode(Ready())  # 16 bytes
    assert decoder.feed(data[:cut]) == []
    with pytest.raises(FrameError) as info:
        decoder.close()
    assert info.value.kind == "truncated"
    assert f"{cut} bytes pending" in info.value.detail


def test_unknown_type_is_malformed_and_named() -> None:
    with pytest.raises(FrameError) as info:
        FrameDecoder().feed(raw({"type": "teleport", "to": "mars"}))
    assert info.value.kind == "malformed"
    assert "teleport" in info.value.detail


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty-body"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\x81\xa4type", id="cut-inside-body"),
        pytest.param(msgspec.msgpack.encode([1, 2]), id="not-a-map"),
        pytest.param(msgspec.msgpack.encode({"seq": 1}), id="no-type"),
        pytest.param(msgspec.msgpack.encode({"type": 1}), id="type-not-str"),
        pytest.param(msgspec.msgpack.encode({"type": "ping", "seq": 1}), id="missing-field"),
        pytest.param(msgspec.msgpack.encode({"type": "ping", "seq": 1.0, "sent_ns": 2}), id="float-for-int"),
        pytest.param(msgspec.msgpack.encode({"type": "ping", "seq": True, "sent_ns": 2}), id="bool-for-int"),
        pytest.param(
            msgspec.msgpack.encode({"type": "welcome", "version": 1, "path": b"x"}), id="bin-for-str"
        ),
        pytest.param(msgspec.msgpack.encode({"type": "error", "message": "x" * 65537}), id="text-too-long"),
        pytest.param(msgspec.msgpack.encode({"type": "ready"}) + b"\x00", id="trailing-bytes"),
    ],
)
def test_malformed_bodies(body: bytes) -> None:
    with pytest.raises(FrameError) as info:
        FrameDecoder().feed(frame(body))
    assert info.value.kind == "malformed"


# -- checkpoints and reports -------------------------------------------------------------------


def test_checkpoint_and_report_golden_frames_decode() -> None:
    [welcome] = FrameDecoder().feed((GOLDEN / "welcome.bin").read_bytes())
    assert welcome == Welcome(
        version=1, path="root/agents/w1", checkpoint=b'{"turn":3}', checkpoint_max=65536
    )
    [checkpoint] = FrameDecoder().feed((GOLDEN / "checkpoint.bin").read_bytes())
    assert checkpoint == Checkpoint(data=b'{"turn":4}')
    [report] = FrameDecoder().feed((GOLDEN / "report.bin").read_bytes())
    assert report == Report(
        name="voice_provider_errors", value=1.0, labels={"provider": "deepgram", "kind": "timeout"}
    )


def test_welcome_without_checkpoint_fields_and_with_nil() -> None:
    # what a supervisor without checkpoints sends: no checkpoint, checkpoints off
    assert FrameDecoder().feed(raw({"type": "welcome", "version": 1, "path": "p"})) == [
        Welcome(version=1, path="p")
    ]
    assert FrameDecoder().feed(raw({"type": "welcome", "version": 1, "path": "p", "checkpoint": None})) == [
        Welcome(version=1, path="p")
    ]
    # checkpoint data is MessagePack bin: no base64, any bytes
    data = wire.encode(Checkpoint(data=bytes(range(256))))
    assert b"\xc5\x01\x00" + bytes(range(256)) in data  # bin16 header, then the raw bytes


def test_checkpoint_over_the_largest_limit_is_still_a_valid_frame() -> None:
    # Too large for any child is the supervisor's to drop (an event), not a protocol fault.
    big = Checkpoint(data=b"x" * (MAX_CHECKPOINT + 1))
    assert FrameDecoder().feed(wire.encode(big)) == [big]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"type": "checkpoint", "data": "text"}, id="checkpoint-str-not-bin"),
        pytest.param({"type": "checkpoint"}, id="checkpoint-no-data"),
        pytest.param({"type": "report", "name": "Latency", "value": 1.0}, id="name-uppercase"),
        pytest.param({"type": "report", "name": "9lives", "value": 1.0}, id="name-digit-first"),
        pytest.param({"type": "report", "name": "a" * 65, "value": 1.0}, id="name-too-long"),
        pytest.param({"type": "report", "name": "x", "value": "1"}, id="value-str"),
        pytest.param(
            {"type": "report", "name": "x", "value": 1.0, "labels": {f"k{i}": "v" for i in range(9)}},
            id="nine-labels",
        ),
        pytest.param({"type": "report", "name": "x", "value": 1.0, "labels": {"Bad": "v"}}, id="label-key"),
        pytest.param(
            {"type": "report", "name": "x", "value": 1.0, "labels": {"k": "v" * 65}}, id="label-value-long"
        ),
        pytest.param({"type": "report", "name": "x", "value": 1.0, "labels": {"k": 1}}, id="label-not-str"),
    ],
)
def test_bad_checkpoints_and_reports_are_malformed(body: dict[str, Any]) -> None:
    with pytest.raises(FrameError) as info:
        FrameDecoder().feed(raw(body))
    assert info.value.kind == "malformed"
    assert f"frame type {body['type']!r}" in info.value.detail


# Regression inputs: once, invalid UTF-8 and deep nesting escaped as UnicodeDecodeError and
# RecursionError, which would have taken the supervisor down with one child's bad frame.
_BAD_UTF8 = frame(b"\xa1\xff")  # a one-byte str that is not UTF-8
_BAD_UTF8_IN_FIELD = frame(b"\x82\xa4type\xa5error\xa7message\xa2\xff\xfe")
_DEEP = frame(b"\x91" * 10_000 + b"\x00")  # 10 kB: nested arrays, far under MAX_FRAME


@pytest.mark.parametrize(
    "data", [_BAD_UTF8, _BAD_UTF8_IN_FIELD, _DEEP], ids=["utf8-top", "utf8-in-field", "deep-nesting"]
)
def test_bad_utf8_and_deep_nesting_are_malformed_frames(data: bytes) -> None:
    with pytest.raises(FrameError) as info:
        FrameDecoder().feed(data)
    assert info.value.kind == "malformed"


# -- property tests --------------------------------------------------------------------------------

_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_TEXT = st.characters(codec="utf-8")


def _strategy(tp: Any) -> st.SearchStrategy[Any]:
    """A strategy for one Struct field type (the types messages.py uses)."""
    max_length: int | None = None
    pattern: str | None = None
    if typing.get_origin(tp) is typing.Annotated:
        tp, *metas = typing.get_args(tp)
        max_length = next((m.max_length for m in metas if isinstance(m, msgspec.Meta)), None)
        pattern = next((m.pattern for m in metas if isinstance(m, msgspec.Meta)), None)
    if typing.get_origin(tp) is types.UnionType:
        return st.one_of(*(_strategy(arg) for arg in typing.get_args(tp)))
    if tp is type(None):
        return st.none()
    if tp is int:
        return _INT
    if tp is float:
        return st.floats(allow_nan=False)
    if tp is bytes:
        return st.binary(max_size=200)
    if tp is str and pattern is not None:
        return st.from_regex(pattern.replace("$", r"\Z"), fullmatch=True)
    if tp is str:
        return st.text(_TEXT, max_size=min(max_length or 200, 200))
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return st.lists(_strategy(item), max_size=5)
    if typing.get_origin(tp) is dict:
        key, item = typing.get_args(tp)
        return st.dictionaries(_strategy(key), _strategy(item), max_size=min(max_length or 5, 5))
    raise TypeError(f"no strategy for field type {tp!r}")


def _message_strategy(cls: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in msgspec.structs.fields(cls):
        value = _strategy(f.type)
        if f.required:
            fields[f.name] = value
        elif f.default is msgspec.NODEFAULT:  # a mutable default ({}): built by its factory
            fields[f.name] = st.one_of(st.builds(f.default_factory), value)
        else:
            fields[f.name] = st.one_of(st.just(f.default), value)
    return st.builds(cls, **fields)


MESSAGES: st.SearchStrategy[Message] = st.one_of(*(_message_strategy(cls) for cls in ALL_MESSAGES))


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[lo:hi] for lo, hi in pairwise(bounds)]


def _cuts(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(min_value=0, max_value=len(data)), max_size=12)


@st.composite
def _chunked(draw: st.DrawFn, segments: st.SearchStrategy[list[bytes]]) -> list[bytes]:
    """A stream made of ``segments``, then cut into chunks at arbitrary points."""
    stream = b"".join(draw(segments))
    return _split(stream, draw(_cuts(stream)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(MESSAGES, min_size=1, max_size=6), data=st.data())
def test_valid_messages_round_trip_through_any_chunking(messages: list[Message], data: st.DataObject) -> None:
    stream = b"".join(wire.encode(m) for m in messages)
    cuts = data.draw(_cuts(stream))
    assert feed_chunks(stream, cuts) == messages


# Streams that are mostly nonsense but often framed right, so the body decoders get exercised.
_TAGS = st.sampled_from([tag_of(cls) for cls in ALL_MESSAGES] + ["teleport", ""])
_VALUES = st.recursive(
    st.none() | st.booleans() | _INT | st.floats() | st.text(_TEXT, max_size=20) | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(_TEXT, max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_MAPS = st.dictionaries(st.sampled_from(["seq", "sent_ns", "versions", "reason", "message", "x"]), _VALUES)
_SEGMENTS = st.one_of(
    st.binary(max_size=40),  # anything at all, headers included
    st.binary(max_size=40).map(frame),  # a correct length around random bytes
    MESSAGES.map(wire.encode),  # a valid frame
    st.builds(lambda t, d: raw({"type": t, **d}), _TAGS, _MAPS),  # MessagePack, maybe not a message
    _VALUES.map(raw),  # any MessagePack value
    st.sampled_from([b"\x00\x00\x00", struct.pack(">I", MAX_FRAME + 1), struct.pack(">I", 0)]),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=_chunked(st.lists(_SEGMENTS, max_size=6)), max_frame=st.sampled_from([MAX_FRAME, 64]))
@example(chunks=[_BAD_UTF8], max_frame=MAX_FRAME)  # regression: must stay a FrameError
def test_arbitrary_bytes_raise_nothing_but_frame_error(chunks: list[bytes], max_frame: int) -> None:
    decoder = FrameDecoder(max_frame)
    failed = False
    for chunk in chunks:
        try:
            decoder.feed(chunk)
        except FrameError as exc:
            assert exc.kind in ("oversized", "truncated", "malformed")
            failed = True
        else:
            assert not failed, "a decoder that has failed must keep failing"
    try:
        decoder.check()
        decoder.close()
    except FrameError as exc:
        assert exc.kind in ("oversized", "truncated", "malformed")


# -- the async channel over a real socketpair ------------------------------------------------------


async def _pair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return await Channel.from_socket(a), await Channel.from_socket(b)


async def test_channel_duplex_over_socketpair() -> None:
    big = Log(level=10, message="y" * 65536)  # larger than one read, smaller than the limit
    left, right = await _pair()
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def send_all() -> None:
                    for msg in [*SAMPLES, big, *SAMPLES]:
                        await left.send(msg)

                tg.start_soon(send_all)
                received = [await right.receive() for _ in range(2 * len(SAMPLES) + 1)]
            assert received == [*SAMPLES, big, *SAMPLES]

            # the other direction, and concurrent senders on one side
            async with anyio.create_task_group() as tg:
                for seq in range(20):
                    tg.start_soon(right.send, Pong(seq=seq, sent_ns=seq * 1000))
            pongs = [await left.receive() for _ in range(20)]
            assert sorted(p.seq for p in pongs if isinstance(p, Pong)) == list(range(20))

            await left.aclose()
            with pytest.raises(ChannelClosed):
                await right.receive()
    finally:
        await left.aclose()
        await right.aclose()


async def test_channel_reports_bad_frames() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = await Channel.from_socket(b)
    try:
        with anyio.fail_after(10):
            a.sendall(wire.encode(Ready()) + frame(b"\xc1"))
            assert await channel.receive() == Ready()
            with pytest.raises(FrameError, match="malformed"):
                await channel.receive()
    finally:
        a.close()
        await channel.aclose()


async def test_channel_truncated_at_close() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = await Channel.from_socket(b)
    try:
        with anyio.fail_after(10):
            a.sendall(wire.encode(Hello(versions=[1], pid=1))[:-2])
            a.close()
            with pytest.raises(FrameError) as info:
                await channel.receive()
            assert info.value.kind == "truncated"
    finally:
        a.close()
        await channel.aclose()


async def test_a_send_timing_out_inside_a_frame_breaks_the_channel_for_good() -> None:
    """A peer that does not read: a send that times out halfway through a frame would leave the
    stream corrupt for whatever follows, so the channel refuses every later send."""
    left, right = await _pair()
    try:
        big = Log(level=10, message="z" * 500_000)  # more than the socket buffers hold
        with anyio.fail_after(10):
            with pytest.raises(anyio.BrokenResourceError, match="inside a frame"):
                await left.send(big, timeout=0.2)
            with pytest.raises(anyio.BrokenResourceError, match="cut short inside a frame"):
                await left.send(Ping(seq=1, sent_ns=0))
    finally:
        await left.aclose()
        await right.aclose()
