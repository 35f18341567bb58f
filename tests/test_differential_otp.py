"""Differential test: the same random trees and faults through Erlang/OTP and through otp-agents.

OTP's own ``supervisor`` module (run by ``tests/differential/otp_reference.escript``) and our
engine (with real OS processes) must produce the same sequence of supervisor starts, worker
starts and supervisor-initiated worker stops. Seeds are fixed, so a failure names a reproducible
case. ``OTP_DIFF_CASES`` sets how many random cases run (default 300 per backend).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from otp_agents.errors import StartError
from otp_agents.events import EventBus, Kind
from otp_agents.runtime.tree import running
from otp_agents.spec.load import from_dict

from .differential.trees import Case, generate_case, hand_checked_cases, run_otp_batch
from .helpers import FAULTY, Recorder, alive, armed, settle

_NO_ERLANG = shutil.which("escript") is None
if _NO_ERLANG and os.environ.get("OTP_AGENTS_REQUIRE_ERLANG") == "1":
    raise RuntimeError("Erlang/OTP (escript) is required here but not installed")
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(_NO_ERLANG, reason="Erlang/OTP (escript) is not installed"),
]

N_CASES = int(os.environ.get("OTP_DIFF_CASES", "300"))
FAULT_SIGNALS = {"kill": signal.SIGKILL, "normal": signal.SIGUSR1}
_otp_cache: dict[str, list[list[str]]] = {}


def _otp(name: str, cases: list[Case]) -> list[list[str]]:
    if name not in _otp_cache:
        _otp_cache[name] = run_otp_batch(cases)
    return _otp_cache[name]


async def run_ours(case: Case) -> list[str]:
    """Run one case through otp-agents; events in the escript's vocabulary."""
    bus = EventBus()
    rec = Recorder(bus)
    out: list[str] = []
    names: dict[Kind, Callable[[Any], str | None]] = {
        Kind.SUPERVISOR_STARTED: lambda e: f"sup_start {e.path}",
        Kind.CHILD_STARTED: lambda e: f"start {e.path}",
        Kind.CHILD_TERMINATED: lambda e: f"stop {e.path}",
        Kind.SUPERVISOR_STOPPED: lambda e: "root_exit" if e.path == "root" and not e.requested else None,
    }
    recording = True

    def translate(event: Any) -> None:
        fn = names.get(event.kind)
        line = fn(event) if fn and recording else None
        if line is not None:
            out.append(line)

    bus.listen(translate)
    try:
        async with running(from_dict(case.tree), bus=bus) as tree:
            for kind, path in case.faults:
                if tree.root.finished.is_set():
                    break
                pid = tree.pid(path)
                if pid is None or not alive(pid):
                    out.append(f"skip {kind} {path}")
                    continue
                await armed(pid)
                out.append(f"fault {kind} {path}")
                mark = rec.mark()
                os.kill(pid, FAULT_SIGNALS[kind])
                await rec.wait_for(lambda e, p=pid: e.kind is Kind.CHILD_EXITED and e.pid == p, mark)  # type: ignore[misc]
                await settle(tree)
            if not tree.root.finished.is_set():
                out.append("end")
            recording = False
    except StartError as exc:  # pragma: no cover - the generated trees always start
        out.append(f"start_failed {exc}")
    return out


def _explain(case: Case, ours: list[str], otp: list[str]) -> str:
    import difflib

    diff = "\n".join(difflib.unified_diff(otp, ours, "otp", "otp-agents", lineterm=""))
    return f"seed {case.seed}\ntree {case.tree}\nfaults {case.faults}\n{diff}"


async def test_hand_checked_cases_match_otp() -> None:
    hand = hand_checked_cases(FAULTY)
    otp = _otp("hand", [c for _, c, _ in hand])
    for (name, case, expected), otp_events in zip(hand, otp, strict=True):
        assert otp_events == expected, f"reference drifted for {name}"
        ours = await run_ours(case)
        assert ours == otp_events, f"{name}\n{_explain(case, ours, otp_events)}"


@pytest.mark.timeout(900)
async def test_random_trees_match_otp() -> None:
    cases = [generate_case(seed, FAULTY) for seed in range(N_CASES)]
    otp = _otp("random", cases)
    mismatches = []
    escalated = 0
    for case, otp_events in zip(cases, otp, strict=True):
        ours = await run_ours(case)
        if ours != otp_events:
            mismatches.append(_explain(case, ours, otp_events))
        escalated += otp_events[-1] == "root_exit"
        await anyio.lowlevel.checkpoint()
    assert not mismatches, f"{len(mismatches)} of {len(cases)} cases differ; first:\n{mismatches[0]}"
    assert escalated > 0, "the generated cases never exhausted the root: not a meaningful sample"
