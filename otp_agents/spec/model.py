"""The typed tree specification.

A tree file is decoded once, at the edge, into these Structs (see ``config.py``); everything after
that point only ever sees valid values. The vocabulary is Erlang/OTP's: a supervisor has a
``strategy``, an ``intensity`` and a ``period``; every child has a ``restart`` type, a ``shutdown``
and may be ``significant``.

Defaults are declared here, once, and follow OTP:

* ``intensity = 1``, ``period = 5`` seconds, ``auto_shutdown = "never"``;
* worker ``shutdown = 5`` seconds, supervisor ``shutdown = "infinity"``;
* ``restart = "permanent"``.

Two defaults have no OTP counterpart because OS processes need them: a protocol worker must say
Ready within ``start_timeout`` (10 s, LiveKit Agents' initialize timeout), and an opt-in restart
``backoff`` (off by default: OTP restarts immediately).
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal, TypeVar

import msgspec

from otp_agents.wire.messages import MAX_CHECKPOINT

ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$"

ChildId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
ImageName = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
Shutdown = Annotated[float, msgspec.Meta(gt=0)] | Literal["brutal_kill", "infinity"]


class Strategy(enum.StrEnum):
    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"
    SIMPLE_ONE_FOR_ONE = "simple_one_for_one"


class RestartType(enum.StrEnum):
    PERMANENT = "permanent"  # always restarted
    TRANSIENT = "transient"  # restarted only after an abnormal exit
    TEMPORARY = "temporary"  # never restarted; removed when it ends


class AutoShutdown(enum.StrEnum):
    NEVER = "never"
    ANY_SIGNIFICANT = "any_significant"
    ALL_SIGNIFICANT = "all_significant"


class Backoff(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Opt-in delay before a restart: ``min(max, initial * factor**n) * (1 + jitter * U(-1, 1))``.

    ``n`` counts consecutive restarts of the child and resets once it has run ``reset_after``
    seconds. The intensity window still applies: backoff slows a crash loop, intensity ends it.
    """

    initial: Seconds = 0.1
    max: Seconds = 30.0
    factor: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    jitter: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.2
    reset_after: Seconds = 60.0


MemoryMetric = Literal["pss", "uss", "rss"]
Megabytes = Annotated[float, msgspec.Meta(gt=0)]


