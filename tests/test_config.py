"""Tree files: every refusal names the file, the key path and what was expected."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otp_agents.errors import ConfigError
from otp_agents.spec.load import from_dict, load_file, loads
from otp_agents.spec.model import CommandSpec, RestartType, Strategy, SupervisorSpec, WorkerSpec, walk


def refused(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text, source="tree.toml")
    return info.value


def test_defaults_follow_otp() -> None:
    spec = loads('[[children]]\nid = "w"\ncommand = ["true"]\n[[children]]\nid = "s"\nchildren = []\n')
    assert (spec.id, spec.strategy, spec.intensity, spec.period) == ("root", Strategy.ONE_FOR_ONE, 1, 5.0)
    w, s = spec.children
    assert isinstance(w, CommandSpec) and w.shutdown == 5.0 and w.restart is RestartType.PERMANENT
    assert isinstance(s, SupervisorSpec) and s.shutdown == "infinity"


def test_kinds_follow_keys_and_nesting() -> None:
    spec = loads(
        """
strategy = "rest_for_one"
[[children]]
id = "cmd"
command = ["sleep", "1"]
env = { A = "1" }
[[children]]
id = "py"
module = "workers.demo:ticker"
[[children]]
id = "pool"
strategy = "simple_one_for_one"
max_children = 4
  [[children.children]]
  id = "leaf"
  script = "workers/leaf.py"
  restart = "temporary"
