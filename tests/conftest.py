from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _own_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A supervisor started by a test without --state-dir gets a fresh one, never ./state (which
    `make run` may be holding)."""
    monkeypatch.setenv("OTP_AGENTS_STATE_DIR", str(tmp_path_factory.mktemp("state")))
