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
import io
import json
import stat
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from helpers_aws import moto_server
from moto import mock_aws
from waiting import wait_until

from fleet import bootstrap
from fleet.aws_config import FLEET_TAG_KEY, load_config
from fleet.providers.aws import AwsProvider
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
    ssm = boto3.client("ssm", region_name=REGION)
    acm = boto3.client("acm", region_name=REGION)
    parameters = [p["Name"] for p in ssm.describe_parameters()["Parameters"]
                  if {"Key": FLEET_TAG_KEY, "Value": NAME} in ssm.list_tags_for_resource(
                      ResourceType="Parameter", ResourceId=p["Name"])["TagList"]]
    certificates = [c["CertificateArn"] for c in acm.list_certificates(
        Includes={"keyTypes": ["EC_prime256v1", "RSA_2048"]})["CertificateSummaryList"]
        if {"Key": FLEET_TAG_KEY, "Value": NAME} in acm.list_tags_for_certificate(
            CertificateArn=c["CertificateArn"]).get("Tags", [])]
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
    assert len(first["security_groups"]) == 2
    assert len(first["key_pairs"]) == 1
    assert len(first["buckets"]) == 1
    assert len(first["elb"]) == 2  # the ALB and the target group
    assert len(first["listeners"]) == 2  # HTTPS :443, and :80 that only redirects
    assert len(first["roles"]) == 1
    assert len(first["instance_profiles"]) == 1
    assert len(first["parameters"]) == 1 and len(first["certificates"]) == 1
    # ALB :443 and :80, workers :8080 from the ALB, workers :22 from the admin
    assert len(first["ingress_rules"]) == 4

    config = load_config(tmp_path / "fleet.json")
    key_file = Path(config.key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "PRIVATE KEY" in key_file.read_text()
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
    assert f"token             {token}\n" in capsys.readouterr().out  # ... unless asked to
    info = json.loads(text)
    assert [i["id"] for i in info["instances"]] == [instance_id]
    assert info["instances"][0]["target"]["state"] != "unregistered"
    assert info["result_days"] == 3

    assert bootstrap_aws.main(["down", "--name", NAME, "--region", REGION,
                               "--config-out", str(tmp_path / "fleet.json")]) == 0
    after = _inventory()
    assert after == {key: [] for key in after}
    assert not key_file.exists() and not (tmp_path / "fleet.json").exists()
    assert not (tmp_path / "fleet.ca.pem").exists()

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


# ------------------------------------------------------------------ closed, encrypted

def _token() -> str:
    value = boto3.client("ssm", region_name=REGION).get_parameter(
        Name=f"/imagefleet/{NAME}/api-token", WithDecryption=True)["Parameter"]["Value"]
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
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read() if member.isfile() else b""
            assert token.encode() not in data, member.name
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
    assert inventory["parameters"] == []
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
    clients = bootstrap_aws.make_clients(REGION, None, moto_endpoint)
    names = bootstrap_aws.fleet_names(clients, NAME)
    bootstrap_aws.ensure_token(clients, names, rotate=False, overlap_s=0, report=print)
    old = bootstrap_aws.read_token_set(clients, names).current
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
    bootstrap_aws.ensure_token(clients, names, rotate=True, overlap_s=overlap, report=print)
    rotated_at = time.time()
    new = bootstrap_aws.read_token_set(clients, names).current
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
    and whether it is live; the lease is the real one `fleet run` takes (fleet.lease)."""
    from fleet.lease import S3Lease

    assert _up(tmp_path) == 0
    config = load_config(tmp_path / "fleet.json")
    clients = bootstrap_aws.make_clients(REGION, None, None)
    assert bootstrap_aws.status(clients, NAME)["manager"] is None
    assert "manager           - (none has run" in bootstrap_aws.format_status(
        bootstrap_aws.status(clients, NAME))
    lease = S3Lease(boto3.client("s3", region_name=REGION), config.bucket, config.lease_key,
                    "admin-laptop:4242:abcd", ttl_s=30.0)
    assert lease.refresh().held
    manager = bootstrap_aws.status(clients, NAME)["manager"]
    assert manager["holder"] == "admin-laptop:4242:abcd" and manager["active"]
    assert "admin-laptop:4242:abcd (active, lease until" in bootstrap_aws.format_status(
        bootstrap_aws.status(clients, NAME))
    # A lease nobody renewed any more reads as a manager that is not running.
    later = bootstrap_aws.manager_status(clients, config.bucket, now=time.time() + 60)
    assert later is not None and not later["active"]
