"""Loading a LiveKit Agents app file exactly as ``python app.py start`` would.

LiveKit's CLI runs the app file as ``__main__``; its job processes (multiprocessing, forkserver
on Linux) get the entrypoint by reference (``__main__.entrypoint``) and re-run the file as
``__mp_main__`` to find it, with the parent's ``sys.path``. The host does the same: the file
becomes this process's ``__main__`` (for good: the job processes LiveKit starts later read it),
its folder goes first on ``sys.path`` and on ``PYTHONPATH`` (for any fresh interpreter the app
starts), and its ``if __name__ == "__main__":`` block runs, where ``cli.run_app(...)`` hands us
the app instead of starting LiveKit's own CLI. Both styles load:

- ``cli.run_app(server)`` with an ``AgentServer`` (``@server.rtc_session()``);
- ``cli.run_app(WorkerOptions(entrypoint_fnc=..., prewarm_fnc=...))``, the older style.

A file that never calls ``run_app`` is searched for an ``AgentServer`` global instead.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otp_agents.errors import OtpAgentsError

if TYPE_CHECKING:
    from livekit.agents import AgentServer

SERVER_NAMES = ("server", "app", "agent")


class AgentFileError(OtpAgentsError, ValueError):
    """The agent file cannot be loaded or defines no app; the message names the file."""


class _HandedOver(BaseException):
    """Raised by the stand-in ``run_app`` to leave the app's ``__main__`` block, as LiveKit's
    own ``run_app`` never returns into it either (it ends the process)."""


def load_app(path: str | Path, command: str = "start") -> AgentServer:
    """Run the app file as ``__main__`` and return its ``AgentServer``. ``command`` is what
    ``sys.argv[1]`` says while the file runs (``start`` or ``console``, as LiveKit's CLI has it)."""
    from livekit.agents import AgentServer, WorkerOptions
    from livekit.agents import cli as cli_package
    from livekit.agents.cli import cli as cli_module

    file = Path(path).resolve()
    if not file.is_file():
        raise AgentFileError(f"{path}: no such agent file")
    try:
        # dont_inherit: the app is compiled as itself, not with this module's `from __future__` flags
        code = compile(file.read_bytes(), str(file), "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        raise AgentFileError(f"{path}: not a Python module: {exc}") from None
    handed: list[Any] = []

    def run_app(app: Any) -> None:
        handed.append(app)
        raise _HandedOver

    module = types.ModuleType("__main__")
    module.__file__ = str(file)
    _on_path(str(file.parent))
    previous = (sys.modules["__main__"], sys.argv, cli_package.run_app, cli_module.run_app)
    sys.modules["__main__"] = module
    sys.argv = [str(file), command]
    cli_package.run_app = cli_module.run_app = run_app  # type: ignore[assignment]
    try:
        exec(code, module.__dict__)
    except _HandedOver:
        pass
    except BaseException as exc:
        sys.modules["__main__"] = previous[0]
        raise AgentFileError(f"{path}: running it failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.argv = previous[1]
        cli_package.run_app, cli_module.run_app = previous[2], previous[3]
    if handed:
        app = handed[0]
        if isinstance(app, AgentServer):
            return app
        if isinstance(app, WorkerOptions):
            return AgentServer.from_server_options(app)
        raise AgentFileError(f"{path}: cli.run_app was given a {type(app).__name__}, not an AgentServer")
    return _find_server(module, path, AgentServer)


def _find_server(module: types.ModuleType, path: str | Path, kind: type[AgentServer]) -> AgentServer:
    for attr in SERVER_NAMES:
        if isinstance(getattr(module, attr, None), kind):
            return getattr(module, attr)  # type: ignore[no-any-return]
    found = [v for v in vars(module).values() if isinstance(v, kind)]
    if len(found) != 1:
        raise AgentFileError(
            f"{path}: expected one AgentServer (named {'/'.join(SERVER_NAMES)}) or a call to "
            f'cli.run_app(...) under `if __name__ == "__main__"`, found {len(found)} AgentServer'
        )
    return found[0]


def _on_path(folder: str) -> None:
    """The app's own sibling modules import, here and in every process started from here."""
    if folder not in sys.path:
        sys.path.insert(0, folder)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if folder not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([folder, *parts])
