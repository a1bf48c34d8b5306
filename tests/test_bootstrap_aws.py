"""scripts/bootstrap_aws.py against moto's in-process AWS control plane.

moto stands in for EC2, ELBv2, S3, IAM and STS; the script's own code runs unchanged
(paginators, waiters, tag look-ups). The CLI is driven through ``main(argv)``.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from fleet.aws_config import FLEET_TAG_KEY, load_config
from scripts import bootstrap_aws

REGION = "eu-west-1"
NAME = "demo"


@pytest.fixture
def aws(fake_aws: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        yield


def _ami() -> str:
    return "ami-12c6146b"  # any id: moto does not check it


def _up(tmp_path: Path, *extra: str) -> int:
    return bootstrap_aws.main([
        "up", "--name", NAME, "--region", REGION, "--admin-cidr", "203.0.113.7/32",
        "--ami", _ami(), "--result-days", "3", "--config-out", str(tmp_path / "fleet.json"),
        *extra,
    ])


def _inventory() -> dict[str, Any]:
    """Everything tagged for the fleet, per service, by id — to compare runs."""
    ec2 = boto3.client("ec2", region_name=REGION)
    elbv2 = boto3.client("elbv2", region_name=REGION)
    s3 = boto3.client("s3", region_name=REGION)
    iam = boto3.client("iam", region_name=REGION)
    tag_filter = [{"Name": f"tag:{FLEET_TAG_KEY}", "Values": [NAME]}]
    instances = [
        i["InstanceId"]
        for r in ec2.describe_instances(Filters=tag_filter)["Reservations"]
        for i in r["Instances"] if i["State"]["Name"] != "terminated"
    ]
    buckets = []
    for bucket in s3.list_buckets()["Buckets"]:
        try:
            tags = s3.get_bucket_tagging(Bucket=bucket["Name"])["TagSet"]
        except s3.exceptions.ClientError:
            tags = []
        if {"Key": FLEET_TAG_KEY, "Value": NAME} in [
                {"Key": t["Key"], "Value": t["Value"]} for t in tags]:
            buckets.append(bucket["Name"])
    lbs = [lb["LoadBalancerArn"] for lb in elbv2.describe_load_balancers()["LoadBalancers"]]
    tgs = [tg["TargetGroupArn"] for tg in elbv2.describe_target_groups()["TargetGroups"]]
    tagged_elb = []
    if lbs + tgs:
        for desc in elbv2.describe_tags(ResourceArns=lbs + tgs)["TagDescriptions"]:
            if any(t["Key"] == FLEET_TAG_KEY and t["Value"] == NAME for t in desc["Tags"]):
                tagged_elb.append(desc["ResourceArn"])
    listeners = [lst["ListenerArn"] for lb in lbs
                 for lst in elbv2.describe_listeners(LoadBalancerArn=lb)["Listeners"]]
    roles = [r["RoleName"] for r in iam.list_roles()["Roles"]
             if any(t["Key"] == FLEET_TAG_KEY and t["Value"] == NAME
                    for t in iam.list_role_tags(RoleName=r["RoleName"])["Tags"])]
    return {
        "security_groups": sorted(g["GroupId"] for g in ec2.describe_security_groups(
            Filters=tag_filter)["SecurityGroups"]),
        "key_pairs": sorted(k["KeyPairId"] for k in ec2.describe_key_pairs(
            Filters=tag_filter)["KeyPairs"]),
        "instances": sorted(instances),
        "buckets": sorted(buckets),
        "elb": sorted(tagged_elb),
        "listeners": sorted(listeners),
        "roles": sorted(roles),
        "instance_profiles": sorted(p["Arn"] for p in iam.list_instance_profiles()[
            "InstanceProfiles"]),
        "ingress_rules": sorted(
            json.dumps(p, sort_keys=True, default=str)
            for g in ec2.describe_security_groups(Filters=tag_filter)["SecurityGroups"]
            for p in g["IpPermissions"]),
    }


def test_up_twice_creates_nothing_new_then_status_then_down_leaves_nothing(
        aws: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _up(tmp_path) == 0
    first = _inventory()
    assert len(first["security_groups"]) == 2
    assert len(first["key_pairs"]) == 1
    assert len(first["buckets"]) == 1
    assert len(first["elb"]) == 2  # the ALB and the target group
    assert len(first["listeners"]) == 1
    assert len(first["roles"]) == 1
    assert len(first["instance_profiles"]) == 1
    assert len(first["ingress_rules"]) == 3  # ALB :80, workers :8080 from ALB, workers :22

    config = load_config(tmp_path / "fleet.json")
    key_file = Path(config.key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "PRIVATE KEY" in key_file.read_text()
    assert stat.S_IMODE((tmp_path / "fleet.json").stat().st_mode) == 0o600
    assert config.region == REGION and len(config.subnets) >= 2
    assert config.bucket in first["buckets"]
    assert config.target_group_arn in first["elb"]

    assert "created  bucket" in capsys.readouterr().out
    assert _up(tmp_path) == 0
    second = _inventory()
    assert second == first
    out = capsys.readouterr().out
    assert "created" not in out and "allowed" not in out
    assert "exists   bucket" in out and "exists   load balancer" in out
    assert load_config(tmp_path / "fleet.json") == config

    # Settings checked against the issue.
    elbv2 = boto3.client("elbv2", region_name=REGION)
    tg = elbv2.describe_target_groups(TargetGroupArns=[config.target_group_arn])[
        "TargetGroups"][0]
    assert (tg["Port"], tg["HealthCheckPath"], tg["HealthCheckIntervalSeconds"],
            tg["HealthyThresholdCount"], tg["UnhealthyThresholdCount"]) == (
        8080, "/health", 5, 2, 2)
    attrs = {a["Key"]: a["Value"] for a in elbv2.describe_target_group_attributes(
        TargetGroupArn=config.target_group_arn)["Attributes"]}
    assert attrs["deregistration_delay.timeout_seconds"] == "30"
    lb = elbv2.describe_load_balancers(LoadBalancerArns=[config.load_balancer_arn])[
        "LoadBalancers"][0]
    assert lb["Scheme"] == "internet-facing"
    s3 = boto3.client("s3", region_name=REGION)
    block = s3.get_public_access_block(Bucket=config.bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values())
    enc = s3.get_bucket_encryption(Bucket=config.bucket)["ServerSideEncryptionConfiguration"]
    assert enc["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    rules = s3.get_bucket_lifecycle_configuration(Bucket=config.bucket)["Rules"]
    assert any(r.get("Expiration", {}).get("Days") == 3 for r in rules)
    ec2 = boto3.client("ec2", region_name=REGION)
    workers = ec2.describe_security_groups(GroupIds=[config.worker_security_group])[
        "SecurityGroups"][0]["IpPermissions"]
    by_port = {p["FromPort"]: p for p in workers}
    assert [g["GroupId"] for g in by_port[8080]["UserIdGroupPairs"]] == [
        config.alb_security_group]
    assert by_port[8080]["IpRanges"] == []
    assert [r["CidrIp"] for r in by_port[22]["IpRanges"]] == ["203.0.113.7/32"]
    iam = boto3.client("iam", region_name=REGION)
    policy = iam.get_role_policy(RoleName=config.role_name, PolicyName="fleet-bucket")[
        "PolicyDocument"]
    resources = {r for s in policy["Statement"] for r in
                 ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])}
    assert resources == {f"arn:aws:s3:::{config.bucket}", f"arn:aws:s3:::{config.bucket}/*"}

    # An instance the manager launched (tagged for the fleet) and a registered target.
    instance_id = ec2.run_instances(
        ImageId=config.ami, MinCount=1, MaxCount=1, InstanceType="t3.small",
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": FLEET_TAG_KEY, "Value": NAME}]}],
    )["Instances"][0]["InstanceId"]
    elbv2.register_targets(TargetGroupArn=config.target_group_arn,
                           Targets=[{"Id": instance_id, "Port": 8080}])
    s3.put_object(Bucket=config.bucket, Key="results/abc.png", Body=b"x")

    capsys.readouterr()
    assert bootstrap_aws.main(["status", "--name", NAME, "--region", REGION]) == 0
    out = capsys.readouterr().out
    assert config.bucket in out and config.load_balancer_dns in out
    assert instance_id in out and "target " in out
    assert bootstrap_aws.main(["status", "--name", NAME, "--region", REGION, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [i["id"] for i in info["instances"]] == [instance_id]
    assert info["instances"][0]["target"]["state"] != "unregistered"
    assert info["result_days"] == 3

    assert bootstrap_aws.main(["down", "--name", NAME, "--region", REGION,
                               "--config-out", str(tmp_path / "fleet.json")]) == 0
    after = _inventory()
    assert after == {key: [] for key in after}
    assert not key_file.exists() and not (tmp_path / "fleet.json").exists()

    # down is idempotent too.
    assert bootstrap_aws.main(["down", "--name", NAME, "--region", REGION]) == 0


def test_up_requires_admin_cidr(aws: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bootstrap_aws.main(["up", "--name", NAME, "--region", REGION])
    assert exc.value.code == 2
    assert "--admin-cidr" in capsys.readouterr().err


@pytest.mark.parametrize(("cidr", "message"), [
    ("0.0.0.0/0", "whole internet"),
    ("10.0.0.1/8", "not a CIDR block"),
    ("banana", "not a CIDR block"),
])
def test_up_refuses_bad_admin_cidr(aws: None, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   cidr: str, message: str) -> None:
    code = bootstrap_aws.main(["up", "--name", NAME, "--region", REGION, "--admin-cidr", cidr,
                               "--ami", "ami-12c6146b",
                               "--config-out", str(tmp_path / "f.json")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert _inventory()["security_groups"] == []


def test_bad_fleet_name_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bootstrap_aws.main(["status", "--name", "Bad_Name"])
    assert "lowercase letters" in capsys.readouterr().err


def test_up_refuses_untagged_resource_with_our_name(aws: None, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    iam = boto3.client("iam", region_name=REGION)
    iam.create_role(RoleName=f"imgf-{NAME}-worker", AssumeRolePolicyDocument="{}")
    assert _up(tmp_path) == 2
    assert "refusing to adopt" in capsys.readouterr().err
