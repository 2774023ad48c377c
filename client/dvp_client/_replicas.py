"""Replicas: which server gets the next attempt, and what each one has done.

A client over several replicas (``Client([url1, url2, ...])``) holds one
:class:`ReplicaPool`; a client over one URL holds a pool of one, which always
picks it (so a single URL behaves as before). The pool does no I/O: the core's
retry plan (:meth:`dvp_client._base.BaseClient._plan`) takes a :class:`Lease`
before every attempt and gives it back with the attempt's outcome.

Picking, in order of preference (each tier only when the one above is empty):

1. replicas that are *up* and not yet tried by this call;
2. replicas that are up but were tried by this call (a retry after a 429, ...);
3. the rest (cooling down, or being probed): the soonest end of cooldown first.

Within a tier: least outstanding attempts; ties go round-robin (the first tied
replica at or after the one after the last pick, cyclically).

A replica is *up* unless it failed and has not succeeded since. A failure
(transport error, or 502/503/504: :data:`~dvp_client._constants.REPLICA_DOWN_STATUSES`)
puts it on cooldown for ``REPLICA_COOLDOWN * 2**(strikes - 1)`` seconds, capped
at ``MAX_REPLICA_COOLDOWN``, or longer when its answer's Retry-After asks. After
the cooldown it is probed by one attempt at a time (it is up for a pick only
while nothing else is outstanding on it); a success makes it up again, a failed
probe adds a strike. Failures that arrive while it is already cooling down (the
other in-flight attempts of one crash) are counted but add no strike.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import httpx

from . import _constants as C

__all__ = ["Lease", "Outcome", "ReplicaPool", "ReplicaStats"]

Outcome = Literal["ok", "failed", "down", "dropped"]
"""How an attempt ended: ``ok`` (the replica answered), ``failed`` (a 5xx that says
nothing about the replica's health), ``down`` (a transport error or 502/503/504:
cooldown), ``dropped`` (abandoned by the caller: cancelled, or a stream left early)."""


@dataclass(frozen=True)
class ReplicaStats:
    """What one replica has done, as seen by this client.

    Attributes:
        url: The replica's base URL.
        outstanding: Attempts in flight on it now (streams count until closed).
        requests: Attempts sent to it (retries and failovers included).
        failures: Attempts that failed (transport errors and 5xx answers).
        last_error: The last failure, e.g. ``"ConnectError('...')"`` or ``"status 503"``.
        healthy: False from a failure (transport, 502/503/504) until its next success.
        cooldown_until: ``time.monotonic()`` time until which it is skipped; None
            when not cooling down.
        mean_latency_s: Mean seconds of its answered attempts; None before the first.
    """

    url: str
    outstanding: int
    requests: int
    failures: int
    last_error: str | None
    healthy: bool
    cooldown_until: float | None
    mean_latency_s: float | None


@dataclass(frozen=True)
class Lease:
    """One attempt's hold on a replica: given back once with :meth:`ReplicaPool.release`."""

    index: int
    url: httpx.URL
    started: float


@dataclass
class _Replica:
    url: httpx.URL
    outstanding: int = 0
    requests: int = 0
    failures: int = 0
    answered: int = 0
    latency_sum: float = 0.0
    strikes: int = 0
    cooldown_until: float = -math.inf
    last_error: str | None = None


