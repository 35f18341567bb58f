"""Calling providers (STT, agent, TTS) the way a live call needs: bounded, retried, counted.

A provider signals trouble by raising :class:`ProviderError` with ``retryable`` set for the kinds
worth another try (a timeout, a dropped connection, a rate limit, a 5xx). :func:`call` retries
those with exponential backoff and jitter (defaults as LiveKit Agents': 3 retries, 1 s base,
factor 2), bounds every attempt with a timeout, and counts every error per provider and kind in
:class:`ProviderStats` so the leaf can report them. When the retries run out the caller decides
what the user hears; the pipeline speaks a fallback line instead of leaving a dead call.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio

from otp_agents.errors import OtpAgentsError

T = TypeVar("T")


class ProviderError(OtpAgentsError):
    """A provider failed. ``kind`` is a short word for metrics (timeout, connection, rate_limit,
    server, bad_request, ...); ``retryable`` says whether trying again may help."""

    def __init__(self, provider: str, kind: str, message: str, *, retryable: bool) -> None:
        super().__init__(f"{provider}: {kind}: {message}")
        self.provider = provider
        self.kind = kind
        self.retryable = retryable


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3  # further attempts after the first
    base_delay: float = 1.0  # seconds before the first retry
    factor: float = 2.0  # each later delay is this many times the one before
    max_delay: float = 10.0
    jitter: float = 0.25  # +- this fraction of each delay, so a fleet does not retry in step
    timeout: float | None = 10.0  # per attempt

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before retry number ``attempt`` (1-based)."""
        base = min(self.max_delay, self.base_delay * self.factor ** (attempt - 1))
        spread = base * self.jitter
        return max(0.0, base + (rng or random).uniform(-spread, spread))


@dataclass
class ProviderStats:
    """Errors per (provider, kind); ``on_error`` sees each one as it happens."""

    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    on_error: Callable[[ProviderError], None] | None = None

    def record(self, exc: ProviderError) -> None:
        self.errors[(exc.provider, exc.kind)] += 1
        if self.on_error is not None:
            self.on_error(exc)


async def call(
    provider: str,
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    stats: ProviderStats,
) -> T:
    """``await fn()`` with the policy's timeout and retries. Raises the last
    :class:`ProviderError` once retries are exhausted (or at once when it is not retryable).
    Any other exception is a bug in the provider and is counted as kind ``crash``, not retried."""
    attempt = 0
    while True:
        try:
            if policy.timeout is None:
                return await fn()
            try:
                with anyio.fail_after(policy.timeout):
                    return await fn()
            except TimeoutError:
                raise ProviderError(
                    provider, "timeout", f"no answer within {policy.timeout}s", retryable=True
                ) from None
        except ProviderError as exc:
            stats.record(exc)
            if not exc.retryable or attempt >= policy.retries:
                raise
        except Exception as exc:
            err = ProviderError(provider, "crash", f"{type(exc).__name__}: {exc}", retryable=False)
            stats.record(err)
            raise err from exc
        attempt += 1
        await anyio.sleep(policy.delay(attempt))
