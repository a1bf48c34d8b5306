"""Helpers for the tests of the manager in the cloud: the few AWS resources a running
``python -m fleet run`` touches (bucket, VPC, target group), made on moto in server mode
so that separate processes (the manager, its set-up script) can reach them, and TLS
clients that pin the manager's self-signed admin certificate."""

from __future__ import annotations

import json
import os
import signal
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3
from helpers_fleet import pid_alive
from waiting import wait_until

REGION = "eu-west-1"
ADMIN_TOKEN = "admin-token-for-tests-1"


def client(service: str, endpoint: str) -> Any:
    return boto3.client(service, region_name=REGION, endpoint_url=endpoint)


def moto_fleet_config(endpoint: str, name: str, **overrides: Any) -> dict[str, Any]:
    """Create the resources the manager reads on ``endpoint`` and return a fleet config
    (as JSON data) naming them. Size 0 unless overridden: nothing is launched."""
    ec2, elbv2, s3 = (client(s, endpoint) for s in ("ec2", "elbv2", "s3"))
    vpc = ec2.create_vpc(CidrBlock="10.7.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.7.1.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName=f"{name}-w", Description="workers",
                                      VpcId=vpc)["GroupId"]
    bucket = f"imgf-{name}-bucket"
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    target_group = elbv2.create_target_group(
        Name=f"imgf-{name}-tg", Protocol="HTTP", Port=8080, VpcId=vpc,
        TargetType="instance")["TargetGroups"][0]["TargetGroupArn"]
    config: dict[str, Any] = {
        "name": name, "region": REGION, "vpc_id": vpc, "subnets": [subnet],
        "bucket": bucket, "alb_security_group": group, "worker_security_group": group,
        "key_name": f"imgf-{name}", "key_file": "/nonexistent/key", "role_name": "r",
        "instance_profile_name": "p", "instance_profile_arn": "arn:aws:iam::1:p/p",
        "target_group_arn": target_group, "load_balancer_arn": "arn:lb",
        "load_balancer_dns": "lb.example", "listener_arn": "arn:l", "ami": "ami-12c6146b",
        "instance_types": ["t3.small"], "endpoint_url": endpoint,
        "desired": 0, "min": 0, "max": 1, "observe_interval_s": 0.5,
    }
    config.update(overrides)
    return config


def put_admin_token(endpoint: str, parameter: str, token: str = ADMIN_TOKEN) -> None:
    client("ssm", endpoint).put_parameter(Name=parameter, Value=token, Type="SecureString",
                                          Overwrite=True)


def pinned_context(pem: str) -> ssl.SSLContext:
    """Trusts exactly ``pem`` (and checks the name, 127.0.0.1 in it)."""
    return ssl.create_default_context(cadata=pem)


def get(url: str, *, token: str | None = None, context: ssl.SSLContext | None = None,
        timeout: float = 10) -> tuple[int, Any]:
    """(status, JSON body) of a GET; error statuses are answers, not exceptions."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def stop_pid_file(pid_file: Path, timeout: float = 30) -> None:
    """SIGTERM the process named in ``pid_file`` (its own session) and wait for it."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().strip())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    wait_until(lambda: not pid_alive(pid), timeout, what=f"process {pid} to exit")
