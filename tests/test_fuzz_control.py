"""Property test of the control socket: arbitrary bytes and arbitrary requests get an error reply
(or a closed connection) and never take the server, or the tree, down."""

from __future__ import annotations

import struct
from pathlib import Path

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otp_agents.ops import control_client as control
from otp_agents.ops.control import ControlServer
from otp_agents.ops.control_client import Reply, Request
from otp_agents.wire import framing as wire

from .helpers import ROOT, tree_of

pytestmark = pytest.mark.anyio

TREE = {"children": [{"id": "w", "module": "workers.chaos:steady", "cwd": str(ROOT)}]}
SAFE_OPS = ["status", "dump", "restart", "terminate", "start", "start-child", "reload", "events", "nope", ""]

_requests = st.builds(
    lambda op, path, args, kinds: wire.encode(Request(op=op, path=path, args=args, kinds=kinds)),
    st.sampled_from(SAFE_OPS) | st.text(max_size=8),
    st.sampled_from(["", "root", "root/w", "root/nope", "../..", "root/w/x"]) | st.text(max_size=12),
    st.lists(st.text(max_size=8), max_size=3),
    st.lists(st.text(max_size=8), max_size=2),
)
_junk = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda b: struct.pack(">I", len(b)) + b, st.binary(max_size=40)),
    st.builds(lambda n: struct.pack(">I", n), st.integers(0, 2**32 - 1)),
    st.builds(
        lambda d: (lambda body: struct.pack(">I", len(body)) + body)(msgspec.msgpack.encode(d)),
        st.dictionaries(
            st.sampled_from(["type", "op", "path", "args", "x"]),
            st.integers(-(2**63), 2**64 - 1) | st.text(max_size=6),
        ),
    ),
)


async def _exchange(sock: Path, data: bytes) -> list[Reply]:
    replies: list[Reply] = []
    decoder = wire.FrameDecoder(control.MAX_CONTROL_FRAME, decoder=control.DECODER)
    async with await anyio.connect_unix(sock) as stream:
        await stream.send(data)
        await stream.send_eof()
        with anyio.move_on_after(3):
            while True:
                try:
                    chunk = await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
                replies.extend(m for m in decoder.feed(chunk) if isinstance(m, Reply))
                if replies and not replies[-1].more:
                    break
    return replies


async def _listening(sock: Path) -> bool:
    try:
        stream = await anyio.connect_unix(sock)
    except OSError:
        return False
    await stream.aclose()
    return True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(_requests | _junk, min_size=1, max_size=3))
async def test_control_socket_survives_any_bytes(
    tmp_path_factory: pytest.TempPathFactory, chunks: list[bytes]
) -> None:
    state = tmp_path_factory.mktemp("ctl")
    async with tree_of(TREE, state_dir=state) as (tree, _rec), anyio.create_task_group() as tg:
        stopped: list[bool] = []
        server = ControlServer(tree, control.socket_path(state), lambda: stopped.append(True))
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not await _listening(control.socket_path(state)):  # noqa: ASYNC110 - no event to wait on
                await anyio.sleep(0.01)
            replies = await _exchange(control.socket_path(state), b"".join(chunks))
            for reply in replies:
                assert reply.code in ("ok", "not_found", "refused", "error", "denied")
                assert reply.ok == (reply.code == "ok")
                if not reply.ok:
                    assert reply.message  # every refusal says why
            # The server and the tree are still there: a fresh status request is answered.
            (status,) = await _exchange(control.socket_path(state), wire.encode(Request(op="status")))
            assert status.ok and status.data["children"][0]["id"] == "w"
        assert not stopped
        tg.cancel_scope.cancel()
