"""Exponential backoff for blocking pollers, written once.

The delay before retry ``n`` (1-based) is ``first * 2**(n - 1)``, capped at ``cap``: the
fleet's launch and action backoff, the AWS apply poller, the SSH bootstrap's connect and
host-key waits and the first token read all use this sequence. No jitter: these pollers
are few and each waits on its own resource, so they do not stampede together. (The
desktop client's request retries are a different policy, with full jitter, in
``gui.client.retry``.) Pure and dependency-free, so every package may import it.
"""

from __future__ import annotations

from collections.abc import Iterator


def doubling_delay(attempt: int, first: float, cap: float) -> float:
    """The wait before retry ``attempt`` (1, 2, 3...): ``first``, doubled each attempt,
    never above ``cap``."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    try:
        return min(cap, first * 2.0 ** (attempt - 1))
    except OverflowError:  # thousands of failures in a row: long past the cap
        return cap


def doubling_delays(first: float, cap: float) -> Iterator[float]:
    """The endless sequence ``doubling_delay(1, ...), doubling_delay(2, ...), ...``."""
    attempt = 0
    while True:
        attempt += 1
        yield doubling_delay(attempt, first, cap)
