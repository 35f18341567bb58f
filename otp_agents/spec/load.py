"""Loading a tree file (TOML) into a validated :class:`~otp_agents.spec.SupervisorSpec`.

The top level of the file is the root supervisor; ``[[children]]`` arrays nest. A child's kind
follows from its keys: ``children`` or ``strategy`` make a supervisor, ``command`` a plain OS
command, ``module`` or ``script`` a protocol worker.

Every refusal is a :class:`ConfigError` naming the file, the key path (``children[2].shutdown``)
and what was expected. OTP's own rules are applied here, before anything starts.
"""

from __future__ import annotations

import itertools
import re
import signal
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from otp_agents.errors import ConfigError
from otp_agents.spec.app_pool import AppPool, expand
from otp_agents.spec.model import (
    HEALTH_DEFAULTS,
    LOG_DEFAULTS,
    AutoShutdown,
    ChildSpec,
    CommandSpec,
    HealthSettings,
    LogSettings,
    RestartType,
    Strategy,
    SupervisorSpec,
    WorkerSpec,
    ZygoteSpec,
    resolve_health,
    resolve_logs,
)
from otp_agents.wire.messages import MAX_CHECKPOINT

ZYGOTE_MODULE = "otp_agents.zygote.program:main"
_MODULE_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_SUPERVISOR_KEYS = {"children", "strategy"}
_RESERVED = ("kind", "settings", "log_settings")
_ROOT_ONLY_FORBIDDEN = ("restart", "significant", "shutdown", "backoff")


def load_file(path: str | Path) -> SupervisorSpec:
    """Read and validate a tree file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(str(p), "", f"cannot read tree file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(p), "", f"not UTF-8 text (byte {exc.start})") from None
    return loads(text, source=str(p))


def loads(text: str, source: str = "<string>") -> SupervisorSpec:
    """Parse TOML text and validate it as a tree."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        raise ConfigError(source, "", f"invalid TOML: {exc}", line=int(m.group(1)) if m else None) from None
    return from_dict(data, source=source)


