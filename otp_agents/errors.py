"""Every error otp-agents raises on purpose, and what it means at the edges.

Each error carries two codes, declared once here: ``reply_code``, what the control socket
answers when a request fails with it, and ``exit_code``, what the CLI exits with. Catch
:class:`OtpAgentsError` to catch them all. Imports nothing of the package.
"""

from __future__ import annotations

# Exit codes of ``otp-agents`` (the README's tables).
EXIT_OK = 0
EXIT_GAVE_UP = 1  # run: the root supervisor gave up; operator verbs: any other error
EXIT_ERROR = 1
EXIT_CONFIG = 2  # a bad tree file or setting
EXIT_START_FAILED = 3  # the tree could not start
EXIT_NOT_FOUND = 4  # no such child
EXIT_REFUSED = 5  # e.g. starting a running child
EXIT_NOT_RUNNING = 6  # no supervisor answers on that state dir

# Control reply codes, and the exit code an operator verb ends with for each.
REPLY_EXIT = {
    "ok": EXIT_OK,
    "not_found": EXIT_NOT_FOUND,
    "refused": EXIT_REFUSED,
    "denied": EXIT_ERROR,
    "error": EXIT_ERROR,
}


class OtpAgentsError(Exception):
    """Base class: ``str()`` is one line that names the place (file, key path, child path)."""

    reply_code = "error"
    exit_code = EXIT_ERROR


class ConfigError(OtpAgentsError, ValueError):
    """A tree specification was refused. ``str()`` is one line: ``file: key.path: problem``."""

    exit_code = EXIT_CONFIG

    def __init__(self, source: str, keypath: str, problem: str, line: int | None = None) -> None:
        self.source = source
        self.keypath = keypath
        self.problem = problem
        self.line = line
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {keypath}: {problem}" if keypath else f"{where}: {problem}")


class StartError(OtpAgentsError):
    """A child could not be started. ``str()`` says why, in one line."""

    reply_code = "refused"
    exit_code = EXIT_START_FAILED


class StartAborted(StartError):
    """A start was abandoned because the whole tree is stopping."""


class ChildNotFound(OtpAgentsError, LookupError):
    """No child at that path."""

    reply_code = "not_found"
    exit_code = EXIT_NOT_FOUND


class Refused(OtpAgentsError, RuntimeError):
    """A request that OTP would answer with ``{error, Reason}``."""

    reply_code = "refused"
    exit_code = EXIT_REFUSED


class NotRunning(OtpAgentsError):
    """No supervisor is running on that state dir."""

    exit_code = EXIT_NOT_RUNNING


class StateDirBusy(OtpAgentsError):
    """Another live supervisor holds the state dir."""

    exit_code = EXIT_START_FAILED


class PreflightError(OtpAgentsError):
    """The tree cannot run in this environment; the message names what is wrong and where.
    ``exit_code``: 2 for a bad setting, 3 for a resource that is not available."""

    def __init__(self, message: str, code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.exit_code = code
