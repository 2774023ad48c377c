"""The retry policy as pure functions: what is safe to repeat, which answers are worth
another attempt, and how long to wait (constants in :mod:`dvp_client._constants`).

:func:`may_repeat` is the one place that decides whether a call may be sent again,
to the same replica or to another one.
"""

from __future__ import annotations

import email.utils
import random
import secrets
import time

import httpx

from . import _constants as C
from ._types import NotGiven, NotGivenOr

__all__ = ["backoff_delay", "may_repeat", "parse_retry_after", "resolve_seed", "should_retry"]

NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
"""Transport errors raised before a byte of the request left: no server saw it."""


def may_repeat(retryable: bool, error: httpx.TransportError | None = None) -> bool:
    """Whether another attempt of a call is safe, on the same replica or another.

    Safe when the call is ``retryable`` (an idempotent method, a POST the caller
    declared safe, a seeded rollout: the same effect twice is fine), or when the
    attempt failed while connecting (:data:`NOT_SENT_ERRORS`): no server saw it,
    so even an unseeded rollout or a weight update is not run twice. Any later
    failure (a reset, a read timeout, a 5xx) of a call that is not retryable may
    have been processed, and is raised instead.

    Args:
        retryable: The call's :attr:`RequestOptions.retryable`.
        error: The transport error of the failed attempt; None for a status answer.
    """
    return retryable or isinstance(error, NOT_SENT_ERRORS)


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asked us to wait, from ``retry-after-ms`` or ``Retry-After``.

    Returns:
        The delay clamped to ``[0, MAX_RETRY_AFTER]``, or None when absent or unparsable.
    """
    seconds: float | None = None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            seconds = float(ms) / 1000.0
        except ValueError:
            seconds = None
    if seconds is None and (value := headers.get("retry-after")) is not None:
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            seconds = when.timestamp() - time.time()
    if seconds is None or seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), C.MAX_RETRY_AFTER)


def backoff_delay(retries_taken: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter (formula in :mod:`dvp_client._constants`).

    Args:
        retries_taken: Retries already made (0 before the first retry).
        rng: Source of the jitter; the module's ``random`` by default.

    Returns:
        Seconds in ``(base * (1 - RETRY_JITTER), base]``, ``base <= MAX_RETRY_DELAY``.
    """
    base = min(C.INITIAL_RETRY_DELAY * 2.0 ** min(retries_taken, 32), C.MAX_RETRY_DELAY)
    u = (rng or random).random()
    return base * (1.0 - C.RETRY_JITTER * u)


def should_retry(response: httpx.Response) -> bool:
    """Whether a status is worth another attempt: 408, 409, 429 and every 5xx."""
    return response.status_code in C.RETRY_STATUS_CODES or response.status_code >= 500


def resolve_seed(seed: NotGivenOr[int | None]) -> tuple[int | None, bool]:
    """The seed to send and whether the rollout request is then safe to retry.

    NOT_GIVEN draws a fresh 63-bit seed once, before the first attempt, so every
    retry (on any replica: the same weights give the same samples) is the same
    seeded request and reproduces the same samples. An explicit None asks for an
    unseeded rollout; a retry would draw different samples, so such a request is
    not retried once it may have reached a server.
    """
    if isinstance(seed, NotGiven):
        return secrets.randbits(63), True
    return seed, seed is not None