class ReplicaPool:
    """The replicas of one client: picks one per attempt and keeps their stats.

    Thread-safe (a sync :class:`~dvp_client.Client` may be shared by threads).

    Args:
        urls: The replicas' base URLs (at least one).
        cooldown_s: First cooldown after a failure (seconds).
        max_cooldown_s: Cap of the doubling cooldown.
        clock: Monotonic seconds (a fake one in tests).

    Raises:
        ValueError: No URL, or a cooldown that is not positive.
    """

    def __init__(
        self,
        urls: Sequence[httpx.URL],
        *,
        cooldown_s: float = C.REPLICA_COOLDOWN,
        max_cooldown_s: float = C.MAX_REPLICA_COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError("base_url: at least one replica URL is needed, got none")
        if not 0 < cooldown_s <= max_cooldown_s:
            raise ValueError(
                f"cooldowns must satisfy 0 < cooldown_s <= max_cooldown_s, "
                f"got {cooldown_s} and {max_cooldown_s}"
            )
        self._replicas = [_Replica(u) for u in urls]
        self._cooldown_s = cooldown_s
        self._max_cooldown_s = max_cooldown_s
        self._clock = clock
        self._next = 0  # where the round-robin among tied replicas starts
        self._lock = threading.Lock()

    @property
    def urls(self) -> list[httpx.URL]:
        """The replicas' base URLs, in the order given."""
        return [r.url for r in self._replicas]

    def __len__(self) -> int:
        return len(self._replicas)

    def acquire(self, avoid: Collection[int] = (), pin: int | None = None) -> Lease:
        """Pick a replica for one attempt (see the module docstring) and count it.

        Args:
            avoid: Replicas this call already tried (picked only when nothing else is up).
            pin: Take this replica whatever its state (an update sent to each replica).

        Returns:
            The lease; give it back with :meth:`release`, exactly once.
        """
        with self._lock:
            now = self._clock()
            index = pin if pin is not None else self._pick(avoid, now)
            replica = self._replicas[index]
            replica.outstanding += 1
            replica.requests += 1
            return Lease(index, replica.url, now)

    def has_fresh(self, avoid: Collection[int]) -> bool:
        """Whether a replica that is up and not in ``avoid`` exists (a failover target)."""
        with self._lock:
            now = self._clock()
            return any(self._is_up(r, now) and i not in avoid for i, r in enumerate(self._replicas))

    def release(
        self,
        lease: Lease,
        outcome: Outcome,
        error: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Give a lease back with the attempt's outcome (see :data:`Outcome`).

        ``ok`` records the latency and makes the replica up; ``failed`` and ``down``
        count a failure; ``down`` also starts its cooldown (or, while it cools down
        already, only a ``retry_after`` beyond its end extends it).

        Args:
            lease: From :meth:`acquire`.
            outcome: How the attempt ended.
            error: What failed, kept as ``last_error``.
            retry_after: Seconds the replica asked for (a 503's Retry-After): its
                cooldown lasts at least this long.
        """
        with self._lock:
            now = self._clock()
            replica = self._replicas[lease.index]
            replica.outstanding -= 1
            if outcome == "ok":
                replica.answered += 1
                replica.latency_sum += now - lease.started
                replica.strikes = 0
                replica.cooldown_until = -math.inf
                return
            if outcome == "dropped":
                return
            replica.failures += 1
            replica.last_error = error
            if outcome != "down":
                return
            asked = now + retry_after if retry_after is not None else -math.inf
            if now >= replica.cooldown_until:
                replica.strikes += 1
                delay = self._cooldown_s * 2.0 ** min(replica.strikes - 1, 32)
                replica.cooldown_until = max(now + min(delay, self._max_cooldown_s), asked)
            else:
                replica.cooldown_until = max(replica.cooldown_until, asked)

    def stats(self) -> list[ReplicaStats]:
        """A snapshot of every replica's stats, in the order of the URLs."""
        with self._lock:
            now = self._clock()
            return [
                ReplicaStats(
                    url=str(r.url),
                    outstanding=r.outstanding,
                    requests=r.requests,
                    failures=r.failures,
                    last_error=r.last_error,
                    healthy=r.strikes == 0,
                    cooldown_until=r.cooldown_until if r.cooldown_until > now else None,
                    mean_latency_s=r.latency_sum / r.answered if r.answered else None,
                )
                for r in self._replicas
            ]

    # -- picking (under the lock) ------------------------------------------------------

    @staticmethod
    def _is_up(replica: _Replica, now: float) -> bool:
        """Up: no strike, or the cooldown is over and no probe is in flight."""
        if replica.strikes == 0:
            return True
        return now >= replica.cooldown_until and replica.outstanding == 0

    def _pick(self, avoid: Collection[int], now: float) -> int:
        n = len(self._replicas)
        up = [i for i in range(n) if self._is_up(self._replicas[i], now)]
        tier = [i for i in up if i not in avoid] or up
        if tier:
            least = min(self._replicas[i].outstanding for i in tier)
            tied = [i for i in tier if self._replicas[i].outstanding == least]
        else:  # every replica is cooling down or being probed: the soonest back
            soonest = min(r.cooldown_until for r in self._replicas)
            tied = [i for i in range(n) if self._replicas[i].cooldown_until == soonest]
        index = min(tied, key=lambda i: (i - self._next) % n)
        self._next = (index + 1) % n
        return index
