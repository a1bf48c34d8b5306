"""The blocking pollers' backoff: doubled from the first delay, capped."""

from __future__ import annotations

import itertools

import pytest

from fleet.model import Backoff
from server.backoff import doubling_delay, doubling_delays


@pytest.mark.parametrize(("attempt", "expected"), [
    (1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (5, 4.0), (6, 5.0), (7, 5.0), (100, 5.0),
])
def test_delay_table(attempt: int, expected: float) -> None:
    assert doubling_delay(attempt, 0.25, 5.0) == expected


def test_huge_attempt_is_the_cap_not_an_overflow() -> None:
    assert doubling_delay(10_000, 1.0, 60.0) == 60.0


def test_attempt_counts_from_one() -> None:
    with pytest.raises(ValueError):
        doubling_delay(0, 1.0, 10.0)


def test_sequence_matches_the_table() -> None:
    assert list(itertools.islice(doubling_delays(1.0, 10.0), 6)) == [
        1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_fleet_backoff_uses_the_same_sequence() -> None:
    backoff = Backoff()
    waits = []
    for _ in range(5):
        backoff = backoff.failed(100.0, 1.0, 6.0)
        waits.append(backoff.not_before - 100.0)
    assert waits == [1.0, 2.0, 4.0, 6.0, 6.0]
    assert backoff.hold(200.0, 1.0, 6.0).not_before == 206.0
