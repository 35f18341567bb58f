"""Random supervision trees and fault sequences for differential testing.

A *case* is a supervision tree plus a sequence of faults applied to its
workers.  The same case is rendered two ways:

* as a Python dict (``Case.tree``) in the shape of our TOML config, for the
  ``otp-agents`` engine, and
* as Erlang terms, for ``otp_reference.escript``, which runs the case through
  Erlang/OTP's real ``supervisor`` module and prints one event per line.

``run_otp_batch`` runs many cases through a single escript invocation and
returns, per case, the list of event lines (see the escript header for the
format).  Events are plain strings such as ``"start root/s1/w2"``.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "AUTO_SHUTDOWNS",
    "OTP_ESCRIPT",
    "RESTARTS",
    "STRATEGIES",
    "Case",
    "Fault",
    "Tree",
    "case_to_erlang",
    "generate_case",
    "hand_checked_cases",
    "make_case",
    "otp_available",
    "run_otp_batch",
    "validate_tree",
    "worker_paths",
]

Tree = dict[str, Any]
Fault = tuple[str, str]

OTP_ESCRIPT: Path = Path(__file__).with_name("otp_reference.escript")

STRATEGIES: tuple[str, ...] = ("one_for_one", "one_for_all", "rest_for_one")
RESTARTS: tuple[str, ...] = ("permanent", "transient", "temporary")
AUTO_SHUTDOWNS: tuple[str, ...] = ("never", "any_significant", "all_significant")
FAULT_KINDS: tuple[str, ...] = ("kill", "normal")

PERIOD = 3600  # never expires within a case: OTP's restart clock is 1 s coarse
WORKER_SHUTDOWN = 2.0  # seconds (2000 ms on the Erlang side)
MAX_SUP_DEPTH = 3  # levels of supervisors, root included
MAX_CHILDREN = 4
MAX_FAULTS = 12

_ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass
class Case:
    """One differential test case."""

    seed: int
    tree: Tree
    faults: list[Fault]
    worker_paths: list[str]


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


def _weighted(rng: random.Random, choices: list[tuple[Any, float]]) -> Any:
    values = [c[0] for c in choices]
    weights = [c[1] for c in choices]
    return rng.choices(values, weights=weights, k=1)[0]


def _gen_flags(rng: random.Random) -> dict[str, Any]:
    return {
        "strategy": rng.choice(STRATEGIES),
        "intensity": _weighted(rng, [(0, 0.25), (1, 0.3), (2, 0.25), (3, 0.2)]),
        "period": PERIOD,
        "auto_shutdown": _weighted(rng, [("never", 0.8), ("any_significant", 0.1), ("all_significant", 0.1)]),
    }


def _gen_children(
    rng: random.Random, depth: int, auto_shutdown: str, worker_command: list[str]
) -> list[Tree]:
    n = _weighted(rng, [(1, 1.0), (2, 3.0), (3, 3.0), (4, 2.0)])
    # Chance that a child is a nested supervisor, by depth of the parent.
    p_sup = {1: 0.35, 2: 0.2}.get(depth, 0.0)
    children: list[Tree] = []
    n_workers = 0
    n_sups = 0
    for _ in range(n):
        if auto_shutdown == "never":
            restart = _weighted(rng, [("permanent", 0.5), ("transient", 0.3), ("temporary", 0.2)])
            significant = False
        else:
            restart = _weighted(rng, [("permanent", 0.3), ("transient", 0.4), ("temporary", 0.3)])
            significant = restart != "permanent" and rng.random() < 0.7
        if depth < MAX_SUP_DEPTH and rng.random() < p_sup:
            n_sups += 1
            flags = _gen_flags(rng)
            child: Tree = {
                "id": f"s{n_sups}",
                "restart": restart,
                "significant": significant,
                "shutdown": "infinity",
                **flags,
                "children": _gen_children(rng, depth + 1, flags["auto_shutdown"], worker_command),
            }
        else:
            n_workers += 1
            child = {
                "id": f"w{n_workers}",
                "restart": restart,
                "significant": significant,
                "shutdown": WORKER_SHUTDOWN,
                "command": list(worker_command),
            }
        children.append(child)
    return children


def _gen_faults(rng: random.Random, paths: list[str]) -> list[Fault]:
    n = rng.randint(1, MAX_FAULTS)
    faults: list[Fault] = []
    for _ in range(n):
        # Often hammer the same worker again: drives restart intensity over.
        path = faults[-1][1] if faults and rng.random() < 0.35 else rng.choice(paths)
        kind = _weighted(rng, [("kill", 0.6), ("normal", 0.4)])
        faults.append((kind, path))
    return faults


def generate_case(seed: int, worker_command: list[str]) -> Case:
    """Deterministically generate a random tree and fault sequence from seed."""
    rng = random.Random(seed)
    flags = _gen_flags(rng)
    tree: Tree = {
        "id": "root",
        **flags,
        "children": _gen_children(rng, 1, flags["auto_shutdown"], worker_command),
    }
    paths = worker_paths(tree)
    faults = _gen_faults(rng, paths)
    validate_tree(tree)
    return Case(seed=seed, tree=tree, faults=faults, worker_paths=paths)


def make_case(tree: Tree, faults: list[Fault], seed: int = -1) -> Case:
    """Build a Case from a hand-written tree (validated) and fault list."""
    validate_tree(tree)
    paths = worker_paths(tree)
    for kind, path in faults:
        if kind not in FAULT_KINDS:
            raise ValueError(f"bad fault kind {kind!r}")
        if path not in paths:
            raise ValueError(f"fault path {path!r} is not a worker path")
    return Case(seed=seed, tree=tree, faults=list(faults), worker_paths=paths)


def _is_sup(node: Tree) -> bool:
    return "children" in node


def worker_paths(tree: Tree) -> list[str]:
    """All worker paths of the tree, in depth-first start order."""
    out: list[str] = []

    def walk(node: Tree, path: str) -> None:
        for child in node["children"]:
            cpath = f"{path}/{child['id']}"
            if _is_sup(child):
                walk(child, cpath)
            else:
                out.append(cpath)

    walk(tree, tree["id"])
    return out


def validate_tree(tree: Tree) -> None:
    """Raise ValueError unless the tree satisfies the shared tree model."""
    if tree.get("id") != "root":
        raise ValueError("root supervisor id must be 'root'")
    for key in ("restart", "significant", "shutdown"):
        if key in tree:
            raise ValueError(f"root supervisor must not have {key!r}")
    _validate_sup(tree, "root", 1)


def _validate_sup(node: Tree, path: str, depth: int) -> None:
    if depth > MAX_SUP_DEPTH:
        raise ValueError(f"{path}: supervisors nested deeper than {MAX_SUP_DEPTH}")
    if node["strategy"] not in STRATEGIES:
        raise ValueError(f"{path}: bad strategy {node['strategy']!r}")
    if not (isinstance(node["intensity"], int) and node["intensity"] >= 0):
        raise ValueError(f"{path}: bad intensity {node['intensity']!r}")
    if not (isinstance(node["period"], int) and node["period"] > 0):
        raise ValueError(f"{path}: bad period {node['period']!r}")
    if node["auto_shutdown"] not in AUTO_SHUTDOWNS:
        raise ValueError(f"{path}: bad auto_shutdown {node['auto_shutdown']!r}")
    children = node["children"]
    if not 1 <= len(children) <= MAX_CHILDREN:
        raise ValueError(f"{path}: needs 1..{MAX_CHILDREN} children")
    ids = [c["id"] for c in children]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate child ids {ids}")
    for child in children:
        cid = child["id"]
        cpath = f"{path}/{cid}"
        if not isinstance(cid, str) or not _ID_RE.match(cid):
            raise ValueError(f"{cpath}: bad child id {cid!r}")
        if child["restart"] not in RESTARTS:
            raise ValueError(f"{cpath}: bad restart {child['restart']!r}")
        if not isinstance(child["significant"], bool):
            raise ValueError(f"{cpath}: significant must be a bool")
        if child["significant"] and (child["restart"] == "permanent" or node["auto_shutdown"] == "never"):
            raise ValueError(
                f"{cpath}: significant requires a non-permanent child "
                "and a parent auto_shutdown other than 'never'"
            )
        if _is_sup(child):
            if child["shutdown"] != "infinity":
                raise ValueError(f"{cpath}: supervisor shutdown must be 'infinity'")
            _validate_sup(child, cpath, depth + 1)
        elif child["shutdown"] != WORKER_SHUTDOWN:
            raise ValueError(f"{cpath}: worker shutdown must be {WORKER_SHUTDOWN}")


# ---------------------------------------------------------------------------
# Hand-checked cases (expected events verified against OTP 25 by hand)
# ---------------------------------------------------------------------------


def _hw(wid: str, cmd: list[str], restart: str = "permanent", significant: bool = False) -> Tree:
    return {
        "id": wid,
        "restart": restart,
        "significant": significant,
        "shutdown": WORKER_SHUTDOWN,
        "command": list(cmd),
    }


def _hs(
    sid: str,
    strategy: str,
    intensity: int,
    children: list[Tree],
    restart: str = "permanent",
    significant: bool = False,
    auto_shutdown: str = "never",
) -> Tree:
    return {
        "id": sid,
        "restart": restart,
        "significant": significant,
        "shutdown": "infinity",
        "strategy": strategy,
        "intensity": intensity,
        "period": PERIOD,
        "auto_shutdown": auto_shutdown,
        "children": children,
    }


def _hroot(strategy: str, intensity: int, children: list[Tree], auto_shutdown: str = "never") -> Tree:
    return {
        "id": "root",
        "strategy": strategy,
        "intensity": intensity,
        "period": PERIOD,
        "auto_shutdown": auto_shutdown,
        "children": children,
    }


def hand_checked_cases(worker_command: list[str]) -> list[tuple[str, Case, list[str]]]:
    """Small cases with their expected event lists, as (name, case, events).

    Every expected list was worked out by hand from OTP's documented
    semantics and confirmed against OTP 25's ``supervisor``.
    """
    c = worker_command
    w, s, r = _hw, _hs, _hroot
    three = ["start root/w1", "start root/w2", "start root/w3"]
    nested3 = ["sup_start root/s1", "start root/s1/w1", "start root/s1/w2", "start root/s1/w3"]
    spec: list[tuple[str, Tree, list[Fault], list[str]]] = [
        (
            # one_for_all: the others stop in reverse start order, all restart in order.
            "one_for_all_kill_middle",
            r("one_for_all", 3, [w("w1", c), w("w2", c), w("w3", c)]),
            [("kill", "root/w2")],
            ["sup_start root", *three, "fault kill root/w2", "stop root/w3", "stop root/w1", *three, "end"],
        ),
        (
            # A transient worker exiting normally is not restarted; nothing else happens.
            "transient_normal_exit",
            r("one_for_one", 3, [w("w1", c, "transient"), w("w2", c)]),
            [("normal", "root/w1"), ("kill", "root/w1")],
            [
                "sup_start root",
                "start root/w1",
                "start root/w2",
                "fault normal root/w1",
                "skip kill root/w1",
                "end",
            ],
        ),
        (
            # rest_for_one: later siblings stop (reverse), failed one and later restart.
            "rest_for_one_kill_middle",
            r("rest_for_one", 3, [w("w1", c), w("w2", c), w("w3", c), w("w4", c)]),
            [("kill", "root/w2")],
            [
                "sup_start root",
                *three,
                "start root/w4",
                "fault kill root/w2",
                "stop root/w4",
                "stop root/w3",
                "start root/w2",
                "start root/w3",
                "start root/w4",
                "end",
            ],
        ),
        (
            # Nested intensity 0: s1 stops its remaining workers and exits; root
            # (one_for_all) then stops its other children and restarts everything.
            "nested_intensity0_escalates_one_for_all",
            r(
                "one_for_all",
                3,
                [w("w1", c), s("s1", "one_for_one", 0, [w("w1", c), w("w2", c), w("w3", c)]), w("w2", c)],
            ),
            [("kill", "root/s1/w2")],
            [
                "sup_start root",
                "start root/w1",
                *nested3,
                "start root/w2",
                "fault kill root/s1/w2",
                "stop root/s1/w3",
                "stop root/s1/w1",
                "stop root/w2",
                "stop root/w1",
                "start root/w1",
                *nested3,
                "start root/w2",
                "end",
            ],
        ),
        (
            # A supervisor that gives up exits with reason `shutdown`, which a
            # parent treats as a normal exit for a *transient* child: not restarted.
            "transient_supervisor_gives_up_not_restarted",
            r(
                "one_for_one",
                3,
                [
                    w("w1", c),
                    s("s1", "one_for_one", 0, [w("w1", c), w("w2", c)], restart="transient"),
                    w("w2", c),
                ],
            ),
            [("kill", "root/s1/w1"), ("kill", "root/s1/w2"), ("kill", "root/w2")],
            [
                "sup_start root",
                "start root/w1",
                "sup_start root/s1",
                "start root/s1/w1",
                "start root/s1/w2",
                "start root/w2",
                "fault kill root/s1/w1",
                "stop root/s1/w2",
                "skip kill root/s1/w2",
                "fault kill root/w2",
                "start root/w2",
                "end",
            ],
        ),
        (
            # A temporary child that dies triggers nothing, even under one_for_all;
            # temporary siblings stopped by a group restart are dropped for good.
            "one_for_all_temporary_children",
            r("one_for_all", 3, [w("w1", c, "temporary"), w("w2", c), w("w3", c, "transient")]),
            [("kill", "root/w2"), ("kill", "root/w1")],
            [
                "sup_start root",
                *three,
                "fault kill root/w2",
                "stop root/w3",
                "stop root/w1",
                "start root/w2",
                "start root/w3",
                "skip kill root/w1",
                "end",
            ],
        ),
        (
            # A transient child that ended normally is started again by a later
            # one_for_all group restart (it is not stopped first: not running).
            "one_for_all_restarts_ended_transient",
            r("one_for_all", 3, [w("w1", c, "transient"), w("w2", c), w("w3", c)]),
            [("normal", "root/w1"), ("kill", "root/w3")],
            [
                "sup_start root",
                *three,
                "fault normal root/w1",
                "fault kill root/w3",
                "stop root/w2",
                *three,
                "end",
            ],
        ),
        (
            # Root intensity 1: the second restart within the period is one too many.
            "root_intensity_exhausted",
            r("one_for_one", 1, [w("w1", c), w("w2", c)]),
            [("kill", "root/w1"), ("kill", "root/w1"), ("kill", "root/w2")],
            [
                "sup_start root",
                "start root/w1",
                "start root/w2",
                "fault kill root/w1",
                "start root/w1",
                "fault kill root/w1",
                "stop root/w2",
                "root_exit",
            ],
        ),
        (
            # A permanent worker exiting normally is still restarted (counts too).
            "permanent_normal_exit_counts",
            r("one_for_one", 0, [w("w1", c), w("w2", c)]),
            [("normal", "root/w1")],
            [
                "sup_start root",
                "start root/w1",
                "start root/w2",
                "fault normal root/w1",
                "stop root/w2",
                "root_exit",
            ],
        ),
        (
            # any_significant: a killed transient significant child is restarted;
            # its normal exit shuts the supervisor down.
            "any_significant_transient",
            r(
                "one_for_one",
                3,
                [w("w1", c), w("w2", c, "transient", True), w("w3", c)],
                auto_shutdown="any_significant",
            ),
            [("kill", "root/w2"), ("normal", "root/w2"), ("kill", "root/w1")],
            [
                "sup_start root",
                *three,
                "fault kill root/w2",
                "start root/w2",
                "fault normal root/w2",
                "stop root/w3",
                "stop root/w1",
                "root_exit",
            ],
        ),
        (
            # A temporary significant child triggers auto_shutdown whatever the reason.
            "any_significant_temporary_killed",
            r("one_for_one", 3, [w("w1", c), w("w2", c, "temporary", True)], auto_shutdown="any_significant"),
            [("kill", "root/w2")],
            [
                "sup_start root",
                "start root/w1",
                "start root/w2",
                "fault kill root/w2",
                "stop root/w1",
                "root_exit",
            ],
        ),
        (
            "all_significant",
            r(
                "one_for_one",
                3,
                [w("w1", c, "temporary", True), w("w2", c, "transient", True), w("w3", c)],
                auto_shutdown="all_significant",
            ),
            [("normal", "root/w1"), ("kill", "root/w2"), ("normal", "root/w2")],
            [
                "sup_start root",
                *three,
                "fault normal root/w1",
                "fault kill root/w2",
                "start root/w2",
                "fault normal root/w2",
                "stop root/w3",
                "root_exit",
            ],
        ),
        (
            # A significant transient supervisor that gives up (reason shutdown)
            # counts as a normal exit, so it triggers the parent's auto_shutdown.
            "significant_supervisor_gives_up",
            r(
                "one_for_one",
                3,
                [w("w1", c), s("s1", "one_for_one", 0, [w("w1", c)], restart="transient", significant=True)],
                auto_shutdown="any_significant",
            ),
            [("kill", "root/s1/w1")],
            [
                "sup_start root",
                "start root/w1",
                "sup_start root/s1",
                "start root/s1/w1",
                "fault kill root/s1/w1",
                "stop root/w1",
                "root_exit",
            ],
        ),
        (
            # Escalation through two levels of intensity-0 supervisors to the root.
            "escalate_to_root",
            r(
                "one_for_one",
                0,
                [
                    s("s1", "one_for_one", 0, [s("s1", "rest_for_one", 0, [w("w1", c), w("w2", c)])]),
                    w("w1", c),
                ],
            ),
            [("kill", "root/s1/s1/w1")],
            [
                "sup_start root",
                "sup_start root/s1",
                "sup_start root/s1/s1",
                "start root/s1/s1/w1",
                "start root/s1/s1/w2",
                "start root/w1",
                "fault kill root/s1/s1/w1",
                "stop root/s1/s1/w2",
                "stop root/w1",
                "root_exit",
            ],
        ),
    ]
    return [(name, make_case(tree, faults), events) for name, tree, faults, events in spec]


# ---------------------------------------------------------------------------
# Erlang rendering
# ---------------------------------------------------------------------------


def _erl_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _erl_bool(b: bool) -> str:
    return "true" if b else "false"


def _erl_flags(node: Tree) -> str:
    return f"{node['strategy']}, {int(node['intensity'])}, {int(node['period'])}, {node['auto_shutdown']}"


def _erl_child(child: Tree) -> str:
    head = f"{_erl_str(child['id'])}, {child['restart']}, {_erl_bool(child['significant'])}"
    if _is_sup(child):
        kids = ", ".join(_erl_child(c) for c in child["children"])
        return f"{{sup, {head}, {_erl_flags(child)}, [{kids}]}}"
    return f"{{worker, {head}}}"


def case_to_erlang(case: Case, index: int) -> str:
    """Render a case as one Erlang term (with trailing '.') for the escript."""
    tree = case.tree
    kids = ", ".join(_erl_child(c) for c in tree["children"])
    root = f"{{sup, {_erl_str(tree['id'])}, {_erl_flags(tree)}, [{kids}]}}"
    faults = ", ".join(f"{{{kind}, {_erl_str(path)}}}" for kind, path in case.faults)
    return f"{{'case', {index}, {int(case.seed)}, {root}, [{faults}]}}.\n"


# ---------------------------------------------------------------------------
# Running OTP
# ---------------------------------------------------------------------------


def otp_available() -> bool:
    """True if an escript interpreter is on PATH."""
    return shutil.which("escript") is not None


def _parse_output(stdout: str, n_cases: int) -> list[list[str]]:
    results: list[list[str]] = []
    current: list[str] | None = None
    done = False
    for line in stdout.splitlines():
        if not line:
            continue
        if done:
            raise RuntimeError(f"otp_reference: output after 'done': {line!r}")
        if line == "done":
            done = True
            continue
        if line.startswith("case "):
            index = int(line.split()[1])
            if index != len(results):
                raise RuntimeError(f"otp_reference: expected case {len(results)}, got {index}")
            current = []
            results.append(current)
            continue
        if current is None:
            raise RuntimeError(f"otp_reference: event before first case: {line!r}")
        if line.startswith("case_error "):
            raise RuntimeError(f"otp_reference failed: {line}\nevents: {current}")
        current.append(line)
    if not done:
        raise RuntimeError("otp_reference: output ended without 'done'")
    if len(results) != n_cases:
        raise RuntimeError(f"otp_reference: got {len(results)} cases, expected {n_cases}")
    for i, events in enumerate(results):
        if not events or events[-1] not in ("end", "root_exit"):
            raise RuntimeError(f"otp_reference: case {i} has no end marker: {events}")
    return results


def run_otp_batch(cases: list[Case], timeout: float = 120) -> list[list[str]]:
    """Run all cases through OTP's supervisor in one escript run.

    Returns one list of event lines per case, in the order given.  Each list
    ends with ``"end"`` (tree still alive after the last fault; torn down
    silently) or ``"root_exit"`` (the root supervisor terminated).
    """
    escript = shutil.which("escript")
    if escript is None:
        raise RuntimeError("escript (Erlang/OTP) not found on PATH")
    if not cases:
        return []
    with tempfile.TemporaryDirectory(prefix="otp-diff-") as tmp:
        terms = Path(tmp) / "cases.terms"
        terms.write_text(
            "".join(case_to_erlang(c, i) for i, c in enumerate(cases)),
            encoding="utf-8",
        )
        proc = subprocess.run(
            [escript, str(OTP_ESCRIPT), str(terms)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(
            f"otp_reference exited with {proc.returncode}\n"
            f"stderr:\n{proc.stderr[-4000:]}\nstdout tail:\n{proc.stdout[-4000:]}"
        )
    return _parse_output(proc.stdout, len(cases))


def _main(argv: list[str]) -> int:
    """Self-check: hand-checked cases, then N random seeds through OTP."""
    import time

    n = int(argv[1]) if len(argv) > 1 else 300
    hand = hand_checked_cases(["true"])
    got = run_otp_batch([case for _, case, _ in hand])
    failures = 0
    for (name, _, expected), events in zip(hand, got, strict=True):
        if events != expected:
            failures += 1
            print(f"MISMATCH {name}:\n  expected {expected}\n  got      {events}")
    cases = [generate_case(seed, ["true"]) for seed in range(n)]
    t0 = time.monotonic()
    results = run_otp_batch(cases)
    elapsed = time.monotonic() - t0
    root_exits = sum(1 for ev in results if ev[-1] == "root_exit")
    print(
        f"hand-checked: {len(hand) - failures}/{len(hand)} ok; "
        f"{n} random cases in {elapsed:.2f}s, {root_exits} ended in root_exit"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv))
