"""The S3 lease against moto's S3, which implements conditional writes (If-None-Match: *
and If-Match: ETag on PutObject). The clock is a test clock; S3 is real code paths."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from helpers_aws import ClientProxy, client_error
from moto import mock_aws
from waiting import FakeClock

from fleet.aws.lease import SAFETY_MARGIN_S, S3Lease

BUCKET = "imgf-lease-test"
KEY = "fleet/lease.json"
TTL = 30.0


@pytest.fixture
def s3(fake_aws: None) -> Iterator[Any]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def _lease(s3: Any, holder: str, clock: FakeClock) -> S3Lease:
    return S3Lease(s3, BUCKET, KEY, holder, ttl_s=TTL, clock=clock)


def test_first_manager_takes_the_lease_second_only_observes(s3: Any) -> None:
    clock = FakeClock(1_000_000.0)
    a, b = _lease(s3, "a", clock), _lease(s3, "b", clock)
    first = a.refresh()
    assert first.held and first.changed and a.held
    second = b.refresh()
    assert not second.held and second.holder == "a" and not b.held
    # Renewing keeps it; the other still cannot take it before expiry.
    clock.now += TTL / 2
    assert a.refresh().held and not a.refresh().changed
    clock.now += TTL / 2 + 1  # past the first expiry, not the renewed one
    assert not b.refresh().held


def test_expired_lease_is_taken_over_and_old_holder_stops_acting(s3: Any) -> None:
    clock = FakeClock(1_000_000.0)
    a, b = _lease(s3, "a", clock), _lease(s3, "b", clock)
    assert a.refresh().held
    clock.now += TTL - SAFETY_MARGIN_S  # a cannot renew (say, it hung): it stops itself
    assert not a.held
    clock.now += SAFETY_MARGIN_S + 0.1
    taken = b.refresh()
    assert taken.held and taken.changed
    back = a.refresh()
    assert not back.held and back.holder == "b"


def test_release_hands_over_at_once(s3: Any) -> None:
    clock = FakeClock(1_000_000.0)
    a, b = _lease(s3, "a", clock), _lease(s3, "b", clock)
    assert a.refresh().held
    a.release()
    assert not a.held
    assert b.refresh().held


def test_conditional_write_decides_a_race(s3: Any) -> None:
    """Both read "no lease", then both write: If-None-Match lets exactly one win. The
    interleaving is forced by running A's whole refresh between B's read and B's write."""
    clock = FakeClock(1_000_000.0)
    a = _lease(s3, "a", clock)
    proxy = ClientProxy(s3)
    b = _lease(proxy, "b", clock)  # type: ignore[arg-type]

    def get_then_let_a_in(real: Any, **kwargs: Any) -> Any:
        try:
            return real(**kwargs)
        finally:
            proxy.overrides.pop("get_object")
            assert a.refresh().held

    proxy.overrides["get_object"] = get_then_let_a_in
    lost = b.refresh()
    assert not lost.held and lost.holder == "a"
    assert a.held and not b.held

    # Same with If-Match: B reads A's expired lease, A renews meanwhile, B's write fails.
    clock.now += TTL + 1
    proxy.overrides["get_object"] = get_then_let_a_in
    lost = b.refresh()
    assert not lost.held and lost.holder == "a"


def test_renew_failure_stops_acting_before_expiry(s3: Any) -> None:
    clock = FakeClock(1_000_000.0)
    proxy = ClientProxy(s3)
    a = _lease(proxy, "a", clock)  # type: ignore[arg-type]
    assert a.refresh().held
    clock.now += TTL / 2
    assert a.renew_due()

    def s3_down(real: Any, **kwargs: Any) -> Any:
        raise client_error("InternalError", "S3 is having a moment", "GetObject")

    proxy.overrides["get_object"] = s3_down
    with pytest.raises(Exception, match="InternalError"):
        a.refresh()
    assert a.held  # still inside its lease
    clock.now += TTL / 2 - SAFETY_MARGIN_S
    assert not a.held


def test_garbage_lease_object_is_replaced(s3: Any) -> None:
    s3.put_object(Bucket=BUCKET, Key=KEY, Body=b"not json")
    assert _lease(s3, "a", FakeClock(1_000_000.0)).refresh().held


def test_ttl_must_leave_room_for_the_margin(s3: Any) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        S3Lease(s3, BUCKET, KEY, "a", ttl_s=5)