class Health(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """Health-monitor settings. Every field is optional: on a supervisor they are defaults for
    every process below it, on a child they override what it inherits (see :data:`HEALTH_DEFAULTS`).

    Heartbeats apply to protocol workers; memory, lifetime and dumps to every process child.
    """

    ping_interval: Seconds | None = None
    ping_timeout: Seconds | None = None
    high_ping_threshold: Seconds | None = None
    memory_interval: Seconds | None = None
    memory_metric: MemoryMetric | None = None
    memory_warn_mb: Megabytes | None = None
    memory_soft_mb: Megabytes | None = None
    memory_limit_mb: Megabytes | None = None
    # Kernel-enforced, where the child has a memory cgroup (otp_agents/proc/memcg.py): a hard
    # limit (the kernel's OOM killer ends it: a ``memory`` crash) and a reclaim target.
    memory_max_mb: Megabytes | None = None
    memory_high_mb: Megabytes | None = None
    memory_grace: Annotated[int, msgspec.Meta(ge=1)] | None = None
    dump_timeout: Seconds | None = None
    # Plain commands only: the signal that makes the program write its stacks (opt-in).
    dump_signal: str | None = None
    max_lifetime: Seconds | None = None
    lifetime_jitter: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None


class HealthSettings(msgspec.Struct, frozen=True):
    """Fully resolved health settings of one process child (no None except the opt-ins)."""

    ping_interval: float = 2.5
    ping_timeout: float = 10.0
    high_ping_threshold: float = 0.5
    memory_interval: float = 1.0
    memory_metric: MemoryMetric = "pss"
    memory_warn_mb: float | None = None
    memory_soft_mb: float | None = None
    memory_limit_mb: float | None = None
    memory_max_mb: float | None = None
    memory_high_mb: float | None = None
    memory_grace: int = 3
    dump_timeout: float = 1.0
    dump_signal: str | None = None
    max_lifetime: float | None = None
    lifetime_jitter: float = 0.1

    @property
    def watches_memory(self) -> bool:
        return any(v is not None for v in (self.memory_warn_mb, self.memory_soft_mb, self.memory_limit_mb))


HEALTH_DEFAULTS = HealthSettings()


def resolve_health(base: HealthSettings, override: Health | None) -> HealthSettings:
    """``base`` with every field that ``override`` sets replaced."""
    return _override(base, override)


_S = TypeVar("_S", bound=msgspec.Struct)


def _override(base: _S, override: msgspec.Struct | None) -> _S:
    if override is None:
        return base
    fields = override.__struct_fields__
    changes = {f: getattr(override, f) for f in fields if getattr(override, f) is not None}
    return msgspec.structs.replace(base, **changes) if changes else base


class Logs(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """Where a child's stdout and stderr go. Optional fields, inherited like ``health``."""

    max_bytes: Annotated[int, msgspec.Meta(ge=4096)] | None = None  # one file, before it rotates
    backups: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None  # rotated files kept per instance
    keep: Annotated[int, msgspec.Meta(ge=1, le=1000)] | None = None  # instances kept per child path
    echo: bool | None = None  # each line also in the supervisor's own log


class LogSettings(msgspec.Struct, frozen=True):
    """Resolved log settings of one process child."""

    max_bytes: int = 10 * 1024 * 1024
    backups: int = 3
    keep: int = 5
    echo: bool = True


LOG_DEFAULTS = LogSettings()


def resolve_logs(base: LogSettings, override: Logs | None) -> LogSettings:
    """``base`` with every field that ``override`` sets replaced."""
    if override is None:
        return base
    changes = {
        f: getattr(override, f) for f in override.__struct_fields__ if getattr(override, f) is not None
    }
    return msgspec.structs.replace(base, **changes) if changes else base


class _ChildBase(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    id: ChildId
    restart: RestartType = RestartType.PERMANENT
    significant: bool = False
    backoff: Backoff | None = None
    # As written in the tree file; spec/load.py resolves inheritance into ``settings`` and
    # ``log_settings``.
    health: Health | None = None
    logs: Logs | None = None


class _ProcessBase(_ChildBase, kw_only=True, frozen=True):
    env: dict[str, str] = {}
    # When true the child gets only ``env`` (plus PATH); otherwise the supervisor's environment
    # with ``env`` layered on top.
    clear_env: bool = False
    cwd: str | None = None
    shutdown: Shutdown = 5.0
    # Signal sent first when the supervisor stops the child (SIGKILL follows after ``shutdown``).
    stop_signal: str = "SIGTERM"
    # Resolved by spec/load.py from the supervisors' and the child's ``health`` and ``logs`` tables.
    settings: HealthSettings = HEALTH_DEFAULTS
    log_settings: LogSettings = LOG_DEFAULTS


class CommandSpec(_ProcessBase, kw_only=True, frozen=True, tag_field="kind", tag="command"):
    """A plain OS command. It counts as started as soon as it has been spawned."""

    command: Annotated[list[str], msgspec.Meta(min_length=1)]


class WorkerSpec(_ProcessBase, kw_only=True, frozen=True, tag_field="kind", tag="worker"):
    """A Python worker that speaks the otp-agents protocol. Started when it says Ready."""

    module: str | None = None  # "package.module:function"
    script: str | None = None  # path to a script that calls otp_agents.worker.run(...)
    args: list[str] = []
    python: str | None = None  # interpreter; default: the supervisor's own
    backend: Literal["asyncio", "trio"] = "asyncio"
    start_timeout: Seconds = 10.0
    # Largest checkpoint kept for this child (bytes); 0 turns checkpoints off. The cap keeps a
    # Welcome that carries one inside a frame.
    checkpoint_max_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_CHECKPOINT)] = 65536
    # Where the supervisor keeps them: "disk" (the state dir too: a restart of the supervisor
    # resumes) or "memory" (never written anywhere; private calls).
    checkpoint_store: Literal["disk", "memory"] = "disk"
    # Fork this worker from the zygote of this image (a ZygoteSpec child somewhere in the tree)
    # instead of starting a fresh interpreter; it starts cold while that zygote is down.
    zygote: ImageName | None = None


class ZygoteSpec(WorkerSpec, kw_only=True, frozen=True, tag_field="kind", tag="zygote"):
    """A zygote (``otp_agents/zygote/``): imports ``preload`` once and forks the workers that
    name its ``image``. Supervised like any protocol worker."""

    image: ImageName
    # Modules imported once, in order; ``module:function`` also calls that function (no
    # arguments) after the import: the place for work that is not an import (a model loaded, an
    # app's prewarm). Each must leave the zygote single-threaded: it forks.
    preload: list[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?$")]] = []
    # Workers forked ahead of need, waiting for their request: a (re)start then costs a hand-over,
    # not a fork. Each costs its unshared memory (a few MB); a dead one is replaced at once.
    idle: Annotated[int, msgspec.Meta(ge=0, le=64)] = 1


class SupervisorSpec(_ChildBase, kw_only=True, frozen=True, tag_field="kind", tag="supervisor"):
    """A supervisor node. Its children start in list order and stop in reverse order."""

    strategy: Strategy = Strategy.ONE_FOR_ONE
    intensity: Annotated[int, msgspec.Meta(ge=0)] = 1
    period: Seconds = 5.0
    auto_shutdown: AutoShutdown = AutoShutdown.NEVER
    shutdown: Shutdown = "infinity"
    # Only for simple_one_for_one: cap on dynamic children (None: no cap).
    max_children: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # Not in OTP: how many worker/command children may start at once (1: one after another,
    # each started before the next). Zygotes and supervisors still start alone, in order.
    start_concurrency: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1
    # Environment variables the tree cannot run without: `otp-agents run` refuses to start,
    # naming the first one missing, before anything starts (LIVEKIT_* are also checked for sense).
    require_env: list[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = []
    children: list[ChildSpec] = []


ChildSpec = CommandSpec | WorkerSpec | ZygoteSpec | SupervisorSpec
ProcessSpec = CommandSpec | WorkerSpec


def walk(spec: SupervisorSpec, path: str | None = None) -> list[tuple[str, ChildSpec]]:
    """Every node of the tree with its path, parents before children, in start order."""
    here = path or spec.id
    out: list[tuple[str, ChildSpec]] = [(here, spec)]
    for child in spec.children:
        child_path = f"{here}/{child.id}"
        if isinstance(child, SupervisorSpec):
            out.extend(walk(child, child_path))
        else:
            out.append((child_path, child))
    return out


KILL_MARGIN = 1.0  # seconds allowed for a SIGKILLed child to be gone and reaped


def stop_bound(node: ChildSpec) -> float | None:
    """The longest an ordered stop of ``node`` can take, in seconds (None: unbounded, some
    ``shutdown = "infinity"`` on a process). Static children stop one after another, dynamic
    ones (simple_one_for_one) together; a supervisor's own ``shutdown`` caps its subtree.
    Container and service managers must wait at least this long before their SIGKILL."""
    if not isinstance(node, SupervisorSpec):
        if node.shutdown == "infinity":
            return None
        return (0.0 if node.shutdown == "brutal_kill" else float(node.shutdown)) + KILL_MARGIN
    bounds = [stop_bound(c) for c in node.children]
    inner: float | None
    if any(b is None for b in bounds):
        inner = None
    elif node.strategy is Strategy.SIMPLE_ONE_FOR_ONE:
        inner = max((b for b in bounds if b is not None), default=0.0)
    else:
        inner = sum(b for b in bounds if b is not None)
    if node.shutdown == "infinity":
        return inner
    cap = (0.0 if node.shutdown == "brutal_kill" else float(node.shutdown)) + KILL_MARGIN
    return cap if inner is None else min(inner, cap)
