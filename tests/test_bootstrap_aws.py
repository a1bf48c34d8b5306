"""scripts/bootstrap_aws.py against moto's in-process AWS control plane.

moto stands in for EC2, ELBv2, S3, IAM, STS, SSM and ACM; the script's own code runs
unchanged (paginators, waiters, tag look-ups). The CLI is driven through ``main(argv)``.
The token rotation test runs a real ``python -m server`` that reads its token from moto
in server mode over HTTP, as a worker reads it from SSM through its instance role.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import io
import json
import stat
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from helpers_aws import moto_server
from moto import mock_aws
from waiting import wait_until

from fleet.aws import operator as aws_operator
from fleet.aws import ssh_bootstrap as bootstrap
from fleet.aws.config import FLEET_TAG_KEY, config_from_dict, load_config
from fleet.aws.provider import AwsProvider
from fleet.aws.stack import MANAGER_OF_TAG_KEY
from fleet.tls import certificate_info, self_signed_certificate
from scripts import bootstrap_aws
from server.tokens import TokenSet, TokenSourceError, open_token_gate, parse_token_document

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
        "up", "--name", NAME, "--region", REGION,
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
    ssm = boto3.client("ssm", region_name=REGION)
    acm = boto3.client("acm", region_name=REGION)
    parameters = [p["Name"] for p in ssm.describe_parameters()["Parameters"]
                  if {"Key": FLEET_TAG_KEY, "Value": NAME} in ssm.list_tags_for_resource(
                      ResourceType="Parameter", ResourceId=p["Name"])["TagList"]]
    certificates = [c["CertificateArn"] for c in acm.list_certificates(
        Includes={"keyTypes": ["EC_prime256v1", "RSA_2048"]})["CertificateSummaryList"]
        if {"Key": FLEET_TAG_KEY, "Value": NAME} in acm.list_tags_for_certificate(
            CertificateArn=c["CertificateArn"]).get("Tags", [])]
    autoscaling = boto3.client("autoscaling", region_name=REGION)
    groups = [g["AutoScalingGroupName"]
              for g in autoscaling.describe_auto_scaling_groups()["AutoScalingGroups"]
              if any(t["Key"] == FLEET_TAG_KEY and t["Value"] == NAME for t in g["Tags"])]
    templates = [t["LaunchTemplateId"] for t in ec2.describe_launch_templates(
        Filters=tag_filter)["LaunchTemplates"]]
    managers = [
        i["InstanceId"]
        for r in ec2.describe_instances(Filters=[
            {"Name": f"tag:{MANAGER_OF_TAG_KEY}", "Values": [NAME]}])["Reservations"]
        for i in r["Instances"] if i["State"]["Name"] != "terminated"]
    rules = [rule["RuleArn"] for arn in listeners
             for rule in elbv2.describe_rules(ListenerArn=arn)["Rules"]
             if not rule["IsDefault"]]
    roles = [r["RoleName"] for r in iam.list_roles()["Roles"]
             if any(t["Key"] == FLEET_TAG_KEY and t["Value"] == NAME
                    for t in iam.list_role_tags(RoleName=r["RoleName"])["Tags"])]
    return {
        "security_groups": sorted(g["GroupId"] for g in ec2.describe_security_groups(
            Filters=tag_filter)["SecurityGroups"]),
        "key_pairs": sorted(k["KeyPairId"] for k in ec2.describe_key_pairs(
            Filters=tag_filter)["KeyPairs"]),
        "instances": sorted(instances),
        "manager_instances": sorted(managers),
        "auto_scaling_groups": sorted(groups),
        "launch_templates": sorted(templates),
        "listener_rules": sorted(rules),
        "key_pairs_by_name": sorted(k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]
                                    if k["KeyName"].startswith(f"imgf-{NAME}")),
        "buckets": sorted(buckets),
        "elb": sorted(tagged_elb),
        "listeners": sorted(listeners),
        "parameters": sorted(parameters),
        "certificates": sorted(certificates),
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
    assert len(first["security_groups"]) == 3  # ALB, manager, workers
    # The manager makes the workers' key and imports its public half itself, so the
    # private key never leaves it: `up` makes none, and none lands on the admin's machine.
    assert first["key_pairs"] == [] and first["key_pairs_by_name"] == []
    assert not list(tmp_path.glob("*.pem")) or [p.name for p in tmp_path.glob("*.pem")] == [
        "fleet.ca.pem"]
    assert len(first["buckets"]) == 1
    assert len(first["elb"]) == 3  # the ALB, the workers' and the manager's target group
    assert len(first["listeners"]) == 2  # HTTPS :443, and :80 that only redirects
    # /fleet on :443 -> the manager; /metrics answered by the load balancer itself
    assert len(first["listener_rules"]) == 2
    assert len(first["roles"]) == 2 and len(first["instance_profiles"]) == 2
    assert len(first["parameters"]) == 2 and len(first["certificates"]) == 1
    assert len(first["auto_scaling_groups"]) == 1 and len(first["launch_templates"]) == 1
    assert len(first["manager_instances"]) == 1  # the group started the manager
    assert first["instances"] == []  # ... which is not one of the fleet's workers
    # ALB :443 and :80; workers :8080 from the ALB and the manager, :22 from the manager;
    # the manager's admin port from the ALB
    assert len(first["ingress_rules"]) == 5

    config = load_config(tmp_path / "fleet.json")
    assert stat.S_IMODE((tmp_path / "fleet.json").stat().st_mode) == 0o600
    assert config.region == REGION and len(config.subnets) >= 2
    assert config.bucket in first["buckets"]
    assert config.target_group_arn in first["elb"]

    out = capsys.readouterr().out
    assert "created  bucket" in out
    token = _token()
    assert token not in out and token not in (tmp_path / "fleet.json").read_text()
    assert config.api_url == f"https://{config.load_balancer_dns}"
    assert (tmp_path / "fleet.ca.pem").read_text() == config.ca_pem
    ssm = boto3.client("ssm", region_name=REGION)
    version = ssm.get_parameter(Name=config.token_parameter)["Parameter"]["Version"]
    assert _up(tmp_path) == 0
    second = _inventory()
    assert second == first
    out = capsys.readouterr().out
    assert "created" not in out and "allowed" not in out
    assert "updated" not in out and "deleted" not in out and "revoked" not in out
    assert "exists   auto scaling group imgf-demo-manager" in out
    assert "exists   bucket" in out and "exists   load balancer" in out
    assert load_config(tmp_path / "fleet.json") == config
    assert _token() == token  # a re-run keeps the token ...
    assert ssm.get_parameter(Name=config.token_parameter)["Parameter"]["Version"] == version

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
    # The app port from the ALB (and the manager, which polls /health); SSH only from
    # the manager's group: no address range reaches a worker directly.
    assert sorted(g["GroupId"] for g in by_port[8080]["UserIdGroupPairs"]) == sorted([
        config.alb_security_group, config.manager_security_group])
    assert [g["GroupId"] for g in by_port[22]["UserIdGroupPairs"]] == [
        config.manager_security_group]
    assert all(p["IpRanges"] == [] and p["Ipv6Ranges"] == [] for p in workers)
    assert sorted(by_port) == [22, 8080]
    manager_sg = ec2.describe_security_groups(GroupIds=[config.manager_security_group])[
        "SecurityGroups"][0]
    assert [(p["FromPort"], [g["GroupId"] for g in p["UserIdGroupPairs"]], p["IpRanges"])
            for p in manager_sg["IpPermissions"]] == [
        (config.admin_port, [config.alb_security_group], [])]  # admin API from the ALB only
    iam = boto3.client("iam", region_name=REGION)
    policy = iam.get_role_policy(RoleName=config.role_name, PolicyName="fleet-bucket")[
        "PolicyDocument"]
    resources = {r for s in policy["Statement"] for r in
                 ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])}
    assert resources == {f"arn:aws:s3:::{config.bucket}", f"arn:aws:s3:::{config.bucket}/*"}
    _check_https_listeners(elbv2, config)
    _check_token_parameter_and_policy(iam, ssm, config)

    # An instance the manager launched (tagged for the fleet) and a registered target.
    instance_id = ec2.run_instances(
        ImageId=config.ami, MinCount=1, MaxCount=1, InstanceType="t3.small",
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": FLEET_TAG_KEY, "Value": NAME}]}],
    )["Instances"][0]["InstanceId"]
    elbv2.register_targets(TargetGroupArn=config.target_group_arn,
                           Targets=[{"Id": instance_id, "Port": 8080}])
    s3.put_object(Bucket=config.bucket, Key="results/abc.png", Body=b"x")
    # The key pair the manager imports at its start (fleet.manager: manage_ssh_key).
    ec2.import_key_pair(KeyName=config.key_name, PublicKeyMaterial=_PUBLIC_KEY,
                        TagSpecifications=[{"ResourceType": "key-pair", "Tags": [
                            {"Key": FLEET_TAG_KEY, "Value": NAME}]}])

    tagging = boto3.client("resourcegroupstaggingapi", region_name=REGION)
    indexed = tagging.get_resources(TagFilters=[{"Key": FLEET_TAG_KEY, "Values": [NAME]}])[
        "ResourceTagMappingList"]
    assert len(indexed) >= 10  # it sees the fleet (so the check after down means something)
    capsys.readouterr()
    assert bootstrap_aws.main(["status", "--name", NAME, "--region", REGION]) == 0
    out = capsys.readouterr().out
    assert config.bucket in out and config.load_balancer_dns in out
    assert instance_id in out and "target " in out
    assert f"endpoint          https://{config.load_balancer_dns}" in out
    assert config.token_parameter in out and token not in out  # status never shows it ...
    assert bootstrap_aws.main(["status", "--name", NAME, "--region", REGION, "--json"]) == 0
    text = capsys.readouterr().out
    assert token not in text
    assert bootstrap_aws.main(["status", "--name", NAME, "--region", REGION,
                               "--show-token"]) == 0
    shown = capsys.readouterr().out
    assert f"token             {token}\n" in shown  # ... unless asked to, both, named
    assert f"admin token       {_token('admin-token')}\n" in shown
    assert "(API token:" in shown and "(admin token:" in shown
    info = json.loads(text)
    assert [i["id"] for i in info["instances"]] == [instance_id]  # workers only
    group = info["manager_group"]
    assert (group["min"], group["desired"], group["max"]) == (1, 1, 1)
    assert [i["id"] for i in group["instances"]] == first["manager_instances"]
    assert info["admin_endpoint"] == f"https://{config.load_balancer_dns}/fleet"
    assert "admin endpoint    https://" in out and "manager group     imgf-demo-manager" in out
    assert info["instances"][0]["target"]["state"] != "unregistered"
    assert info["result_days"] == 3

    assert bootstrap_aws.main(["down", "--name", NAME, "--region", REGION,
                               "--config-out", str(tmp_path / "fleet.json")]) == 0
    after = _inventory()
    assert after == {key: [] for key in after}
    # And as AWS's own tag index sees it, across services.
    # Terminated instances stay visible (with their tags) for a while, on AWS as on moto.
    tagging = boto3.client("resourcegroupstaggingapi", region_name=REGION)
    left = [m["ResourceARN"] for m in tagging.get_resources(
        TagFilters=[{"Key": FLEET_TAG_KEY, "Values": [NAME]}])["ResourceTagMappingList"]]
    terminated = {i["InstanceId"] for r in ec2.describe_instances()["Reservations"]
                  for i in r["Instances"] if i["State"]["Name"] == "terminated"}
    assert [arn for arn in left if arn.rsplit("/", 1)[-1] not in terminated] == []
    assert not (tmp_path / "fleet.json").exists()
    assert not (tmp_path / "fleet.ca.pem").exists()

    # down is idempotent too.
    assert bootstrap_aws.main(["down", "--name", NAME, "--region", REGION]) == 0


def test_admin_cidr_is_refused_with_the_reason(aws: None,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Workers accept SSH only from the manager's group now; an old --admin-cidr is not
    silently ignored (the admin would believe their address still reaches the workers)."""
    with pytest.raises(SystemExit) as exc:
        bootstrap_aws.main(["up", "--name", NAME, "--region", REGION,
                            "--admin-cidr", "203.0.113.7/32"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--admin-cidr is no longer used" in err and "manager's security group" in err
    assert _inventory()["security_groups"] == []


@pytest.mark.parametrize(("cidr", "message"), [
    ("10.0.0.1/8", "not a CIDR block"),
    ("banana", "not a CIDR block"),
    ("2001:db8::/32", "only IPv4"),
])
def test_up_refuses_bad_allowed_cidr(aws: None, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str],
                                     cidr: str, message: str) -> None:
    code = bootstrap_aws.main(["up", "--name", NAME, "--region", REGION,
                               "--allowed-cidr", cidr, "--ami", "ami-12c6146b",
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


# ------------------------------------------------------------------ closed, encrypted

_PUBLIC_KEY = (b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk3C2bUm1Ytq8Y9gM5zXc4sZ3yQ0L0f1Zp8q0r1s2t3"
               b" manager")


def _token(which: str = "api-token") -> str:
    value = boto3.client("ssm", region_name=REGION).get_parameter(
        Name=f"/imagefleet/{NAME}/{which}", WithDecryption=True)["Parameter"]["Value"]
    return parse_token_document(value, "test").current


def _listeners(elbv2: Any, config: Any) -> dict[int, dict[str, Any]]:
    return {lst["Port"]: lst for lst in elbv2.describe_listeners(
        LoadBalancerArn=config.load_balancer_arn)["Listeners"]}


def _check_https_listeners(elbv2: Any, config: Any) -> None:
    listeners = _listeners(elbv2, config)
    assert set(listeners) == {443, 80}
    https = listeners[443]
    assert https["Protocol"] == "HTTPS" and https["ListenerArn"] == config.listener_arn
    assert https["SslPolicy"] == "ELBSecurityPolicy-TLS13-1-2-2021-06"
    assert [c["CertificateArn"] for c in https["Certificates"]] == [config.certificate_arn]
    assert [(a["Type"], a["TargetGroupArn"]) for a in https["DefaultActions"]] == [
        ("forward", config.target_group_arn)]
    redirect = listeners[80]["DefaultActions"]
    assert [a["Type"] for a in redirect] == ["redirect"]  # port 80 forwards nothing
    assert redirect[0]["RedirectConfig"]["Protocol"] == "HTTPS"
    assert str(redirect[0]["RedirectConfig"]["Port"]) == "443"
    assert redirect[0]["RedirectConfig"]["StatusCode"] == "HTTP_301"
    # The pinned certificate names the load balancer, and it is what ACM serves.
    assert config.load_balancer_dns in certificate_info(config.ca_pem).names
    acm = boto3.client("acm", region_name=REGION)
    assert acm.get_certificate(CertificateArn=config.certificate_arn)["Certificate"].strip() \
        == config.ca_pem.strip()


def _check_token_parameter_and_policy(iam: Any, ssm: Any, config: Any) -> None:
    described = ssm.describe_parameters(ParameterFilters=[
        {"Key": "Name", "Values": [config.token_parameter]}])["Parameters"]
    assert [p["Type"] for p in described] == ["SecureString"]
    arn = ssm.get_parameter(Name=config.token_parameter)["Parameter"]["ARN"]
    statements = [
        statement
        for name in iam.list_role_policies(RoleName=config.role_name)["PolicyNames"]
        for statement in iam.get_role_policy(RoleName=config.role_name, PolicyName=name)[
            "PolicyDocument"]["Statement"]]
    ssm_statements = [s for s in statements
                      if any(a.startswith("ssm:") for a in _as_list(s["Action"]))]
    assert [(_as_list(s["Action"]), _as_list(s["Resource"])) for s in ssm_statements] == [
        (["ssm:GetParameter"], [arn])]  # that one parameter, read only
    kms = [s for s in statements if any(a.startswith("kms:") for a in _as_list(s["Action"]))]
    assert [_as_list(s["Action"]) for s in kms] == [["kms:Decrypt"]]
    assert kms[0]["Condition"] == {
        "StringEquals": {"kms:ViaService": f"ssm.{REGION}.amazonaws.com"}}
    assert not any(a in ("*", "ssm:*") for s in statements for a in _as_list(s["Action"]))


def _as_list(value: Any) -> list[Any]:
    return [value] if isinstance(value, str) else list(value)


def _bundle_files(bundle: bytes) -> Iterator[tuple[str, bytes]]:
    """Every file of a bundle, and every entry of the (compressed) wheel inside it."""
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read() if member.isfile() else b""
            yield member.name, data
            if member.name.endswith(".whl"):
                with zipfile.ZipFile(io.BytesIO(data)) as wheel:
                    for entry in wheel.namelist():
                        yield f"{member.name}/{entry}", wheel.read(entry)


def test_no_worker_user_data_or_bundle_holds_the_token(aws: None, tmp_path: Path) -> None:
    assert _up(tmp_path) == 0
    token = _token()
    config = dataclasses.replace(load_config(tmp_path / "fleet.json"), bootstrap="user-data")
    provider = AwsProvider(config, bootstrapper=lambda record, deadline: None)
    instance_id = asyncio.run(provider.launch("launch-1"))
    ec2 = boto3.client("ec2", region_name=REGION)
    encoded = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")[
        "UserData"]["Value"]
    user_data = base64.b64decode(encoded).decode()
    assert "--token-ssm-parameter /imagefleet/demo/api-token" in user_data  # the name ...
    assert token not in user_data  # ... never the value
    bundle = bootstrap.build_bundle()
    assert token.encode() not in bundle
    files = dict(_bundle_files(bundle))
    assert any(name.endswith(".whl/server/app.py") for name in files)  # looked inside
    for name, data in files.items():
        assert token.encode() not in data, name
    ssh_args = bootstrap.remote_setup_args(storage=config.storage_url, region=REGION,
                                           token_parameter=config.token_parameter)
    assert token not in " ".join(ssh_args)
    asyncio.run(provider.close())


def test_a_fleet_without_token_needs_public_and_a_cidr(
        aws: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _up(tmp_path, "--no-token") == 2
    assert "pass --public" in capsys.readouterr().err
    assert _up(tmp_path, "--no-token", "--public") == 2
    assert "--allowed-cidr explicitly" in capsys.readouterr().err
    assert _inventory()["security_groups"] == []  # refused before creating anything
    assert _up(tmp_path, "--no-token", "--public", "--allowed-cidr", "198.51.100.0/24") == 0
    inventory = _inventory()
    # No API token; the admin token guards the manager's admin API all the same.
    assert inventory["parameters"] == [f"/imagefleet/{NAME}/admin-token"]
    config = load_config(tmp_path / "fleet.json")
    assert config.token_parameter is None
    iam = boto3.client("iam", region_name=REGION)
    assert iam.list_role_policies(RoleName=config.role_name)["PolicyNames"] == ["fleet-bucket"]
    ec2 = boto3.client("ec2", region_name=REGION)
    alb = ec2.describe_security_groups(GroupIds=[config.alb_security_group])[
        "SecurityGroups"][0]["IpPermissions"]
    assert sorted((p["FromPort"], r["CidrIp"]) for p in alb for r in p["IpRanges"]) == [
        (80, "198.51.100.0/24"), (443, "198.51.100.0/24")]
    assert bootstrap_aws.main(["status", "--name", NAME, "--region", REGION,
                               "--show-token"]) == 2
    assert "no token parameter" in capsys.readouterr().err


def test_insecure_http_listens_and_opens_port_80_only(aws: None, tmp_path: Path) -> None:
    assert _up(tmp_path) == 0
    https_cert = load_config(tmp_path / "fleet.json").certificate_arn
    # Switching an HTTPS fleet to plain HTTP closes 443 and drops its certificate.
    assert _up(tmp_path, "--insecure-http") == 0
    config = load_config(tmp_path / "fleet.json")
    elbv2 = boto3.client("elbv2", region_name=REGION)
    listeners = _listeners(elbv2, config)
    assert list(listeners) == [80] and listeners[80]["Protocol"] == "HTTP"
    assert [a["Type"] for a in listeners[80]["DefaultActions"]] == ["forward"]
    assert config.api_url.startswith("http://") and config.ca_pem is None
    assert not (tmp_path / "fleet.ca.pem").exists()
    ec2 = boto3.client("ec2", region_name=REGION)
    alb = ec2.describe_security_groups(GroupIds=[config.alb_security_group])[
        "SecurityGroups"][0]["IpPermissions"]
    assert [p["FromPort"] for p in alb] == [80]
    assert https_cert not in _inventory()["certificates"]
    # And back: HTTPS again, port 80 redirecting.
    assert _up(tmp_path) == 0
    _check_https_listeners(elbv2, load_config(tmp_path / "fleet.json"))


def test_the_admins_own_certificate_is_used_and_never_deleted(aws: None,
                                                             tmp_path: Path) -> None:
    own = self_signed_certificate(("images.example.com",))
    acm = boto3.client("acm", region_name=REGION)
    arn = acm.import_certificate(Certificate=own.certificate_pem.encode(),
                                 PrivateKey=own.private_key_pem.encode())["CertificateArn"]
    assert _up(tmp_path, "--certificate-arn", arn) == 0
    config = load_config(tmp_path / "fleet.json")
    assert config.certificate_arn == arn and config.ca_pem is None
    assert config.api_url == "https://images.example.com"
    https = _listeners(boto3.client("elbv2", region_name=REGION), config)[443]
    assert [c["CertificateArn"] for c in https["Certificates"]] == [arn]
    assert _inventory()["certificates"] == []  # no self-signed one of ours
    assert bootstrap_aws.main(["down", "--name", NAME, "--region", REGION]) == 0
    assert acm.describe_certificate(CertificateArn=arn)["Certificate"]["Status"] == "ISSUED"


# ------------------------------------------------ rotation, a real server reading SSM

@pytest.fixture
def moto_endpoint(fake_aws: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto in server mode: other processes (the server) reach it over HTTP."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with moto_server() as url:
        yield url


def test_rotation_keeps_the_old_token_for_the_overlap_then_not(
        moto_endpoint: str, server_process: Any, tmp_path: Path) -> None:
    clients = aws_operator.make_clients(REGION, None, moto_endpoint)
    names = aws_operator.fleet_names(clients, NAME)
    aws_operator.ensure_token(clients, names, rotate=False, overlap_s=0, report=print)
    old = aws_operator.read_token_set(clients, names).current
    server = server_process(env={
        "IMAGEFLEET_TOKEN_SSM_PARAMETER": names.token_parameter,
        "IMAGEFLEET_TOKEN_REFRESH": "0.2",
        "AWS_ENDPOINT_URL_SSM": moto_endpoint, "AWS_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})

    def status(token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return server.get("/operations", headers=headers).status_code

    assert (status(old), status(None), status("not-the-token")) == (200, 401, 401)
    overlap = 3.0
    aws_operator.ensure_token(clients, names, rotate=True, overlap_s=overlap, report=print)
    rotated_at = time.time()
    new = aws_operator.read_token_set(clients, names).current
    assert new != old
    wait_until(lambda: status(new) == 200, 10, what="the server to pick up the new token")
    if time.time() < rotated_at + overlap - 0.5:  # a busy machine may take longer
        assert status(old) == 200  # both accepted during the overlap
    wait_until(lambda: status(old) == 401, overlap + 10, what="the old token to expire")
    assert time.time() >= rotated_at + overlap - 0.5  # not before its overlap ended
    assert status(new) == 200
    assert server.proc.poll() is None  # no restart


# ------------------------------------------------------------- token documents (pure)

def test_a_rotated_token_set_accepts_the_old_token_until_its_overlap_ends() -> None:
    first = TokenSet("first-token-aaaa")
    second = first.rotated("second-token-bb", now=1000.0, overlap_s=60.0)
    assert second.accepted(1000.0) == ("second-token-bb", "first-token-aaaa")
    assert second.accepts("first-token-aaaa", 1059.9)
    assert not second.accepts("first-token-aaaa", 1060.0)
    assert not second.accepts("", 1000.0) and not second.accepts("ünïcode", 1000.0)
    third = second.rotated("third-token-ccc", now=1061.0, overlap_s=60.0)
    assert [p.token for p in third.previous] == ["second-token-bb"]  # expired ones dropped
    assert parse_token_document(third.to_json(), "x") == third
    assert parse_token_document("new-token-1,old-token-2", "x").accepted(1e12) == (
        "new-token-1", "old-token-2")


@pytest.mark.parametrize(("value", "message"), [
    ("", "holds no token"),
    ("short", "at least 8"),
    ('{"version": 1, "current": "good-token-1", "previous": [{"token": "x"}]}', "numeric"),
    ('{"version": 2, "current": "good-token-1"}', "version 1"),
    ("{not json", "not a valid token document"),
])
def test_bad_token_documents_are_clear_errors(value: str, message: str) -> None:
    with pytest.raises(TokenSourceError, match=message):
        parse_token_document(value, "SSM parameter /p")


def test_a_token_file_must_be_private_and_is_re_read(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("file-token-one\n")
    path.chmod(0o644)
    with pytest.raises(TokenSourceError, match="readable by others"):
        open_token_gate(token=None, token_file=str(path), ssm_parameter=None, refresh_s=60)
    path.chmod(0o600)
    gate = open_token_gate(token=None, token_file=str(path), ssm_parameter=None,
                           refresh_s=3600)
    try:
        assert gate.accepts("Bearer file-token-one") and not gate.accepts("Bearer other-one")
        path.write_text("file-token-two,file-token-one\n")
        gate.source.refresh()  # what the refresh thread does every interval
        assert gate.accepts("Bearer file-token-two") and gate.current() == "file-token-two"
        path.write_text("")  # a broken re-read keeps what was read before
        gate.source.refresh()
        assert gate.accepts("Bearer file-token-two")
    finally:
        gate.close()


def test_status_shows_the_manager_from_the_lease(aws: None, tmp_path: Path) -> None:
    """`status` names the manager holding the fleet's lease (where it runs), since when,
    and whether it is live; the lease is the real one `fleet run` takes (fleet.aws.lease)."""
    from fleet.aws.lease import S3Lease

    assert _up(tmp_path) == 0
    config = load_config(tmp_path / "fleet.json")
    clients = aws_operator.make_clients(REGION, None, None)
    assert aws_operator.status(clients, NAME)["manager"] is None
    assert "manager           - (none has run" in aws_operator.format_status(
        aws_operator.status(clients, NAME))
    lease = S3Lease(boto3.client("s3", region_name=REGION), config.bucket, config.lease_key,
                    "admin-laptop:4242:abcd", ttl_s=30.0)
    assert lease.refresh().held
    manager = aws_operator.status(clients, NAME)["manager"]
    assert manager["holder"] == "admin-laptop:4242:abcd" and manager["active"]
    # The last cycle: when the lease was last renewed (expiry minus the manager's TTL).
    last = dt.datetime.fromisoformat(manager["last_cycle"]).timestamp()
    assert abs(last - time.time()) < 10
    assert "; last cycle " in aws_operator.format_status(aws_operator.status(clients, NAME))
    assert "admin-laptop:4242:abcd (active, lease until" in aws_operator.format_status(
        aws_operator.status(clients, NAME))
    # A lease nobody renewed any more reads as a manager that is not running.
    later = aws_operator.manager_status(clients, config.bucket, now=time.time() + 60)
    assert later is not None and not later["active"]


# ------------------------------------------------------------- the manager in the cloud

def _statements(iam: Any, role: str, policy: str) -> dict[str, dict[str, Any]]:
    document = iam.get_role_policy(RoleName=role, PolicyName=policy)["PolicyDocument"]
    return {s["Sid"]: s for s in document["Statement"]}


def test_the_manager_runs_in_a_group_of_one_with_its_own_role(aws: None,
                                                              tmp_path: Path) -> None:
    from fleet.aws.manager_host import render_manager_user_data
    from fleet.aws.ssh_bootstrap import build_manager_bundle

    assert _up(tmp_path) == 0
    config = load_config(tmp_path / "fleet.json")
    autoscaling = boto3.client("autoscaling", region_name=REGION)
    ec2 = boto3.client("ec2", region_name=REGION)
    iam = boto3.client("iam", region_name=REGION)
    elbv2 = boto3.client("elbv2", region_name=REGION)
    group = autoscaling.describe_auto_scaling_groups(
        AutoScalingGroupNames=[f"imgf-{NAME}-manager"])["AutoScalingGroups"][0]
    assert (group["MinSize"], group["DesiredCapacity"], group["MaxSize"]) == (1, 1, 1)
    assert group["HealthCheckType"] == "ELB"  # a manager that stops answering is replaced
    assert sorted(group["VPCZoneIdentifier"].split(",")) == sorted(config.subnets)
    assert len(group["Instances"]) == 1
    manager_tg = elbv2.describe_target_groups(Names=[f"imgf-{NAME}-mgr"])["TargetGroups"][0]
    assert group["TargetGroupARNs"] == [manager_tg["TargetGroupArn"]]

    template_id = group["LaunchTemplate"]["LaunchTemplateId"]
    data = ec2.describe_launch_template_versions(
        LaunchTemplateId=template_id, Versions=["$Latest"])["LaunchTemplateVersions"][0][
        "LaunchTemplateData"]
    profile = iam.get_instance_profile(InstanceProfileName=f"imgf-{NAME}-manager")[
        "InstanceProfile"]
    assert data["IamInstanceProfile"]["Arn"] == profile["Arn"]
    assert [r["RoleName"] for r in profile["Roles"]] == [f"imgf-{NAME}-manager"]
    assert data["SecurityGroupIds"] == [config.manager_security_group]
    assert data["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv2 only
    user_data = base64.b64decode(data["UserData"]).decode()
    assert user_data == render_manager_user_data(
        bucket=config.bucket, region=REGION, bundle_key="fleet/manager/bundle.tar.gz",
        config_key="fleet/manager/config.json")
    # The manager instance is not a fleet worker: the manager never counts or
    # terminates itself (its role may terminate only imagefleet:fleet-tagged ones).
    instance = ec2.describe_instances(InstanceIds=[group["Instances"][0]["InstanceId"]])[
        "Reservations"][0]["Instances"][0]
    instance_tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    assert instance_tags.get(MANAGER_OF_TAG_KEY) == NAME
    assert FLEET_TAG_KEY not in instance_tags

    # What the manager runs with: its bundle and its config, in the fleet bucket.
    s3 = boto3.client("s3", region_name=REGION)
    bundle = s3.get_object(Bucket=config.bucket, Key="fleet/manager/bundle.tar.gz")[
        "Body"].read()
    assert bundle == build_manager_bundle()
    text = s3.get_object(Bucket=config.bucket, Key="fleet/manager/config.json")[
        "Body"].read().decode()
    manager = config_from_dict(json.loads(text))
    assert (manager.admin_host, manager.admin_tls, manager.poll_worker_load,
            manager.manage_ssh_key) == ("0.0.0.0", True, True, True)
    # The manager in the cloud publishes its window; the admin's copy, if run on a
    # laptop for development, does not.
    assert (manager.cloudwatch_metrics, config.cloudwatch_metrics) == (True, False)
    assert manager.admin_token_parameter == f"/imagefleet/{NAME}/admin-token"
    assert manager.manager_security_group == config.manager_security_group
    assert manager.target_group_arn == config.target_group_arn
    assert manager.profile is None  # the instance role, never the admin's profile
    for secret in (_token(), _token("admin-token")):  # names, never values
        assert secret not in text and secret not in user_data
        assert secret.encode() not in bundle
        for name, data in _bundle_files(bundle):
            assert secret.encode() not in data, name


def test_admin_paths_reach_the_manager_over_tls(aws: None, tmp_path: Path) -> None:
    assert _up(tmp_path) == 0
    config = load_config(tmp_path / "fleet.json")
    elbv2 = boto3.client("elbv2", region_name=REGION)
    manager_tg = elbv2.describe_target_groups(Names=[f"imgf-{NAME}-mgr"])["TargetGroups"][0]
    assert (manager_tg["Protocol"], manager_tg["Port"]) == ("HTTPS", config.admin_port)
    assert (manager_tg["HealthCheckProtocol"], manager_tg["HealthCheckPath"]) == (
        "HTTPS", "/fleet/ping")
    rules = {tuple(sorted(r["Conditions"][0]["PathPatternConfig"]["Values"])): r
             for r in elbv2.describe_rules(ListenerArn=config.listener_arn)["Rules"]
             if not r["IsDefault"]}
    assert set(rules) == {("/fleet", "/fleet/*"), ("/metrics", "/metrics/*")}
    admin = rules[("/fleet", "/fleet/*")]
    assert [(a["Type"], a["TargetGroupArn"]) for a in admin["Actions"]] == [
        ("forward", manager_tg["TargetGroupArn"])]
    # Metrics never reach the internet: the load balancer answers /metrics itself.
    metrics = rules[("/metrics", "/metrics/*")]
    assert [a["Type"] for a in metrics["Actions"]] == ["fixed-response"]
    refused = metrics["Actions"][0]["FixedResponseConfig"]
    assert refused["StatusCode"] == "404"
    assert "private address" in json.loads(refused["MessageBody"])["message"]
    assert int(metrics["Priority"]) < int(admin["Priority"])
    listeners = _listeners(elbv2, config)
    assert listeners[443]["ListenerArn"] == config.listener_arn  # the rule is on HTTPS
    assert elbv2.describe_rules(ListenerArn=listeners[80]["ListenerArn"])["Rules"][0][
        "IsDefault"]  # :80 has its redirect only
    assert len(elbv2.describe_rules(ListenerArn=listeners[80]["ListenerArn"])["Rules"]) == 1


def test_the_manager_role_is_scoped_to_the_fleet(aws: None, tmp_path: Path) -> None:
    assert _up(tmp_path) == 0
    config = load_config(tmp_path / "fleet.json")
    iam = boto3.client("iam", region_name=REGION)
    role = f"imgf-{NAME}-manager"
    assert sorted(iam.list_role_policies(RoleName=role)["PolicyNames"]) == [
        "fleet-manager", "fleet-tokens"]
    assert iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"] == []
    s = _statements(iam, role, "fleet-manager")
    ec2 = f"arn:aws:ec2:{REGION}:123456789012"
    fleet_tag = {"StringEquals": {f"ec2:ResourceTag/{FLEET_TAG_KEY}": NAME}}
    # Launch only with the fleet tag on the request, and only with the fleet's parts.
    assert s["RunOnlyFleetTaggedInstances"]["Condition"] == {
        "StringEquals": {f"aws:RequestTag/{FLEET_TAG_KEY}": NAME}}
    assert _as_list(s["RunOnlyFleetTaggedInstances"]["Resource"]) == [
        f"{ec2}:instance/*", f"{ec2}:volume/*"]
    parts = _as_list(s["RunWithTheFleetsParts"]["Resource"])
    assert f"{ec2}:security-group/{config.worker_security_group}" in parts
    assert f"{ec2}:key-pair/{config.key_name}" in parts
    assert not any(p.endswith("security-group/*") for p in parts)
    # Terminate (and tag, read the console of) only instances tagged for this fleet.
    assert "ec2:TerminateInstances" in s["TagTerminateConsoleOwnInstances"]["Action"]
    assert s["TagTerminateConsoleOwnInstances"]["Condition"] == fleet_tag
    terminate = [x for x in s.values() if "ec2:TerminateInstances" in _as_list(x["Action"])]
    assert len(terminate) == 1
    assert s["TagAtLaunchOrImport"]["Condition"] == {"StringEquals": {
        "ec2:CreateAction": ["RunInstances", "ImportKeyPair"]}}
    assert s["OwnKeyPair"]["Resource"] == f"{ec2}:key-pair/{config.key_name}"
    assert s["PassOnlyTheWorkerRole"]["Resource"] == (
        f"arn:aws:iam::123456789012:role/imagefleet/{config.role_name}")
    assert s["PassOnlyTheWorkerRole"]["Condition"] == {
        "StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    assert s["OnlyTheWorkersTargetGroup"]["Resource"] == config.target_group_arn
    assert sorted(_as_list(s["LeaseAndOwnFiles"]["Resource"])) == sorted([
        f"arn:aws:s3:::{config.bucket}/{config.lease_key}",
        f"arn:aws:s3:::{config.bucket}/fleet/bundle.tar.gz",  # workers' (user-data)
        f"arn:aws:s3:::{config.bucket}/fleet/manager/*"])
    assert s["ListOnlyFleetPrefix"]["Condition"] == {
        "StringLike": {"s3:prefix": ["fleet/*"]}}
    # Metrics only into the fleet's namespace: PutMetricData has no resource-level
    # permissions, so "*" with the namespace condition is as narrow as it gets.
    assert s["PutOnlyFleetMetrics"] == {
        "Sid": "PutOnlyFleetMetrics", "Effect": "Allow",
        "Action": "cloudwatch:PutMetricData", "Resource": "*",
        "Condition": {"StringEquals": {"cloudwatch:namespace": "ImageFleet"}}}
    put = [x for x in s.values() if "cloudwatch:PutMetricData" in _as_list(x["Action"])]
    assert len(put) == 1
    # Only describe calls, and that one conditioned PutMetricData, take "*"; no action
    # is a wildcard.
    for statement in s.values():
        actions = _as_list(statement["Action"])
        assert not any(a.endswith("*") for a in actions), statement
        if statement["Resource"] == "*" and statement["Sid"] != "PutOnlyFleetMetrics":
            assert all(":Describe" in a for a in actions), statement
    tokens = _statements(iam, role, "fleet-tokens")
    assert sorted(_as_list(tokens["ReadFleetTokens"]["Resource"])) == sorted(
        f"arn:aws:ssm:{REGION}:123456789012:parameter/imagefleet/{NAME}/{which}"
        for which in ("api-token", "admin-token"))
    assert _as_list(tokens["ReadFleetTokens"]["Action"]) == ["ssm:GetParameter"]


def test_the_admin_token_rotates_alone(aws: None, tmp_path: Path) -> None:
    assert _up(tmp_path) == 0
    api, admin = _token(), _token("admin-token")
    assert api != admin
    assert _up(tmp_path, "--rotate-admin-token") == 0
    assert _token() == api and _token("admin-token") != admin
    value = boto3.client("ssm", region_name=REGION).get_parameter(
        Name=f"/imagefleet/{NAME}/admin-token", WithDecryption=True)["Parameter"]["Value"]
    assert parse_token_document(value, "test").accepts(admin, time.time())  # overlap


def test_up_refuses_a_strangers_manager_group(aws: None, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    ec2 = boto3.client("ec2", region_name=REGION)
    template = ec2.create_launch_template(LaunchTemplateName="someone-else", LaunchTemplateData={
        "ImageId": _ami(), "InstanceType": "t3.small"})["LaunchTemplate"]
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    boto3.client("autoscaling", region_name=REGION).create_auto_scaling_group(
        AutoScalingGroupName=f"imgf-{NAME}-manager", MinSize=0, MaxSize=0,
        LaunchTemplate={"LaunchTemplateId": template["LaunchTemplateId"]},
        VPCZoneIdentifier=subnet)
    assert _up(tmp_path) == 2
    assert "refusing to adopt" in capsys.readouterr().err
