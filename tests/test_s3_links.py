"""Presigned links never promise more than the signing credentials can honour."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlparse

import boto3
from botocore.config import Config
from botocore.credentials import RefreshableCredentials
from moto import mock_aws

from server.storage import S3Storage

SIGV4 = Config(signature_version="s3v4")


def expires_param(url: str) -> int:
    return int(parse_qs(urlparse(url).query)["X-Amz-Expires"][0])


def test_static_credentials_give_the_requested_lifetime(fake_aws):
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1", config=SIGV4)
        client.create_bucket(Bucket="links")
        link = S3Storage("links", client=client).link("results/" + "a" * 64 + ".png",
                                                      3 * 24 * 3600, "")
        assert expires_param(link.url) == 3 * 24 * 3600


def test_temporary_credentials_cap_the_lifetime(fake_aws):
    # Instance-role credentials are what EC2 workers sign with; moto cannot issue
    # them, so the session is given refreshable credentials that expire in 2 hours.
    expiry = datetime.now(UTC) + timedelta(hours=2)

    def refresh():
        return {"access_key": "testing", "secret_key": "testing", "token": "t",
                "expiry_time": expiry.isoformat()}

    credentials = RefreshableCredentials.create_from_metadata(
        refresh(), refresh_using=refresh, method="test")
    session = boto3.Session(region_name="us-east-1")
    session._session._credentials = credentials
    client = session.client("s3", config=SIGV4)
    link = S3Storage("links", client=client).link("results/" + "b" * 64 + ".png",
                                                  7 * 24 * 3600, "")
    assert 2 * 3600 - 120 <= expires_param(link.url) <= 2 * 3600
    assert link.expires_at <= expiry.timestamp() + 1
    assert link.expires_at > time.time() + 3600
