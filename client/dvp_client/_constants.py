"""The client's policy as named constants: timeouts, retries, backoff, headers.

Backoff before retry ``i`` (0-based), when the server sent no usable Retry-After::

    base  = min(INITIAL_RETRY_DELAY * 2**i, MAX_RETRY_DELAY)       # 0.5, 1, 2, 4, 8, 8, ...
    delay = base * (1 - RETRY_JITTER * U),  U ~ Uniform[0, 1)      # jitter spreads a herd

A ``Retry-After`` header (seconds or an HTTP date; ``retry-after-ms`` too) is
honoured instead, clamped to ``[0, MAX_RETRY_AFTER]`` so a confused server
cannot park a trainer for an hour.
"""

from __future__ import annotations

from typing import Final

import httpx

DEFAULT_BASE_URL: Final = "http://127.0.0.1:8000"
BASE_URL_ENV: Final = "DVP_BASE_URL"
"""Environment variable read when no base URL is passed."""
API_KEY_ENV: Final = "DVP_API_KEY"
"""Environment variable read when no ``api_key`` is passed; unset means no auth header."""

# A rollout batch can decode for minutes: the read timeout is long, connecting is not.
DEFAULT_TIMEOUT: Final = httpx.Timeout(timeout=600.0, connect=5.0)
HTTPX_DEFAULT_TIMEOUT: Final = httpx.Timeout(5.0)
"""httpx's own default: an ``http_client`` with any other timeout keeps its own."""
DEFAULT_MAX_RETRIES: Final = 2
"""Retries after the first attempt (so at most 3 attempts)."""

INITIAL_RETRY_DELAY: Final = 0.5
"""Seconds before the first retry, before jitter."""
MAX_RETRY_DELAY: Final = 8.0
"""Cap of the exponential backoff, before jitter."""
RETRY_JITTER: Final = 0.25
"""Backoff is multiplied by a factor drawn uniformly from (1 - RETRY_JITTER, 1]."""
MAX_RETRY_AFTER: Final = 60.0
"""A server's Retry-After is honoured up to this many seconds."""

RETRY_STATUS_CODES: Final = frozenset({408, 409, 429})
"""Statuses worth another attempt; every status >= 500 is retried too."""
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
"""Methods retried by :meth:`Client.request`; a POST only when the caller says it is safe."""

REQUEST_ID_HEADER: Final = "X-Request-Id"

# Replicas (``Client([url1, url2, ...])``): a replica whose attempt failed at the
# transport level or answered 502/503/504 sits out REPLICA_COOLDOWN seconds, doubled at
# every further failure of the probe that follows, up to MAX_REPLICA_COOLDOWN; then one
# attempt at a time probes it until one succeeds.
REPLICA_COOLDOWN: Final = 1.0
"""Seconds a failed replica is skipped (first failure), before it is probed again."""
MAX_REPLICA_COOLDOWN: Final = 30.0
"""Cap of the doubling cooldown of a replica whose probes keep failing."""
REPLICA_DOWN_STATUSES: Final = frozenset({502, 503, 504})
"""Statuses that put a replica on cooldown (gateway errors, starting, draining)."""