def from_dict(data: Mapping[str, Any], source: str = "<dict>") -> SupervisorSpec:
    """Validate an already-parsed mapping (the same shape as the TOML file)."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, "", f"expected a table for the root supervisor, got {_kind(data)}")
    data = dict(data)
    data.setdefault("id", "root")
    for key in (*_ROOT_ONLY_FORBIDDEN, *_RESERVED):
        if key in data:
            raise ConfigError(source, key, "not allowed on the root supervisor (it has no parent)")
    spec = _supervisor(data, source, "", _Inherited())
    _check_images(spec, source)
    return spec


def _check_images(root: SupervisorSpec, source: str) -> None:
    """Every ``zygote = "image"`` names a zygote of the tree; no image has two zygotes."""
    nodes = list(_with_keypaths(root, ""))
    images: dict[str, str] = {}
    for keypath, node in nodes:
        if isinstance(node, ZygoteSpec):
            if node.image in images:
                raise ConfigError(
                    source,
                    _join(keypath, "image"),
                    f"image {node.image!r} already has a zygote ({images[node.image]})",
                )
            images[node.image] = keypath
    for keypath, node in nodes:
        if isinstance(node, WorkerSpec) and node.zygote is not None and node.zygote not in images:
            known = ", ".join(sorted(images)) or "none"
            raise ConfigError(
                source,
                _join(keypath, "zygote"),
                f"no zygote has image {node.zygote!r} (images in this tree: {known})",
            )


def _with_keypaths(spec: SupervisorSpec, prefix: str) -> Iterator[tuple[str, ChildSpec]]:
    for i, child in enumerate(spec.children):
        keypath = _join(prefix, f"children[{i}]") if prefix else f"children[{i}]"
        yield keypath, child
        if isinstance(child, SupervisorSpec):
            yield from _with_keypaths(child, keypath)


def _kind(value: object) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _convert(data: Mapping[str, Any], cls: type[Any], source: str, keypath: str) -> Any:
    try:
        return msgspec.convert(data, type=cls)
    except msgspec.ValidationError as exc:
        problem, _, where = str(exc).partition(" - at `$")
        sub = where.rstrip("`")
        # msgspec reports e.g. "$.shutdown" or "$.command[0]"; turn it into our key path.
        if not sub:
            full = keypath
        elif sub.startswith("["):
            full = keypath + sub
        else:
            full = _join(keypath, sub.lstrip("."))
        leaf = sub.lstrip(".").split("[")[0].split(".")[-1]
        raise ConfigError(source, full, _friendly(problem, leaf, _lookup(data, sub))) from None


_MISSING = object()


def _lookup(data: Any, sub: str) -> Any:
    """The value at a msgspec path like ``.command[0]`` (or _MISSING)."""
    for token in re.findall(r"\.(\w+)|\[(\d+)\]", sub):
        key, index = token
        try:
            data = data[key] if key else data[int(index)]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return data


_CHOICES = {
    "strategy": [s.value for s in Strategy],
    "restart": [r.value for r in RestartType],
    "auto_shutdown": [a.value for a in AutoShutdown],
    "backend": ["asyncio", "trio"],
    "providers": ["app", "offline"],
    "checkpoint_store": ["disk", "memory"],
    "checkpoint": ["disk", "memory", "off"],
}


def _friendly(problem: str, leaf: str, value: Any) -> str:
    if leaf in _CHOICES and problem.startswith("Invalid enum value"):
        problem = "expected one of " + ", ".join(_CHOICES[leaf])
    elif leaf == "shutdown":
        problem = 'expected seconds > 0, "brutal_kill" or "infinity"'
    elif leaf == "never_checkpoint":
        problem = "expected a userdata field name (letters, digits and '_')"
    elif leaf == "checkpoint_max_bytes":
        problem = f"expected a whole number of bytes from 0 to {MAX_CHECKPOINT} (0 turns checkpoints off)"
    elif leaf == "id" and "regex" in problem:
        problem = "expected an id of 1-63 letters, digits, '_', '.' or '-' (no '/')"
    problem = problem.replace("Object contains unknown field", "unknown key")
    problem = problem.replace("Object missing required field", "missing required key")
    problem = problem[0].lower() + problem[1:] if problem else problem
    if value is not _MISSING and "got" not in problem and "unknown key" not in problem:
        problem += f", got {value!r}"
    return problem


@dataclass(frozen=True)
class _Inherited:
    """What a child gets from the supervisors above it."""

    health: HealthSettings = HEALTH_DEFAULTS
    logs: LogSettings = LOG_DEFAULTS

    def below(self, node: SupervisorSpec) -> _Inherited:
        return _Inherited(resolve_health(self.health, node.health), resolve_logs(self.logs, node.logs))


def _child(
    data: object, source: str, keypath: str, parent_auto: AutoShutdown, inherited: _Inherited
) -> ChildSpec:
    if not isinstance(data, dict):
        raise ConfigError(source, keypath, f"expected a table describing a child, got {_kind(data)}")
    for key in _RESERVED:
        if key in data:
            raise ConfigError(
                source, _join(keypath, key), "unknown key (a child's kind follows from its keys)"
            )
    kinds = []
    if _SUPERVISOR_KEYS & data.keys():
        kinds.append("supervisor (children/strategy)")
    if "command" in data:
        kinds.append("command")
    if "module" in data or "script" in data:
        kinds.append("protocol worker (module/script)")
    if "image" in data:
        kinds.append("zygote (image)")
    if "app" in data:
        kinds.append("LiveKit Agents app pool (app)")
    if len(kinds) != 1:
        found = " and ".join(kinds) if kinds else "none of them"
        raise ConfigError(
            source,
            keypath,
            "a child needs exactly one of: `command` (plain process), `module` or `script` "
            "(protocol worker), `image` (zygote), `app` (LiveKit Agents app pool), `children` "
            f"(nested supervisor); found {found}",
        )
    spec: ChildSpec
    if "app" in data:
        pool: AppPool = _convert(data, AppPool, source, keypath)
        for key in ("memory_soft_mb", "max_lifetime"):
            if key in pool.health and pool.checkpoint == "off":
                raise ConfigError(
                    source,
                    _join(keypath, f"health.{key}"),
                    "a recycle hands the call over through its checkpoint, and checkpoint is "
                    '"off": it would end the call (use memory_limit_mb, or checkpoints)',
                )
        for key in ("app", "llm_script"):
            named = getattr(pool, key)
            if named is not None and not Path(named).is_file():
                raise ConfigError(source, _join(keypath, key), f"no such file: {named}")
        spec = _supervisor(expand(pool), source, keypath, inherited)
    elif kinds[0].startswith("supervisor"):
        spec = _supervisor(data, source, keypath, inherited)
    elif "command" in data:
        command: CommandSpec = _convert({**data, "kind": "command"}, CommandSpec, source, keypath)
        if not command.command[0]:
            raise ConfigError(source, _join(keypath, "command[0]"), "the program name is empty")
        _check_process(command, source, keypath)
        spec = _with_settings(command, inherited, source, keypath)
    elif "image" in data:
        zygote: ZygoteSpec = _convert(
            {**data, "kind": "zygote", "module": ZYGOTE_MODULE}, ZygoteSpec, source, keypath
        )
        if zygote.zygote is not None:
            raise ConfigError(source, _join(keypath, "zygote"), "a zygote is not forked from another zygote")
        _check_process(zygote, source, keypath)
        spec = _with_settings(zygote, inherited, source, keypath)
    else:
        worker: WorkerSpec = _convert({**data, "kind": "worker"}, WorkerSpec, source, keypath)
        _check_worker(worker, source, keypath)
        spec = _with_settings(worker, inherited, source, keypath)

    if spec.significant and spec.restart is RestartType.PERMANENT:
        raise ConfigError(
            source, _join(keypath, "significant"), "a permanent child cannot be significant (OTP rule)"
        )
    if spec.significant and parent_auto is AutoShutdown.NEVER:
        raise ConfigError(
            source,
            _join(keypath, "significant"),
            "significant children need auto_shutdown = any_significant or all_significant on "
            "their supervisor (OTP rule)",
        )
    return spec


def _check_process(spec: CommandSpec | WorkerSpec, source: str, keypath: str) -> None:
    name = spec.stop_signal.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if not hasattr(signal.Signals, name) or name in ("SIGKILL", "SIGSTOP"):
        raise ConfigError(
            source,
            _join(keypath, "stop_signal"),
            f"expected a catchable signal name, got {spec.stop_signal!r}",
        )


def _check_worker(spec: WorkerSpec, source: str, keypath: str) -> None:
    if (spec.module is None) == (spec.script is None):
        raise ConfigError(source, keypath, "a protocol worker needs exactly one of `module` or `script`")
    if spec.module is not None and not _MODULE_RE.match(spec.module):
        raise ConfigError(
            source, _join(keypath, "module"), f'expected "package.module:function", got {spec.module!r}'
        )
    _check_process(spec, source, keypath)


def _with_settings(
    spec: CommandSpec | WorkerSpec, inherited: _Inherited, source: str, keypath: str
) -> CommandSpec | WorkerSpec:
    settings = resolve_health(inherited.health, spec.health)
    _check_health(settings, source, _join(keypath, "health"))
    logs = resolve_logs(inherited.logs, spec.logs)
    return msgspec.structs.replace(spec, settings=settings, log_settings=logs)


def _check_health(h: HealthSettings, source: str, keypath: str) -> None:
    """Combinations that cannot work, checked on the resolved (inherited + own) settings."""
    if h.ping_timeout < h.ping_interval:
        raise ConfigError(
            source,
            _join(keypath, "ping_timeout"),
            f"must be at least ping_interval ({h.ping_interval:g}s), got {h.ping_timeout:g}s",
        )
    levels = [
        (name, value)
        for name, value in (
            ("memory_warn_mb", h.memory_warn_mb),
            ("memory_soft_mb", h.memory_soft_mb),
            ("memory_limit_mb", h.memory_limit_mb),
        )
        if value is not None
    ]
    for (low_name, low), (high_name, high) in itertools.pairwise(levels):
        if low >= high:
            raise ConfigError(
                source, _join(keypath, high_name), f"must be above {low_name} ({low:g}), got {high:g}"
            )
    if h.dump_signal is not None:
        name = h.dump_signal.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if not hasattr(signal.Signals, name) or name in ("SIGKILL", "SIGSTOP"):
            raise ConfigError(
                source,
                _join(keypath, "dump_signal"),
                f"expected a catchable signal name, got {h.dump_signal!r}",
            )


def _supervisor(data: dict[str, Any], source: str, keypath: str, inherited: _Inherited) -> SupervisorSpec:
    raw_children = data.get("children", [])
    if not isinstance(raw_children, list):
        raise ConfigError(
            source, _join(keypath, "children"), f"expected an array of tables, got {_kind(raw_children)}"
        )
    own = {k: v for k, v in data.items() if k != "children"}
    own["kind"] = "supervisor"
    head: SupervisorSpec = _convert(own, SupervisorSpec, source, keypath)
    inherited = inherited.below(head)
    children: list[ChildSpec] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_children):
        ckey = f"{_join(keypath, 'children')}[{i}]"
        child = _child(raw, source, ckey, head.auto_shutdown, inherited)
        if child.id in seen:
            raise ConfigError(
                source, f"{ckey}.id", f"duplicate child id {child.id!r} (also children[{seen[child.id]}])"
            )
        seen[child.id] = i
        children.append(child)

    if head.strategy is Strategy.SIMPLE_ONE_FOR_ONE:
        if len(children) != 1:
            raise ConfigError(
                source,
                _join(keypath, "children"),
                f"simple_one_for_one takes exactly one child template, got {len(children)}",
            )
    elif head.max_children is not None:
        raise ConfigError(
            source, _join(keypath, "max_children"), "only simple_one_for_one supervisors take it"
        )
    if head.start_concurrency > 1 and head.strategy is Strategy.REST_FOR_ONE:
        raise ConfigError(
            source,
            _join(keypath, "start_concurrency"),
            "rest_for_one children depend on the ones before them: they start one at a time",
        )
    return msgspec.structs.replace(head, children=children)
