"""The LIVEKIT_* settings, checked without importing LiveKit: the voice leaves use this when they
start, and ``otp-agents run`` before anything starts when a tree lists them in ``require_env``.
A missing or inconsistent variable is an error naming it, not a connection that fails later."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from otp_agents.errors import OtpAgentsError

logger = logging.getLogger(__name__)

URL_VAR = "LIVEKIT_URL"
KEY_VAR = "LIVEKIT_API_KEY"
SECRET_VAR = "LIVEKIT_API_SECRET"


class RoomError(OtpAgentsError):
    """Anything that keeps the agent out of the room or away from its user."""


_MIN_SECRET_CHARS = 32  # what LiveKit asks of production secrets (a --dev server uses "secret")
_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}
LIVEKIT_VARS = (URL_VAR, KEY_VAR, SECRET_VAR)


class RoomConfigError(RoomError):
    """The LIVEKIT_* settings are missing or cannot be right; the message names the variable."""


# --- credentials ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveKitEnv:
    """Where the server is and how to sign tokens for it (``url`` is always ws:// or wss://)."""

    url: str
    api_key: str
    api_secret: str

    def __repr__(self) -> str:
        # The secret must never reach a log line through a repr.
        return f"LiveKitEnv(url={self.url!r}, api_key={self.api_key!r}, api_secret=<hidden>)"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> LiveKitEnv:
        """Read and check LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET.

        Checked here rather than at connect time because a typo found by the SDK surfaces as a
        connection failure several retries later, and does not say which variable is wrong.
        """
        values = {var: environ.get(var, "") for var in (URL_VAR, KEY_VAR, SECRET_VAR)}
        missing = [var for var, value in values.items() if not value.strip()]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise RoomConfigError(f"{' and '.join(missing)} {verb} not set (or empty)")
        for var in (KEY_VAR, SECRET_VAR):
            if re.search(r"\s", values[var]):
                raise RoomConfigError(
                    f"{var} contains whitespace (a stray space or newline from copy-paste?)"
                )
        secret = values[SECRET_VAR]
        if len(secret) < _MIN_SECRET_CHARS:
            # Only a warning: a `livekit-server --dev` signs with "devkey"/"secret".
            logger.warning(
                "%s is %d characters; LiveKit expects at least %d outside --dev mode",
                SECRET_VAR,
                len(secret),
                _MIN_SECRET_CHARS,
            )
        return cls(url=normalize_url(values[URL_VAR]), api_key=values[KEY_VAR], api_secret=secret)


def normalize_url(url: str) -> str:
    """Check a LiveKit server URL and turn http(s) into ws(s) (dashboards often show https)."""
    if re.search(r"\s", url):
        raise RoomConfigError(f"{URL_VAR} contains whitespace: {url!r}")
    if "://" not in url:
        raise RoomConfigError(
            f"{URL_VAR} has no scheme: {url!r} (use ws://host:port for a local server, "
            "wss://host for a remote one)"
        )
    parts = urlsplit(url)
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise RoomConfigError(
            f"{URL_VAR} must start with ws://, wss://, http:// or https://, got {parts.scheme}:// in {url!r}"
        )
    try:
        host, _port = parts.hostname, parts.port
    except ValueError as exc:  # a port that is not a number, or out of range
        raise RoomConfigError(f"{URL_VAR} has a bad port: {url!r} ({exc})") from None
    if not host:
        raise RoomConfigError(f"{URL_VAR} has no host: {url!r}")
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))
