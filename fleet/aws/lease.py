"""One manager per fleet: a lease held as an S3 object with conditional writes and a TTL.

The lease object (``s3://BUCKET/fleet/lease.json`` by default) holds
``{"holder", "expires_at", "acquired_at"}``. Every write is conditional, so two
managers racing for it cannot both win:

- no object yet → create it with ``If-None-Match: *`` (fails if someone else created it);
- our own lease, or an expired one → replace it with ``If-Match: <ETag we read>`` (fails if
  it changed since we read it);
- someone else's live lease → do nothing: this manager only observes.

The holder renews well before the TTL (every third of it). A holder that cannot renew
stops acting once its own copy of the expiry passes, before anyone else may take over.
Expiry is compared with each manager's wall clock, so clocks are assumed to agree to
well within the TTL (NTP does that; the default TTL is 30 s).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleet.aws.errors import error_code as _error_code

log = logging.getLogger(__name__)

# Stop acting this long before our lease expires, so a slow tick cannot overlap the next
# holder's first one.
SAFETY_MARGIN_S = 2.0


@dataclass(frozen=True)
class LeaseRecord:
    holder: str
    expires_at: float
    acquired_at: float

    def to_json(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires_at": self.expires_at,
                           "acquired_at": self.acquired_at}).encode()

    @classmethod
    def parse(cls, body: bytes) -> LeaseRecord | None:
        """``None`` for a body that is not a lease (treated as expired, then replaced)."""
        try:
            data = json.loads(body)
            return cls(str(data["holder"]), float(data["expires_at"]),
                       float(data.get("acquired_at", 0.0)))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class LeaseStatus:
    held: bool
    holder: str | None  # who holds it now (us or another manager), if anyone
    expires_at: float | None
    changed: bool  # held flipped on this call: worth an event




# 412: the condition failed (someone wrote first); 409: a concurrent conditional write.
_LOST_RACE = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


class S3Lease:
    """Acquire/renew with :meth:`refresh`; give up with :meth:`release`. Not thread-safe:
    one owner calls it (the manager loop, through a worker thread)."""

    def __init__(self, s3: Any, bucket: str, key: str, holder: str, *, ttl_s: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        if ttl_s <= 3 * SAFETY_MARGIN_S:
            raise ValueError(f"lease ttl_s must be > {3 * SAFETY_MARGIN_S:g} s, got {ttl_s}")
        self.s3 = s3
        self.bucket = bucket
        self.key = key
        self.holder = holder
        self.ttl_s = ttl_s
        self._clock = clock
        self._etag: str | None = None
        self._expires_at = 0.0
        self._held = False

    @property
    def held(self) -> bool:
        """True while this manager may act: it holds the lease and it is not about to
        expire (even if renewing failed)."""
        return self._held and self._clock() < self._expires_at - SAFETY_MARGIN_S

    def renew_due(self) -> bool:
        return not self.held or self._clock() >= self._expires_at - 2 * self.ttl_s / 3

    def refresh(self) -> LeaseStatus:
        """Take the lease if free or expired, renew it if ours; report who holds it."""
        was_held = self.held
        status = self._refresh()
        self._held = status.held
        return LeaseStatus(status.held, status.holder, status.expires_at,
                           changed=status.held != was_held)

    def _refresh(self) -> LeaseStatus:
        now = self._clock()
        current, etag = self._read()
        if current is not None and etag is not None:
            ours = current.holder == self.holder
            if not ours and current.expires_at > now:
                self._etag = None
                return LeaseStatus(False, current.holder, current.expires_at, False)
            acquired_at = current.acquired_at if ours else now
        else:
            acquired_at = now
        record = LeaseRecord(self.holder, now + self.ttl_s, acquired_at)
        condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        try:
            response = self.s3.put_object(Bucket=self.bucket, Key=self.key,
                                          Body=record.to_json(),
                                          ContentType="application/json", **condition)
        except Exception as exc:
            if _error_code(exc) in _LOST_RACE:
                log.info("lease %s: another manager wrote first", self.key)
                winner, _ = self._read()
                return LeaseStatus(False, winner.holder if winner else None,
                                   winner.expires_at if winner else None, False)
            raise
        self._etag = response["ETag"]
        self._expires_at = record.expires_at
        return LeaseStatus(True, self.holder, record.expires_at, False)

    def _read(self) -> tuple[LeaseRecord | None, str | None]:
        try:
            response = self.s3.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if _error_code(exc) in ("NoSuchKey", "404"):
                return None, None
            raise
        body = response["Body"].read()
        record = LeaseRecord.parse(body)
        if record is None:
            log.warning("lease %s holds no valid lease; it will be replaced", self.key)
            record = LeaseRecord("", 0.0, 0.0)
        return record, response["ETag"]

    def release(self) -> None:
        """Hand the lease over at once (expiry in the past), if it is still ours."""
        if not self._held or self._etag is None:
            return
        record = LeaseRecord(self.holder, 0.0, 0.0)
        try:
            self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=record.to_json(),
                               ContentType="application/json", IfMatch=self._etag)
        except Exception as exc:
            if _error_code(exc) not in _LOST_RACE:
                raise
        finally:
            self._held = False
            self._etag = None
