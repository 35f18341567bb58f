"""Secrets never leave through the supervisor's own outputs.

The values of environment variables whose names say they are secret (``LIVEKIT_API_SECRET``,
``*_TOKEN``, ``*_PASSWORD``, ``*_API_KEY``...) are collected from the supervisor's environment and
from every child's ``env`` in the tree. Any of them found in what the supervisor writes out (event
details, hence the log and the event stream; worker report labels, hence metrics; stack dumps;
control replies built from those) is replaced by ``<redacted>``. A worker that logs its own
secret therefore does not leak it through the supervisor.

Values shorter than MIN_LENGTH are not collected: replacing "1" or "yes" everywhere would
mangle every output while protecting nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|API_?KEY|PRIVATE_?KEY|CREDENTIAL", re.IGNORECASE)
MIN_LENGTH = 6
MARK = "<redacted>"


class Redactor:
    def __init__(self) -> None:
        self._values: list[str] = []

    def learn(self, env: Mapping[str, str]) -> None:
        """Remember the secret values of ``env`` (by variable name)."""
        new = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= MIN_LENGTH}
        # Longest first, so a secret containing another is replaced whole.
        self._values = sorted(set(self._values) | new, key=len, reverse=True)

    def learn_all(self, envs: Iterable[Mapping[str, str]]) -> None:
        for env in envs:
            self.learn(env)

    def scrub(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, MARK)
        return text

    def scrub_optional(self, text: str | None) -> str | None:
        return self.scrub(text) if text and self._values else text


REDACTOR = Redactor()
REDACTOR.learn(os.environ)
