"""When and how long to retry, and how many requests to keep in flight: the pure
decisions (:func:`next_retry`, :func:`backoff_delay`) and the adaptive window."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from gui.client.errors import (
    ClientError,
    ConnectError,
    ConnectionLost,
    InvalidRequest,
    RequestTimeout,
    ServerError,
)

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({502, 503, 504})
# Back-pressure without a Retry-After waits about this long; a Retry-After of 0 at least
# the minimum, so a shedding server is never answered with an immediate storm.
DEFAULT_OVERLOAD_WAIT = 1.0
MIN_OVERLOAD_WAIT = 0.1




@dataclass(frozen=True)
class Timeout:
    """Per-request time limits in seconds.

    ``connect``: to open the TCP connection. ``read``: the longest silence allowed
    while waiting for the answer or between chunks of it (processing time counts
    here, so keep it above the slowest operation). ``total``: optional cap on one
    whole attempt, including the upload; ``None`` means no cap (never aiohttp's
    300 s default).
    """

    connect: float = 5.0
    read: float = 120.0
    total: float | None = None

    def __post_init__(self) -> None:
        for name in ("connect", "read", "total"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InvalidRequest(f"Timeout.{name} must be > 0 seconds, got {value!r}")



@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a failed request.

    Two budgets, because a busy fleet is not a broken one:

    * **Faults** (connection errors, dropped connections, timeouts, 502/504, a 503
      without ``Retry-After``): ``attempts`` counts the first try (1 = no retries).
      Before the next try the client waits :func:`backoff_delay` seconds:
      ``min(backoff_max, backoff_base * 2 ** (n - 1))`` after the n-th fault,
      multiplied by a uniform random factor in [0, 1) when ``jitter`` ("full
      jitter", which spreads retries from many clients apart).
    * **Back-pressure** (503 ``overloaded``, any 503 with ``Retry-After``, 429): the
      server is working and asks for time. These answers do not use up ``attempts``;
      the request is retried for up to ``overload_patience`` seconds from its first
      such answer, each time after ``Retry-After`` seconds (1 s when absent) times a
      uniform factor in [1, 2) (so the clients a server turned away come back spread
      over a second, not all at once). ``overload_patience=0`` gives up at the first
      back-pressure answer.
    """

    attempts: int = 5
    backoff_base: float = 0.25
    backoff_max: float = 8.0
    jitter: bool = True
    overload_patience: float = 180.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise InvalidRequest(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.backoff_base < 0 or self.backoff_max < 0:
            raise InvalidRequest("RetryPolicy backoff values must be >= 0 seconds")
        if not self.overload_patience >= 0:
            raise InvalidRequest(
                "RetryPolicy.overload_patience must be >= 0 seconds, "
                f"got {self.overload_patience!r}"
            )


def backoff_delay(
    policy: RetryPolicy, failed_attempt: int, rand: float, retry_after: float | None = None
) -> float:
    """Seconds to wait after attempt number ``failed_attempt`` (1-based) failed.

    Pure: ``rand`` is a number in [0, 1) supplied by the caller. A server's
    ``Retry-After`` raises the delay to at least that much, still capped at
    ``backoff_max``.
    """
    ceiling = min(policy.backoff_max, policy.backoff_base * 2 ** (failed_attempt - 1))
    delay = ceiling * rand if policy.jitter else ceiling
    if retry_after is not None:
        delay = max(delay, min(retry_after, policy.backoff_max))
    return delay


def is_backpressure(exc: ClientError) -> bool:
    """Whether ``exc`` is a busy server asking for time rather than a fault.

    503 ``overloaded`` (an instance shedding load), any 503 that names a
    ``Retry-After``, and 429 Too Many Requests.
    """
    if not isinstance(exc, ServerError):
        return False
    if exc.status == 429:
        return True
    return exc.status == 503 and (exc.code == "overloaded" or exc.retry_after is not None)


def is_retryable(exc: ClientError) -> bool:
    """Whether a request that failed with ``exc`` may be sent again (budgets permitting)."""
    if isinstance(exc, ConnectError | ConnectionLost | RequestTimeout):
        return True
    if is_backpressure(exc):
        return True
    return isinstance(exc, ServerError) and exc.status in RETRYABLE_STATUSES


@dataclass(frozen=True)
class RetryStep:
    """What to do after a failed attempt (see :func:`next_retry`).

    ``retry``: send again after ``delay`` seconds. ``busy``: the failure was
    back-pressure (it used the overload budget, not an attempt). ``reason``: why the
    client gives up, when ``retry`` is false ("" for errors never retried).
    """

    retry: bool
    delay: float = 0.0
    busy: bool = False
    reason: str = ""


def next_retry(
    policy: RetryPolicy,
    exc: ClientError,
    *,
    faults: int,
    busy_for: float | None,
    rand: float,
) -> RetryStep:
    """Decide whether and when to retry after ``exc`` (pure).

    ``faults``: the fault failures of this request so far, this one included when it
    is a fault. ``busy_for``: seconds since this request's first back-pressure answer
    (0.0 for this one, None if there was none). ``rand``: uniform in [0, 1).
    """
    if is_backpressure(exc):
        assert isinstance(exc, ServerError)
        elapsed = busy_for or 0.0
        remaining = policy.overload_patience - elapsed
        if remaining <= 0:
            reason = (
                f"server still busy after {elapsed:.0f} s (overload_patience "
                f"{policy.overload_patience:g} s)"
                if policy.overload_patience > 0
                else "server busy and overload_patience is 0"
            )
            return RetryStep(False, busy=True, reason=reason)
        asked = DEFAULT_OVERLOAD_WAIT if exc.retry_after is None else exc.retry_after
        wait = max(MIN_OVERLOAD_WAIT, asked)
        return RetryStep(True, min(remaining, wait * (1.0 + rand)), busy=True)
    if not is_retryable(exc):
        return RetryStep(False)
    if faults >= policy.attempts:
        return RetryStep(False, reason=f"{faults} attempts failed")
    retry_after = exc.retry_after if isinstance(exc, ServerError) else None
    return RetryStep(True, backoff_delay(policy, faults, rand, retry_after))


@dataclass
class AdaptiveConcurrency:
    """How many requests a client keeps in flight: AIMD, like TCP's congestion window.

    Starts at ``ceiling`` (the configured concurrency), so a fleet with room is used
    fully from the first request. A back-pressure answer multiplies the window by
    ``decrease`` (floor 1); each success adds ``1 / window``, i.e. about one request
    per window of successes, back up to ``ceiling``.

    One overload episode cuts once: many requests sent together come back busy
    together, and cutting for each would collapse the window to 1. So each request
    carries the ``epoch`` it was sent in, and only an answer to a request sent since
    the last cut cuts again (TCP reacts once per window of losses for the same
    reason). Pure and clock-free: the caller reports outcomes.
    """

    ceiling: int
    decrease: float = 0.7
    window: float = 0.0
    epoch: int = 0

    def __post_init__(self) -> None:
        if self.ceiling < 1:
            raise InvalidRequest(f"concurrency must be >= 1, got {self.ceiling}")
        if not 0 < self.decrease < 1:
            raise InvalidRequest(f"decrease must be within (0, 1), got {self.decrease}")
        if not self.window:
            self.window = float(self.ceiling)

    @property
    def limit(self) -> int:
        """Requests allowed in flight now."""
        return max(1, min(self.ceiling, int(self.window)))

    def on_success(self) -> None:
        self.window = min(float(self.ceiling), self.window + 1.0 / self.window)

    def on_overload(self, sent_epoch: int) -> bool:
        """A request sent in ``sent_epoch`` was turned away; returns whether the window shrank."""
        if sent_epoch != self.epoch:
            return False
        self.window = max(1.0, self.window * self.decrease)
        self.epoch += 1
        return True






@dataclass
class _Slot:
    """One request's place in the window: the epoch it was sent in and how it ended."""

    epoch: int
    outcome: Literal["ok", "busy", "other"] = "other"


class _AdaptiveLimiter:
    """Admits requests while fewer than ``control.limit`` are in flight (FIFO waiters).

    The asyncio side of :class:`AdaptiveConcurrency`: each request holds a slot for
    one attempt (never while backing off) and reports how it ended, which moves the
    window. A smaller window only holds back new requests; those in flight finish.
    """

    def __init__(self, control: AdaptiveConcurrency) -> None:
        self.control = control
        self.inflight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[_Slot]:
        await self._acquire()
        slot = _Slot(self.control.epoch)
        try:
            yield slot
        finally:
            self.inflight -= 1
            if slot.outcome == "ok":
                self.control.on_success()
            elif slot.outcome == "busy" and self.control.on_overload(slot.epoch):
                log.info("server busy: keeping at most %d requests in flight", self.control.limit)
            self._wake()

    async def _acquire(self) -> None:
        if not self._waiters and self.inflight < self.control.limit:
            self.inflight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Granted just as we were cancelled: pass the slot on.
                self.inflight -= 1
                self._wake()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _wake(self) -> None:
        while self._waiters and self.inflight < self.control.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.inflight += 1  # taken on the waiter's behalf, so nobody overtakes it
                waiter.set_result(None)
