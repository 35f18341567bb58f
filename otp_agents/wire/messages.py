"""The messages exchanged between a supervisor and a protocol worker.

Each message is a msgspec Struct tagged by ``type``; the wire format is a MessagePack map with
that tag (see ``protocols/PROTOCOL.md``). Field names are short words, never positional, so that
other languages can implement a worker from ``protocols/schema.json`` alone.

Session, in order::

    worker     -> supervisor  Hello(versions, pid)
    supervisor -> worker      Welcome(version, path, checkpoint?, checkpoint_max)   or Reject(reason)
    worker     -> supervisor  Ready()                           the child now counts as started
    ...        <->            Ping / Pong, Log, Error           any time after Welcome
    worker     -> supervisor  Checkpoint(data), Report(name, value, labels)   any time after Welcome
    worker     -> supervisor  Publish(name, address)            offer a service to other workers
    worker     -> supervisor  Lookup(id, name) -> Located(id, name, address?)   find one
    supervisor -> worker      DumpRequest(id) -> Dump(id, text) stacks of threads and tasks
    supervisor -> worker      Drain(reason)                     finish current work, then exit 0
    supervisor -> worker      Shutdown(timeout, reason)         finish, then exit 0
    worker     -> supervisor  Bye(reason)                       optional, just before exit
"""

from __future__ import annotations

from typing import Annotated

import msgspec

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_FRAME = 1 << 20  # default maximum frame body, bytes
MAX_DUMP_TEXT = 768 * 1024  # a stack dump is cut to this many characters to fit in a frame
# The largest checkpoint_max_bytes a child spec may set: a Welcome carrying it still fits a frame.
MAX_CHECKPOINT = 768 * 1024
REPORT_NAME = r"^[a-z][a-z0-9_]{0,63}$"
LABEL_NAME = r"^[a-z][a-z0-9_]{0,31}$"
MAX_LABELS = 8
MAX_LABEL_VALUE = 64

_Text = Annotated[str, msgspec.Meta(max_length=65536)]
# Report names and labels are bounded on the wire, so a worker cannot flood the event stream
# or the metrics with arbitrary keys.
_Labels = Annotated[
    dict[
        Annotated[str, msgspec.Meta(pattern=LABEL_NAME)],
        Annotated[str, msgspec.Meta(max_length=MAX_LABEL_VALUE)],
    ],
    msgspec.Meta(max_length=MAX_LABELS),
]


class _Msg(msgspec.Struct, tag_field="type", forbid_unknown_fields=False, omit_defaults=True):
    pass


class Hello(_Msg, tag="hello"):
    versions: list[int]
    pid: int


class Welcome(_Msg, tag="welcome"):
    version: int
    path: str
    checkpoint: bytes | None = None  # the child's last checkpoint, handed back on every (re)start
    checkpoint_max: int = 0  # the largest checkpoint the supervisor keeps; 0: checkpoints are off


class Reject(_Msg, tag="reject"):
    reason: _Text


class Ready(_Msg, tag="ready"):
    pass


class Ping(_Msg, tag="ping"):
    seq: int
    sent_ns: int  # supervisor's monotonic clock; the worker echoes it untouched


class Pong(_Msg, tag="pong"):
    seq: int
    sent_ns: int  # the ping's own timestamp, echoed
    loop_lag_ms: float = 0.0  # worker's measured event-loop lag


class Shutdown(_Msg, tag="shutdown"):
    timeout: float  # seconds the supervisor will wait before SIGKILL
    reason: str = "shutdown"


class Drain(_Msg, tag="drain"):
    reason: str = "drain"  # e.g. "memory", "lifetime"


class DumpRequest(_Msg, tag="dump_request"):
    id: int


class Dump(_Msg, tag="dump"):
    id: int
    text: Annotated[str, msgspec.Meta(max_length=MAX_DUMP_TEXT)]


class Bye(_Msg, tag="bye"):
    reason: str = "normal"


class Log(_Msg, tag="log"):
    level: int
    message: _Text


class Error(_Msg, tag="error"):
    message: _Text


class Checkpoint(_Msg, tag="checkpoint"):
    # Not bounded here: one over the child's limit is dropped with an event, not a protocol fault.
    data: bytes  # opaque to the supervisor; empty: forget the checkpoint (the work is complete)


class Report(_Msg, tag="report"):
    name: Annotated[str, msgspec.Meta(pattern=REPORT_NAME)]
    value: float
    labels: _Labels = {}


SERVICE_NAME = r"^[a-z][a-z0-9_.-]{0,63}$"
_Service = Annotated[str, msgspec.Meta(pattern=SERVICE_NAME)]
_Address = Annotated[str, msgspec.Meta(max_length=512)]


class Publish(_Msg, tag="publish"):
    """This worker serves ``name`` at ``address`` (a Unix socket path, or ``@name`` for Linux's
    abstract namespace). The entry goes away when the worker exits or publishes an empty address."""

    name: _Service
    address: _Address


class Lookup(_Msg, tag="lookup"):
    id: int
    name: _Service


class Located(_Msg, tag="located"):
    id: int
    name: str
    address: str | None = None  # None: nobody serves it right now


Message = (
    Hello
    | Welcome
    | Reject
    | Ready
    | Ping
    | Pong
    | Shutdown
    | Drain
    | DumpRequest
    | Dump
    | Bye
    | Log
    | Error
    | Checkpoint
    | Report
    | Publish
    | Lookup
    | Located
)
ALL_MESSAGES: tuple[type[_Msg], ...] = (
    Hello,
    Welcome,
    Reject,
    Ready,
    Ping,
    Pong,
    Shutdown,
    Drain,
    DumpRequest,
    Dump,
    Bye,
    Log,
    Error,
    Checkpoint,
    Report,
    Publish,
    Lookup,
    Located,
)