"""
    )
    kinds = [(path, type(node).__name__) for path, node in walk(spec)]
    assert kinds == [
        ("root", "SupervisorSpec"),
        ("root/cmd", "CommandSpec"),
        ("root/py", "WorkerSpec"),
        ("root/pool", "SupervisorSpec"),
        ("root/pool/leaf", "WorkerSpec"),
    ]
    leaf = spec.children[2].children[0]  # type: ignore[union-attr]
    assert isinstance(leaf, WorkerSpec) and leaf.script == "workers/leaf.py"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[children]]\nid="a"\ncommand=["x"]\n[[children]]\nid="b"\ncommand=["x"]\n[[children]]\nid="c"\n'
            'command=["x"]\nshutdown=-1\n',
            'tree.toml: children[2].shutdown: expected seconds > 0, "brutal_kill" or "infinity", got -1',
        ),
        (
            '[[children]]\nid="a"\ncommand=["x"]\n[[children]]\nid="a"\nmodule="m:f"\n',
            "tree.toml: children[1].id: duplicate child id 'a' (also children[0])",
        ),
        (
            '[[children]]\nid="a"\ncommand=["x"]\nsignificant=true\n',
            "tree.toml: children[0].significant: a permanent child cannot be significant (OTP rule)",
        ),
        (
            '[[children]]\nid="a"\ncommand=["x"]\nrestart="transient"\nsignificant=true\n',
            "tree.toml: children[0].significant: significant children need auto_shutdown = any_significant "
            "or all_significant on their supervisor (OTP rule)",
        ),
        (
            'strategy="one_for_none"\n',
            "tree.toml: strategy: expected one of one_for_one, one_for_all, rest_for_one, "
            "simple_one_for_one, got 'one_for_none'",
        ),
        (
            '[[children]]\nid="s"\nchildren=[{id="x", command=["y"], restart="sometimes"}]\n',
            "tree.toml: children[0].children[0].restart: expected one of permanent, transient, temporary, "
            "got 'sometimes'",
        ),
        (
            '[[children]]\nid="a"\ncommand=["x"]\ncolour="blue"\n',
            "tree.toml: children[0]: unknown key `colour`",
        ),
        (
            '[[children]]\nid="a"\n',
            "tree.toml: children[0]: a child needs exactly one of: `command` (plain process), `module` "
            "or `script` (protocol worker), `image` (zygote), `app` (LiveKit Agents app pool), "
            "`children` (nested supervisor); found none of them",
        ),
        (
            '[[children]]\nid="a"\ncommand=["x"]\nmodule="m:f"\n',
            "tree.toml: children[0]: a child needs exactly one of: `command` (plain process), `module` "
            "or `script` (protocol worker), `image` (zygote), `app` (LiveKit Agents app pool), "
            "`children` (nested supervisor); found command and protocol worker (module/script)",
        ),
        (
            '[[children]]\nid="a"\nmodule="not a module"\n',
            "tree.toml: children[0].module: expected \"package.module:function\", got 'not a module'",
        ),
        (
            'strategy="simple_one_for_one"\n[[children]]\nid="a"\ncommand=["x"]\n[[children]]\nid="b"\n'
            'command=["x"]\n',
            "tree.toml: children: simple_one_for_one takes exactly one child template, got 2",
        ),
        (
            "max_children=3\n",
            "tree.toml: max_children: only simple_one_for_one supervisors take it",
        ),
        (
            "intensity=-1\n",
            "tree.toml: intensity: expected `int` >= 0, got -1",
        ),
        (
            'require_env=["LIVEKIT_URL", "not a name"]\n',
            "tree.toml: require_env[1]: expected `str` matching regex '^[A-Za-z_][A-Za-z0-9_]*$', got "
            "'not a name'",
        ),
        (
            'strategy="rest_for_one"\nstart_concurrency=4\n',
            "tree.toml: start_concurrency: rest_for_one children depend on the ones before them: they "
            "start one at a time",
        ),
        (
            "[[children]]\nid='s'\nstart_concurrency=0\n[[children.children]]\nid='a'\ncommand=['x']\n",
            "tree.toml: children[0].start_concurrency: expected `int` >= 1, got 0",
        ),
        (
            '[[children]]\nid="a/b"\ncommand=["x"]\n',
            "tree.toml: children[0].id: expected an id of 1-63 letters, digits, '_', '.' or '-' (no '/'), "
            "got 'a/b'",
        ),
        (
            '[[children]]\nid="a"\ncommand=["x"]\nstop_signal="SIGKILL"\n',
            "tree.toml: children[0].stop_signal: expected a catchable signal name, got 'SIGKILL'",
        ),
        (
            'restart="permanent"\n',
            "tree.toml: restart: not allowed on the root supervisor (it has no parent)",
        ),
        (
            '[[children]]\nid="a"\ncommand=["x"]\nbackoff={initial=0.1, factor=0.5}\n',
            "tree.toml: children[0].backoff.factor: expected `float` >= 1.0, got 0.5",
        ),
    ],
)
def test_refusals_name_the_place(text: str, message: str) -> None:
    assert str(refused(text)) == message


def test_checkpoint_max_bytes() -> None:
    spec = loads(
        '[[children]]\nid="w"\nmodule="m:f"\n[[children]]\nid="x"\nmodule="m:f"\ncheckpoint_max_bytes=0\n'
    )
    default, off = spec.children
    assert isinstance(default, WorkerSpec) and default.checkpoint_max_bytes == 65536
    assert isinstance(off, WorkerSpec) and off.checkpoint_max_bytes == 0
    limit = "expected a whole number of bytes from 0 to 786432 (0 turns checkpoints off)"
    for value in ("-1", "786433", "1.5", '"64k"'):
        err = refused(f'[[children]]\nid="w"\nmodule="m:f"\ncheckpoint_max_bytes={value}\n')
        shown = repr(value.strip('"')) if value.startswith('"') else value
        assert str(err) == f"tree.toml: children[0].checkpoint_max_bytes: {limit}, got {shown}"
    # a plain command keeps no checkpoints: the key is not one of its keys
    err = refused('[[children]]\nid="c"\ncommand=["x"]\ncheckpoint_max_bytes=10\n')
    assert str(err) == "tree.toml: children[0]: unknown key `checkpoint_max_bytes`"


def test_toml_syntax_error_names_the_line() -> None:
    err = refused('id = "root"\nstrategy = \n')
    assert err.line == 2
    assert str(err).startswith("tree.toml:2: invalid TOML")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.toml: cannot read tree file"):
        load_file(tmp_path / "nope.toml")
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"id = '\xff'")
    with pytest.raises(ConfigError, match=r"bin.toml: not UTF-8 text"):
        load_file(bad)


# -- fuzzing: nothing but ConfigError ever escapes --------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["one_for_all", "permanent", "transient", "brutal_kill", "infinity", "a:b", "x"]),
)
_keys = st.sampled_from(
    [
        "id",
        "command",
        "module",
        "script",
        "children",
        "strategy",
        "restart",
        "shutdown",
        "significant",
        "intensity",
        "period",
        "auto_shutdown",
        "env",
        "backoff",
        "max_children",
        "stop_signal",
        "kind",
        "args",
        "cwd",
        "checkpoint_max_bytes",
        "zzz",
    ]
)
_values: st.SearchStrategy[Any] = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=6)),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=8))
def test_fuzz_from_dict_only_raises_config_error(data: dict[str, Any]) -> None:
    try:
        spec = from_dict(data)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(spec, SupervisorSpec)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_toml_text_only_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        loads(text)


def test_stop_bound_follows_the_stop_order() -> None:
    from otp_agents.spec.model import stop_bound

    spec = from_dict(
        {
            "children": [
                {"id": "a", "command": ["x"], "shutdown": 2},  # 2 + 1
                {
                    "id": "capped",
                    "shutdown": 3,
                    "children": [{"id": "x", "command": ["x"], "shutdown": 10}],
                },  # 4
                {
                    "id": "pool",
                    "strategy": "simple_one_for_one",
                    "children": [{"id": "t", "command": ["x"], "shutdown": 5}],  # together: 6
                },
                {"id": "b", "command": ["x"], "shutdown": "brutal_kill"},  # 1
            ]
        }
    )
    assert stop_bound(spec) == 3 + 4 + 6 + 1
    forever = from_dict({"children": [{"id": "a", "command": ["x"], "shutdown": "infinity"}]})
    assert stop_bound(forever) is None
