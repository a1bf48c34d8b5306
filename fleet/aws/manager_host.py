"""The manager's own instance: the cloud-init user data that turns a fresh Debian 12
instance into the fleet manager.

The Auto Scaling group that holds the manager may replace it at any time (months after
``up``), so the user data carries no presigned URL and no secret: only where the bundle
(:func:`fleet.aws.ssh_bootstrap.build_manager_bundle`) and the fleet config lie in the fleet
bucket. The instance fetches both with its instance role, then runs
``scripts/manager_setup.sh`` from the bundle, which installs a venv, a system user and
the ``imagefleet-manager.service`` systemd unit (``python -m fleet run --config FILE``).

:data:`FETCH_SCRIPT` is the download step on its own (Python with boto3, which Debian
ships as ``python3-boto3``), so that a test can run exactly that step against an S3
stand-in (boto3 honours ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import re
import shlex

MANAGER_SETUP_LOG = "/var/log/imagefleet-manager-setup.log"
# What the set-up needs before the venv exists: venv to make one, boto3 to fetch the
# bundle with the instance role (the AWS CLI is not in Debian 12's cloud image).
APT_PACKAGES = ("python3-venv", "python3-boto3")

# argv: BUCKET REGION BUNDLE_KEY CONFIG_KEY; writes bundle.tar.gz and fleet.json here.
FETCH_SCRIPT = """\
import os, sys
import boto3
from botocore.config import Config

bucket, region, bundle_key, config_key = sys.argv[1:5]
s3 = boto3.client("s3", region_name=region,
                  config=Config(retries={"mode": "standard", "max_attempts": 10}))
s3.download_file(bucket, bundle_key, "bundle.tar.gz")
# The config names the fleet's resources: readable by root only from the first byte.
old = os.umask(0o077)
try:
    s3.download_file(bucket, config_key, "fleet.json")
finally:
    os.umask(old)
"""

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_KEY = re.compile(r"^[A-Za-z0-9!_.*'()/-]{1,1024}$")


def _check(value: str, pattern: re.Pattern[str], what: str, allowed: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"invalid {what} {value!r}: {allowed}")
    return value


def render_manager_user_data(*, bucket: str, region: str, bundle_key: str,
                             config_key: str) -> str:
    """A cloud-init user-data script (bash) that sets the manager up on Debian 12.

    Every value is checked (an S3 bucket name, a region like ``eu-west-1``, object keys
    of safe characters) and shell-quoted, so the script is what it looks like."""
    _check(bucket, _BUCKET, "bucket name", "3-63 lowercase letters, digits, dots, hyphens")
    _check(region, _REGION, "region", "a region name like eu-west-1")
    _check(bundle_key, _KEY, "bundle key", "an S3 key of letters, digits and !_.*'()/-")
    _check(config_key, _KEY, "config key", "an S3 key of letters, digits and !_.*'()/-")
    q = shlex.quote
    return "\n".join([
        "#!/bin/bash",
        "# ImageFleet manager set-up (cloud-init user data): fetch the bundle and the",
        "# fleet config from the fleet bucket with the instance role, then install the",
        "# manager as the systemd service imagefleet-manager.",
        "set -euo pipefail",
        f"exec > >(tee -a {MANAGER_SETUP_LOG}) 2>&1",
        "export DEBIAN_FRONTEND=noninteractive",
        "if ! python3 -c 'import boto3, ensurepip, venv' 2>/dev/null; then",
        "    apt-get update -q",
        f"    apt-get install -y -q {' '.join(APT_PACKAGES)}",
        "fi",
        "workdir=$(mktemp -d /tmp/imagefleet-manager.XXXXXX)",
        'cd "$workdir"',
        f"python3 - {q(bucket)} {q(region)} {q(bundle_key)} {q(config_key)} <<'FETCH'",
        FETCH_SCRIPT.rstrip("\n"),
        "FETCH",
        "tar -xzf bundle.tar.gz",
        f"bash scripts/manager_setup.sh --source . --config fleet.json --region {q(region)}",
        'cd / && rm -rf "$workdir"',
        "",
    ])
