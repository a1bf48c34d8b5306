"""Create, report and remove the AWS side of an ImageFleet fleet.

    python -m scripts.bootstrap_aws up     --name NAME --admin-cidr 203.0.113.7/32 [options]
    python -m scripts.bootstrap_aws status --name NAME [--show-token] [--region R]
    python -m scripts.bootstrap_aws down   --name NAME [--region R] [--profile P]

Closed and encrypted by default: ``up`` generates the API token and keeps it in SSM
Parameter Store as a SecureString (workers read it through their instance role, which may
read that one parameter only; ``up --rotate-token`` replaces it, keeping the old one
accepted for ``--token-overlap`` seconds), and the load balancer serves HTTPS only
(TLS 1.3/1.2; port 80 redirects) with the admin's ACM certificate (``--certificate-arn``)
or a self-signed one for its own DNS name, whose PEM clients pin. Without a token
(``--no-token``) ``up`` insists on ``--public``; plain HTTP needs ``--insecure-http``.

``up`` is idempotent: every resource is looked up before it is created (EC2 objects by
the ``imagefleet:fleet=NAME`` tag, named resources by their derived name, then checked
for that tag so a stranger's resource is never adopted), and settings that can drift
(bucket protection, lifecycle, health check, ingress rules) are re-applied. Running it
twice creates nothing new. It writes the fleet config file that ``python -m fleet run
--config FILE`` reads.

``down`` removes everything tagged for the fleet in dependency order: instances (also
those the manager launched), listener, load balancer, target group, security groups,
key pair, IAM role and instance profile, the token parameter and the fleet's own
certificate, then the bucket with its contents.

Waiters are used here (a one-shot script may block); the reconcile loop never waits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import logging
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.aws_config import (
    APP_PORT,
    FLEET_TAG_KEY,
    ROLE_TAG_KEY,
    AwsFleetConfig,
    ConfigError,
    load_config,
    resource_prefix,
    save_config,
    validate_fleet_name,
    write_private_file,
)
from fleet.lease import LeaseRecord
from fleet.tls import certificate_info, needs_new_certificate, self_signed_certificate
from server.tokens import TokenSet, TokenSourceError, parse_token_document

log = logging.getLogger(__name__)

DEFAULT_INSTANCE_TYPES = ("t3.small", "t3a.small")
# Debian 12 ships Python 3.11, the version the server is developed and tested on.
DEFAULT_AMI_PARAMETER = "/aws/service/debian/release/12/latest/amd64"
DEFAULT_SSH_USER = "admin"
LIVE_INSTANCE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
HEALTH_CHECK = {
    "HealthCheckProtocol": "HTTP",
    "HealthCheckPort": "traffic-port",
    "HealthCheckPath": "/health",
    "HealthCheckIntervalSeconds": 5,
    "HealthCheckTimeoutSeconds": 3,
    "HealthyThresholdCount": 2,
    "UnhealthyThresholdCount": 2,
    "Matcher": {"HttpCode": "200"},
}
DEREGISTRATION_DELAY_S = 30
# Large images take a while; the ALB's default idle timeout (60 s) would cut them off.
ALB_IDLE_TIMEOUT_S = 180
# TLS 1.3 and 1.2 only, forward-secret AEAD ciphers (AWS's recommended policy).
TLS_POLICY = "ELBSecurityPolicy-TLS13-1-2-2021-06"
DEFAULT_TOKEN_OVERLAP_S = 3600.0
# ACM lists only RSA-2048 certificates unless asked for other key types.
_ACM_KEY_TYPES = ["RSA_2048", "RSA_3072", "RSA_4096", "EC_prime256v1", "EC_secp384r1"]

Report = Callable[[str], None]


class InfraError(RuntimeError):
    """Something about the account or the arguments prevents the operation."""


@dataclass(frozen=True)
class Clients:
    ec2: Any
    elbv2: Any
    s3: Any
    iam: Any
    sts: Any
    ssm: Any
    acm: Any
    region: str


def make_clients(region: str | None, profile: str | None, endpoint_url: str | None) -> Clients:
    import boto3
    from botocore.config import Config

    session = boto3.Session(profile_name=profile, region_name=region)
    region = session.region_name
    if not region:
        raise InfraError("no AWS region: pass --region or set AWS_REGION / a profile region")
    config = Config(
        retries={"mode": "standard", "max_attempts": 8},
        connect_timeout=10,
        read_timeout=60,
    )

    def client(service: str) -> Any:
        return session.client(service, region_name=region, endpoint_url=endpoint_url,
                              config=config)

    return Clients(
        ec2=client("ec2"), elbv2=client("elbv2"), s3=client("s3"), iam=client("iam"),
        sts=client("sts"), ssm=client("ssm"), acm=client("acm"), region=region,
    )


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _tags(name: str, role: str) -> list[dict[str, str]]:
    return [
        {"Key": FLEET_TAG_KEY, "Value": name},
        {"Key": ROLE_TAG_KEY, "Value": role},
        {"Key": "Name", "Value": f"{resource_prefix(name)}-{role}"},
    ]


def _tag_spec(resource_type: str, name: str, role: str) -> list[dict[str, Any]]:
    return [{"ResourceType": resource_type, "Tags": _tags(name, role)}]


def _fleet_filter(name: str, role: str | None = None) -> list[dict[str, Any]]:
    filters = [{"Name": f"tag:{FLEET_TAG_KEY}", "Values": [name]}]
    if role:
        filters.append({"Name": f"tag:{ROLE_TAG_KEY}", "Values": [role]})
    return filters


def _has_fleet_tag(tags: Iterable[dict[str, str]], name: str) -> bool:
    return any(t.get("Key") == FLEET_TAG_KEY and t.get("Value") == name for t in tags or ())


def _paginate(client: Any, operation: str, key: str, **kwargs: Any) -> Iterator[Any]:
    for page in client.get_paginator(operation).paginate(**kwargs):
        yield from page.get(key, [])


def _poll(what: str, attempt: Callable[[], bool], timeout: float, first_delay: float = 1.0,
          max_delay: float = 15.0) -> None:
    """Call ``attempt`` until it returns True, backing off, or raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = first_delay
    while not attempt():
        if time.monotonic() + delay > deadline:
            raise InfraError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, max_delay)


def validate_cidr(value: str, *, what: str, allow_world: bool) -> str:
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise InfraError(f"{what}: {value!r} is not a CIDR block like 203.0.113.7/32 "
                         f"({exc})") from exc
    if network.version != 4:
        raise InfraError(f"{what}: only IPv4 CIDR blocks are supported (got {value})")
    if network.prefixlen == 0 and not allow_world:
        raise InfraError(f"{what}: {value} would open SSH to the whole internet; give your "
                         "own address, e.g. 203.0.113.7/32")
    return str(network)


# ---------------------------------------------------------------------------- lookups

@dataclass(frozen=True)
class Names:
    fleet: str
    prefix: str
    account: str
    region: str

    @property
    def bucket(self) -> str:
        return f"{self.prefix}-{self.account}-{self.region}"

    @property
    def target_group(self) -> str:
        return f"{self.prefix}-tg"

    @property
    def load_balancer(self) -> str:
        return f"{self.prefix}-alb"

    @property
    def role(self) -> str:
        return f"{self.prefix}-worker"

    @property
    def key_pair(self) -> str:
        return self.prefix

    @property
    def token_parameter(self) -> str:
        return f"/imagefleet/{self.fleet}/api-token"

    @property
    def token_parameter_arn(self) -> str:
        return f"arn:aws:ssm:{self.region}:{self.account}:parameter{self.token_parameter}"


def fleet_names(clients: Clients, name: str) -> Names:
    account = clients.sts.get_caller_identity()["Account"]
    return Names(fleet=validate_fleet_name(name), prefix=resource_prefix(name),
                 account=account, region=clients.region)


def find_security_group(clients: Clients, name: str, role: str) -> str | None:
    groups = list(_paginate(clients.ec2, "describe_security_groups", "SecurityGroups",
                            Filters=_fleet_filter(name, role)))
    return groups[0]["GroupId"] if groups else None


def find_key_pair(clients: Clients, name: str) -> str | None:
    # DescribeKeyPairs has no paginator; a tag filter keeps the answer to our one key.
    pairs = clients.ec2.describe_key_pairs(Filters=_fleet_filter(name))["KeyPairs"]
    return pairs[0]["KeyName"] if pairs else None


def find_target_group(clients: Clients, names: Names) -> str | None:
    try:
        groups = clients.elbv2.describe_target_groups(Names=[names.target_group])["TargetGroups"]
    except Exception as exc:
        if _error_code(exc) == "TargetGroupNotFound":
            return None
        raise
    arn = groups[0]["TargetGroupArn"]
    _check_elb_tag(clients, arn, names)
    return arn


def find_load_balancer(clients: Clients, names: Names) -> dict[str, Any] | None:
    try:
        lbs = clients.elbv2.describe_load_balancers(Names=[names.load_balancer])["LoadBalancers"]
    except Exception as exc:
        if _error_code(exc) == "LoadBalancerNotFound":
            return None
        raise
    _check_elb_tag(clients, lbs[0]["LoadBalancerArn"], names)
    return lbs[0]


def _check_elb_tag(clients: Clients, arn: str, names: Names) -> None:
    descriptions = clients.elbv2.describe_tags(ResourceArns=[arn])["TagDescriptions"]
    tags = descriptions[0]["Tags"] if descriptions else []
    if not _has_fleet_tag(tags, names.fleet):
        raise InfraError(f"{arn} exists but is not tagged {FLEET_TAG_KEY}={names.fleet}; "
                         "refusing to adopt or delete it")


def bucket_exists(clients: Clients, names: Names) -> bool:
    try:
        clients.s3.head_bucket(Bucket=names.bucket)
    except Exception as exc:
        if _error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
            return False
        raise
    try:
        tags = clients.s3.get_bucket_tagging(Bucket=names.bucket)["TagSet"]
    except Exception as exc:
        if _error_code(exc) != "NoSuchTagSet":
            raise
        tags = []
    if not _has_fleet_tag(tags, names.fleet):
        raise InfraError(f"bucket {names.bucket} exists but is not tagged "
                         f"{FLEET_TAG_KEY}={names.fleet}; refusing to adopt or delete it")
    return True


def _iam_get(call: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    try:
        return call()
    except Exception as exc:
        if _error_code(exc) == "NoSuchEntity":
            return None
        raise


def find_token_parameter(clients: Clients, names: Names) -> dict[str, Any] | None:
    """The token parameter's metadata (never its value), checked for the fleet tag."""
    found = clients.ssm.describe_parameters(ParameterFilters=[
        {"Key": "Name", "Option": "Equals", "Values": [names.token_parameter]}])["Parameters"]
    if not found:
        return None
    tags = clients.ssm.list_tags_for_resource(
        ResourceType="Parameter", ResourceId=names.token_parameter)["TagList"]
    if not _has_fleet_tag(tags, names.fleet):
        raise InfraError(f"SSM parameter {names.token_parameter} exists but is not tagged "
                         f"{FLEET_TAG_KEY}={names.fleet}; refusing to adopt or delete it")
    return found[0]


def read_token_set(clients: Clients, names: Names) -> TokenSet:
    value = clients.ssm.get_parameter(Name=names.token_parameter,
                                      WithDecryption=True)["Parameter"]["Value"]
    try:
        return parse_token_document(value, f"SSM parameter {names.token_parameter}")
    except TokenSourceError as exc:
        raise InfraError(f"{exc}; run `up --rotate-token` to write a fresh one") from exc


def fleet_certificates(clients: Clients, names: Names) -> list[dict[str, Any]]:
    """ACM certificates tagged for the fleet (the self-signed ones ``up`` imported),
    newest first. A certificate the admin passed with --certificate-arn is not tagged
    and is never touched."""
    found = []
    for summary in _paginate(clients.acm, "list_certificates", "CertificateSummaryList",
                             Includes={"keyTypes": _ACM_KEY_TYPES}):
        arn = summary["CertificateArn"]
        tags = clients.acm.list_tags_for_certificate(CertificateArn=arn).get("Tags", [])
        if _has_fleet_tag(tags, names.fleet):
            found.append(summary)
    found.sort(key=lambda c: str(c.get("ImportedAt") or c.get("CreatedAt") or ""),
               reverse=True)
    return found


def fleet_instances(clients: Clients, name: str) -> list[dict[str, Any]]:
    filters = [*_fleet_filter(name),
               {"Name": "instance-state-name", "Values": list(LIVE_INSTANCE_STATES)}]
    return [instance
            for reservation in _paginate(clients.ec2, "describe_instances", "Reservations",
                                         Filters=filters)
            for instance in reservation["Instances"]]


# --------------------------------------------------------------------------------- up

@dataclass(frozen=True)
class UpOptions:
    name: str
    admin_cidr: str
    # Who may reach the load balancer; None: anyone (0.0.0.0/0), allowed with a token only.
    allowed_cidr: str | None = None
    token: bool = True
    public: bool = False
    rotate_token: bool = False
    token_overlap_s: float = DEFAULT_TOKEN_OVERLAP_S
    certificate_arn: str | None = None
    insecure_http: bool = False
    instance_types: tuple[str, ...] = DEFAULT_INSTANCE_TYPES
    ami: str | None = None
    result_days: int = 7
    config_out: Path = Path("imagefleet.json")
    key_out: Path | None = None
    vpc_id: str | None = None
    subnets: tuple[str, ...] = ()
    ssh_user: str = DEFAULT_SSH_USER
    endpoint_url: str | None = None
    profile: str | None = None


def resolve_network(clients: Clients, vpc_id: str | None,
                    subnets: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    if vpc_id is None:
        vpcs = clients.ec2.describe_vpcs(
            Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise InfraError("this region has no default VPC: pass --vpc-id and --subnets "
                             "(public subnets in at least two availability zones)")
        vpc_id = vpcs[0]["VpcId"]
    filters = [{"Name": "vpc-id", "Values": [vpc_id]}]
    if subnets:
        filters.append({"Name": "subnet-id", "Values": list(subnets)})
    found = list(_paginate(clients.ec2, "describe_subnets", "Subnets", Filters=filters))
    if subnets:
        missing = set(subnets) - {s["SubnetId"] for s in found}
        if missing:
            raise InfraError(f"subnets not found in {vpc_id}: {', '.join(sorted(missing))}")
    else:
        found = [s for s in found if s.get("DefaultForAz") or s.get("MapPublicIpOnLaunch")]
    zones = {s["AvailabilityZone"] for s in found}
    if len(zones) < 2:
        raise InfraError(f"an ALB needs subnets in at least two availability zones; {vpc_id} "
                         f"offers {sorted(zones) or 'none'}: pass --subnets")
    found.sort(key=lambda s: (s["AvailabilityZone"], s["SubnetId"]))
    return vpc_id, tuple(s["SubnetId"] for s in found)


def resolve_ami(clients: Clients, ami: str | None) -> str:
    if ami:
        return ami
    try:
        return clients.ssm.get_parameter(Name=DEFAULT_AMI_PARAMETER)["Parameter"]["Value"]
    except Exception as exc:
        raise InfraError(f"could not resolve the Debian 12 AMI from SSM parameter "
                         f"{DEFAULT_AMI_PARAMETER} ({exc}); pass --ami ami-...") from exc


def ensure_bucket(clients: Clients, names: Names, result_days: int, report: Report) -> str:
    bucket = names.bucket
    if bucket_exists(clients, names):
        report(f"exists   bucket {bucket}")
    else:
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if clients.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": clients.region}
        clients.s3.create_bucket(**kwargs)
        clients.s3.get_waiter("bucket_exists").wait(
            Bucket=bucket, WaiterConfig={"Delay": 2, "MaxAttempts": 30})
        clients.s3.put_bucket_tagging(
            Bucket=bucket, Tagging={"TagSet": _tags(names.fleet, "storage")})
        report(f"created  bucket {bucket}")
    # Re-applied on every run: cheap, idempotent, and repairs drift.
    clients.s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True,
        "BlockPublicPolicy": True, "RestrictPublicBuckets": True})
    clients.s3.put_bucket_ownership_controls(
        Bucket=bucket, OwnershipControls={"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]})
    clients.s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"},
                   "BucketKeyEnabled": True}]})
    clients.s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={
        "Rules": [
            {"ID": "expire-results", "Status": "Enabled", "Filter": {"Prefix": "results/"},
             "Expiration": {"Days": result_days}},
            {"ID": "abort-incomplete-uploads", "Status": "Enabled", "Filter": {"Prefix": ""},
             "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}},
        ]})
    return bucket


def _ensure_group(clients: Clients, name: str, role: str, *, vpc_id: str, description: str,
                  report: Report) -> str:
    group_id = find_security_group(clients, name, role)
    if group_id:
        report(f"exists   security group {group_id} ({role})")
        return group_id
    group_id = clients.ec2.create_security_group(
        GroupName=f"{resource_prefix(name)}-{role}", Description=description, VpcId=vpc_id,
        TagSpecifications=_tag_spec("security-group", name, role))["GroupId"]
    report(f"created  security group {group_id} ({role})")
    return group_id


def _permission_present(existing: list[dict[str, Any]], wanted: dict[str, Any]) -> bool:
    for perm in existing:
        if (perm.get("IpProtocol"), perm.get("FromPort"), perm.get("ToPort")) != (
                wanted["IpProtocol"], wanted["FromPort"], wanted["ToPort"]):
            continue
        if "IpRanges" in wanted and any(
                r.get("CidrIp") == wanted["IpRanges"][0]["CidrIp"]
                for r in perm.get("IpRanges", [])):
            return True
        if "UserIdGroupPairs" in wanted and any(
                p.get("GroupId") == wanted["UserIdGroupPairs"][0]["GroupId"]
                for p in perm.get("UserIdGroupPairs", [])):
            return True
    return False


def _ensure_ingress(clients: Clients, group_id: str, wanted: list[dict[str, Any]],
                    report: Report) -> None:
    group = clients.ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    missing = [w for w in wanted if not _permission_present(group.get("IpPermissions", []), w)]
    if not missing:
        return
    try:
        clients.ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=missing)
    except Exception as exc:
        if _error_code(exc) != "InvalidPermission.Duplicate":
            raise
    for perm in missing:
        source = (perm.get("IpRanges") or perm.get("UserIdGroupPairs"))[0]
        report(f"allowed  {group_id} tcp/{perm['FromPort']} from "
               f"{source.get('CidrIp') or source.get('GroupId')}")


def _revoke_other_ingress(clients: Clients, group_id: str, wanted: list[dict[str, Any]],
                          report: Report) -> None:
    """Remove what ``wanted`` does not name: a group opens only what is listened on, to
    whom it is meant for (a changed --allowed-cidr or --insecure-http closes the rest)."""
    group = clients.ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    extra = []
    for perm in group.get("IpPermissions", []):
        key = (perm.get("IpProtocol"), perm.get("FromPort"), perm.get("ToPort"))
        for source in perm.get("IpRanges", []):
            single = {"IpProtocol": key[0], "FromPort": key[1], "ToPort": key[2],
                      "IpRanges": [{"CidrIp": source["CidrIp"]}]}
            if not _permission_present(wanted, single):
                extra.append(single)
        for kind in ("Ipv6Ranges", "UserIdGroupPairs", "PrefixListIds"):
            if perm.get(kind):
                extra.append({"IpProtocol": key[0], "FromPort": key[1], "ToPort": key[2],
                              kind: perm[kind]})
    if extra:
        clients.ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=extra)
        for perm in extra:
            report(f"revoked  {group_id} tcp/{perm['FromPort']} (not listened on for it)")


def alb_ingress(allowed_cidr: str, https: bool) -> list[dict[str, Any]]:
    """The load balancer's rules: 443 and 80 (which only redirects), or 80 alone."""
    ports = [(443, "HTTPS"), (80, "HTTP, redirected to HTTPS")] if https else [
        (80, "plain HTTP (--insecure-http)")]
    return [{"IpProtocol": "tcp", "FromPort": port, "ToPort": port,
             "IpRanges": [{"CidrIp": allowed_cidr, "Description": f"clients: {what}"}]}
            for port, what in ports]


def ensure_security_groups(clients: Clients, name: str, *, vpc_id: str, allowed_cidr: str,
                           admin_cidr: str, https: bool, report: Report) -> tuple[str, str]:
    alb = _ensure_group(clients, name, "alb", vpc_id=vpc_id, report=report,
                        description="ImageFleet load balancer: HTTPS from clients")
    workers = _ensure_group(clients, name, "workers", vpc_id=vpc_id, report=report,
                            description="ImageFleet workers: app port from the ALB, SSH from admin")
    wanted = alb_ingress(allowed_cidr, https)
    _ensure_ingress(clients, alb, wanted, report)
    _revoke_other_ingress(clients, alb, wanted, report)
    _ensure_ingress(clients, workers, [
        {"IpProtocol": "tcp", "FromPort": APP_PORT, "ToPort": APP_PORT,
         "UserIdGroupPairs": [{"GroupId": alb, "Description": "from the ALB only"}]},
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
         "IpRanges": [{"CidrIp": admin_cidr, "Description": "admin SSH (bootstrap)"}]},
    ], report)
    return alb, workers


def ensure_key_pair(clients: Clients, names: Names, key_out: Path, report: Report) -> str:
    existing = find_key_pair(clients, names.fleet)
    if existing:
        if not key_out.exists():
            raise InfraError(
                f"key pair {existing} exists but its private key {key_out} is missing; AWS "
                f"cannot return it again. Restore the file, pass --key-out PATH, or run "
                f"`down` and `up` again")
        report(f"exists   key pair {existing} ({key_out})")
        return existing
    response = clients.ec2.create_key_pair(
        KeyName=names.key_pair, KeyType="ed25519", KeyFormat="pem",
        TagSpecifications=_tag_spec("key-pair", names.fleet, "ssh"))
    try:
        write_private_file(key_out, response["KeyMaterial"], mode=0o600)
    except BaseException:
        # A key pair whose private half was lost is useless and would block the next run.
        clients.ec2.delete_key_pair(KeyName=names.key_pair)
        raise
    report(f"created  key pair {names.key_pair} (private key {key_out}, mode 0600)")
    return names.key_pair


def _role_policy(bucket: str) -> str:
    return json.dumps({
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "ListFleetBucket", "Effect": "Allow",
             "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
             "Resource": f"arn:aws:s3:::{bucket}"},
            {"Sid": "ReadWriteFleetObjects", "Effect": "Allow",
             "Action": ["s3:GetObject", "s3:PutObject"],
             "Resource": f"arn:aws:s3:::{bucket}/*"},
        ],
    })


def token_policy(names: Names) -> str:
    """Read the fleet's token parameter, and nothing else in Parameter Store; decrypt it
    with KMS only through SSM (the AWS-managed aws/ssm key or any key SSM uses)."""
    return json.dumps({
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "ReadFleetToken", "Effect": "Allow", "Action": "ssm:GetParameter",
             "Resource": names.token_parameter_arn},
            {"Sid": "DecryptThroughSsmOnly", "Effect": "Allow", "Action": "kms:Decrypt",
             "Resource": f"arn:aws:kms:{names.region}:{names.account}:key/*",
             "Condition": {"StringEquals": {
                 "kms:ViaService": f"ssm.{names.region}.amazonaws.com"}}},
        ],
    })


TOKEN_POLICY_NAME = "fleet-token"


def ensure_iam(clients: Clients, names: Names, bucket: str, report: Report, *,
               token: bool = True) -> tuple[str, str]:
    iam_tags = [t for t in _tags(names.fleet, "worker") if t["Key"] != "Name"]
    role = _iam_get(lambda: clients.iam.get_role(RoleName=names.role))
    if role is None:
        clients.iam.create_role(
            RoleName=names.role, Path="/imagefleet/", Tags=iam_tags,
            Description=f"ImageFleet workers of fleet {names.fleet}: their bucket only",
            AssumeRolePolicyDocument=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                               "Principal": {"Service": "ec2.amazonaws.com"}}],
            }))
        report(f"created  IAM role {names.role}")
    else:
        if not _has_fleet_tag(role["Role"].get("Tags", []), names.fleet):
            raise InfraError(f"IAM role {names.role} exists but is not tagged "
                             f"{FLEET_TAG_KEY}={names.fleet}; refusing to adopt it")
        report(f"exists   IAM role {names.role}")
    clients.iam.put_role_policy(RoleName=names.role, PolicyName="fleet-bucket",
                                PolicyDocument=_role_policy(bucket))
    if token:
        clients.iam.put_role_policy(RoleName=names.role, PolicyName=TOKEN_POLICY_NAME,
                                    PolicyDocument=token_policy(names))
    elif TOKEN_POLICY_NAME in _paginate(clients.iam, "list_role_policies", "PolicyNames",
                                        RoleName=names.role):
        clients.iam.delete_role_policy(RoleName=names.role, PolicyName=TOKEN_POLICY_NAME)
        report(f"deleted  IAM policy {TOKEN_POLICY_NAME} (no token)")
    profile = _iam_get(lambda: clients.iam.get_instance_profile(InstanceProfileName=names.role))
    if profile is None:
        profile = {"InstanceProfile": clients.iam.create_instance_profile(
            InstanceProfileName=names.role, Path="/imagefleet/", Tags=iam_tags,
        )["InstanceProfile"]}
        clients.iam.get_waiter("instance_profile_exists").wait(
            InstanceProfileName=names.role, WaiterConfig={"Delay": 2, "MaxAttempts": 30})
        report(f"created  instance profile {names.role}")
    else:
        report(f"exists   instance profile {names.role}")
    if not any(r["RoleName"] == names.role for r in profile["InstanceProfile"].get("Roles", [])):
        clients.iam.add_role_to_instance_profile(InstanceProfileName=names.role,
                                                 RoleName=names.role)
    return names.role, profile["InstanceProfile"]["Arn"]


def ensure_target_group(clients: Clients, names: Names, vpc_id: str, report: Report) -> str:
    arn = find_target_group(clients, names)
    if arn is None:
        arn = clients.elbv2.create_target_group(
            Name=names.target_group, Protocol="HTTP", Port=APP_PORT, VpcId=vpc_id,
            TargetType="instance", Tags=_tags(names.fleet, "targets"), **HEALTH_CHECK,
        )["TargetGroups"][0]["TargetGroupArn"]
        report(f"created  target group {arn}")
    else:
        clients.elbv2.modify_target_group(TargetGroupArn=arn, **HEALTH_CHECK)
        report(f"exists   target group {arn}")
    clients.elbv2.modify_target_group_attributes(TargetGroupArn=arn, Attributes=[
        {"Key": "deregistration_delay.timeout_seconds", "Value": str(DEREGISTRATION_DELAY_S)},
    ])
    return arn


def ensure_load_balancer(clients: Clients, names: Names, subnets: tuple[str, ...],
                         alb_sg: str, report: Report) -> dict[str, Any]:
    lb = find_load_balancer(clients, names)
    if lb is None:
        # One subnet per availability zone: the ALB takes at most one per zone.
        per_zone: dict[str, str] = {}
        for subnet in clients.ec2.describe_subnets(SubnetIds=list(subnets))["Subnets"]:
            per_zone.setdefault(subnet["AvailabilityZone"], subnet["SubnetId"])
        lb = clients.elbv2.create_load_balancer(
            Name=names.load_balancer, Subnets=sorted(per_zone.values()),
            SecurityGroups=[alb_sg], Scheme="internet-facing", Type="application",
            IpAddressType="ipv4", Tags=_tags(names.fleet, "alb"),
        )["LoadBalancers"][0]
        report(f"created  load balancer {lb['LoadBalancerArn']}")
        clients.elbv2.get_waiter("load_balancer_available").wait(
            LoadBalancerArns=[lb["LoadBalancerArn"]],
            WaiterConfig={"Delay": 10, "MaxAttempts": 60})
    else:
        report(f"exists   load balancer {lb['LoadBalancerArn']}")
    clients.elbv2.modify_load_balancer_attributes(
        LoadBalancerArn=lb["LoadBalancerArn"],
        Attributes=[{"Key": "idle_timeout.timeout_seconds", "Value": str(ALB_IDLE_TIMEOUT_S)}])
    return lb


def ensure_token(clients: Clients, names: Names, *, rotate: bool, overlap_s: float,
                 report: Report, now: float | None = None) -> str:
    """The API token parameter: created with a fresh token, kept as it is, or rotated
    (the old token stays accepted for ``overlap_s`` seconds). Returns its name."""
    now = time.time() if now is None else now
    existing = find_token_parameter(clients, names)
    if existing is None:
        fresh = TokenSet(secrets.token_urlsafe(32))
        clients.ssm.put_parameter(
            Name=names.token_parameter, Type="SecureString", Value=fresh.to_json(),
            Description=f"ImageFleet API token of fleet {names.fleet}",
            Tags=[t for t in _tags(names.fleet, "token") if t["Key"] != "Name"])
        report(f"created  token parameter {names.token_parameter} (SecureString)")
    elif rotate:
        rotated = read_token_set(clients, names).rotated(secrets.token_urlsafe(32), now,
                                                         overlap_s)
        clients.ssm.put_parameter(Name=names.token_parameter, Type="SecureString",
                                  Value=rotated.to_json(), Overwrite=True)
        report(f"rotated  token parameter {names.token_parameter}: the previous token is "
               f"accepted for {overlap_s:.0f} s more (`status --show-token` prints the new one)")
    else:
        report(f"exists   token parameter {names.token_parameter}")
    return names.token_parameter


def remove_token(clients: Clients, names: Names, report: Report) -> None:
    if find_token_parameter(clients, names) is not None:
        clients.ssm.delete_parameter(Name=names.token_parameter)
        report(f"deleted  token parameter {names.token_parameter}")


@dataclass(frozen=True)
class Certificate:
    arn: str
    pem: str | None  # the self-signed one's PEM, which clients pin; None for the admin's own
    domain: str


def ensure_certificate(clients: Clients, names: Names, lb_dns: str,
                       certificate_arn: str | None, report: Report) -> Certificate:
    """The admin's certificate (checked to be issued), or the fleet's self-signed one for
    the load balancer's DNS name: reused while it covers the name and is valid for a
    while yet, else made anew (the old one is removed once no listener uses it)."""
    if certificate_arn:
        try:
            described = clients.acm.describe_certificate(
                CertificateArn=certificate_arn)["Certificate"]
        except Exception as exc:
            raise InfraError(f"--certificate-arn {certificate_arn}: {exc}") from exc
        if described.get("Status") != "ISSUED":
            raise InfraError(f"--certificate-arn {certificate_arn} is "
                             f"{described.get('Status')}, not ISSUED")
        domain = described.get("DomainName") or lb_dns
        report(f"using    certificate {certificate_arn} ({domain})")
        return Certificate(certificate_arn, None, lb_dns if domain.startswith("*") else domain)
    now = dt.datetime.now(dt.UTC)
    for summary in fleet_certificates(clients, names):
        pem = clients.acm.get_certificate(CertificateArn=summary["CertificateArn"])[
            "Certificate"]
        if not needs_new_certificate(pem, lb_dns, now):
            report(f"exists   certificate {summary['CertificateArn']} (self-signed, {lb_dns})")
            return Certificate(summary["CertificateArn"], pem, lb_dns)
    made = self_signed_certificate((lb_dns,))
    arn = clients.acm.import_certificate(
        Certificate=made.certificate_pem.encode(), PrivateKey=made.private_key_pem.encode(),
        Tags=[t for t in _tags(names.fleet, "certificate") if t["Key"] != "Name"],
    )["CertificateArn"]
    until = certificate_info(made.certificate_pem).not_after.date()
    report(f"created  certificate {arn} (self-signed for {lb_dns}, valid until {until})")
    return Certificate(arn, made.certificate_pem, lb_dns)


def remove_unused_certificates(clients: Clients, names: Names, keep: str | None,
                               report: Report, timeout: float = 120.0) -> None:
    """Delete the fleet's certificates other than ``keep`` (all of them for ``down``);
    ACM refuses while a listener still uses one, which lags a deleted listener a little."""
    for summary in fleet_certificates(clients, names):
        arn = summary["CertificateArn"]
        if arn == keep:
            continue
        _retry_in_use(f"certificate {arn}",
                      lambda a=arn: clients.acm.delete_certificate(CertificateArn=a),
                      ("ResourceInUseException",), timeout)
        report(f"deleted  certificate {arn}")


def _listener_actions_differ(listener: dict[str, Any], wanted: dict[str, Any]) -> bool:
    def normal(actions: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        out = []
        for a in actions:
            redirect = a.get("RedirectConfig") or {}
            out.append((a.get("Type"), a.get("TargetGroupArn"), redirect.get("Protocol"),
                        str(redirect.get("Port") or ""), redirect.get("StatusCode")))
        return out

    if normal(listener.get("DefaultActions", [])) != normal(wanted["DefaultActions"]):
        return True
    if listener.get("Protocol") != wanted["Protocol"]:
        return True
    if wanted["Protocol"] == "HTTPS":
        certs = [c.get("CertificateArn") for c in listener.get("Certificates", [])]
        return (listener.get("SslPolicy") != wanted["SslPolicy"]
                or certs != [wanted["Certificates"][0]["CertificateArn"]])
    return False


def wanted_listeners(tg_arn: str, certificate_arn: str | None) -> dict[int, dict[str, Any]]:
    """Port -> listener settings: HTTPS on 443 forwarding and 80 redirecting to it, or
    (no certificate: --insecure-http) plain HTTP on 80 forwarding."""
    forward = [{"Type": "forward", "TargetGroupArn": tg_arn}]
    if certificate_arn is None:
        return {80: {"Protocol": "HTTP", "Port": 80, "DefaultActions": forward}}
    return {
        443: {"Protocol": "HTTPS", "Port": 443, "DefaultActions": forward,
              "SslPolicy": TLS_POLICY, "Certificates": [{"CertificateArn": certificate_arn}]},
        80: {"Protocol": "HTTP", "Port": 80, "DefaultActions": [{
            "Type": "redirect", "RedirectConfig": {
                "Protocol": "HTTPS", "Port": "443", "Host": "#{host}", "Path": "/#{path}",
                "Query": "#{query}", "StatusCode": "HTTP_301"}}]},
    }


def ensure_listeners(clients: Clients, names: Names, lb_arn: str, tg_arn: str,
                     certificate_arn: str | None, report: Report) -> str:
    """Create, correct or delete listeners to match :func:`wanted_listeners`; returns the
    ARN of the one forwarding to the target group."""
    wanted = wanted_listeners(tg_arn, certificate_arn)
    existing = {lst["Port"]: lst for lst in _paginate(
        clients.elbv2, "describe_listeners", "Listeners", LoadBalancerArn=lb_arn)}
    arns: dict[int, str] = {}
    for port, settings in wanted.items():
        listener = existing.pop(port, None)
        what = f"listener :{port} {settings['Protocol']}"
        if listener is None:
            arns[port] = clients.elbv2.create_listener(
                LoadBalancerArn=lb_arn, Tags=_tags(names.fleet, "listener"), **settings,
            )["Listeners"][0]["ListenerArn"]
            report(f"created  {what} {arns[port]}")
            continue
        arns[port] = listener["ListenerArn"]
        if _listener_actions_differ(listener, settings):
            extra = {k: v for k, v in settings.items() if k not in ("Port",)}
            clients.elbv2.modify_listener(ListenerArn=arns[port], Port=port, **extra)
            report(f"updated  {what} {arns[port]}")
        else:
            report(f"exists   {what} {arns[port]}")
    for port, listener in existing.items():
        clients.elbv2.delete_listener(ListenerArn=listener["ListenerArn"])
        report(f"deleted  listener :{port} (not wanted)")
    return arns[443 if certificate_arn else 80]


def check_up_options(options: UpOptions) -> tuple[str, str]:
    """Refuse the combinations that would open the fleet by accident; returns the
    validated (admin CIDR, allowed CIDR)."""
    admin_cidr = validate_cidr(options.admin_cidr, what="--admin-cidr", allow_world=False)
    if not options.token:
        if not options.public:
            raise InfraError(
                "--no-token: the load balancer is internet-facing, so without a token anyone "
                "who finds its address can process images and store files at your expense; "
                "pass --public as well if that is what you want")
        if options.allowed_cidr is None:
            raise InfraError("--no-token --public: also pass --allowed-cidr explicitly "
                             "(0.0.0.0/0 is the default only with a token)")
        if options.rotate_token:
            raise InfraError("--rotate-token and --no-token contradict each other")
    if options.insecure_http and options.certificate_arn:
        raise InfraError("--insecure-http and --certificate-arn contradict each other")
    if not 0 <= options.token_overlap_s <= 30 * 24 * 3600:
        raise InfraError(f"--token-overlap must be 0..2592000 seconds "
                         f"(got {options.token_overlap_s:g})")
    allowed = validate_cidr(options.allowed_cidr or "0.0.0.0/0", what="--allowed-cidr",
                            allow_world=True)
    return admin_cidr, allowed


def up(clients: Clients, options: UpOptions, report: Report) -> AwsFleetConfig:
    admin_cidr, allowed_cidr = check_up_options(options)
    if not 1 <= options.result_days <= 3650:
        raise InfraError(f"--result-days must be 1..3650 (got {options.result_days})")
    names = fleet_names(clients, options.name)
    key_out = options.key_out or options.config_out.with_suffix(".pem")
    previous = _previous_settings(options.config_out, names.fleet)
    vpc_id, subnets = resolve_network(clients, options.vpc_id, options.subnets)
    ami = resolve_ami(clients, options.ami)
    https = not options.insecure_http

    bucket = ensure_bucket(clients, names, options.result_days, report)
    alb_sg, worker_sg = ensure_security_groups(clients, names.fleet, vpc_id=vpc_id,
                                               allowed_cidr=allowed_cidr,
                                               admin_cidr=admin_cidr, https=https,
                                               report=report)
    key_name = ensure_key_pair(clients, names, key_out, report)
    token_parameter = None
    if options.token:
        token_parameter = ensure_token(clients, names, rotate=options.rotate_token,
                                       overlap_s=options.token_overlap_s, report=report)
    else:
        remove_token(clients, names, report)
    role_name, profile_arn = ensure_iam(clients, names, bucket, report,
                                        token=options.token)
    tg_arn = ensure_target_group(clients, names, vpc_id, report)
    lb = ensure_load_balancer(clients, names, subnets, alb_sg, report)
    certificate = (ensure_certificate(clients, names, lb["DNSName"], options.certificate_arn,
                                      report) if https else None)
    listener_arn = ensure_listeners(clients, names, lb["LoadBalancerArn"], tg_arn,
                                    certificate.arn if certificate else None, report)
    # After the listeners moved: a replaced (or no longer used) self-signed certificate.
    remove_unused_certificates(clients, names, certificate.arn if certificate else None,
                               report)
    host = certificate.domain if certificate else lb["DNSName"]
    api_url = f"https://{host}" if https else f"http://{host}"
    if options.insecure_http:
        report("WARNING  --insecure-http: images, results and the token cross the network "
               "in clear text")

    config = AwsFleetConfig(
        name=names.fleet, region=clients.region, vpc_id=vpc_id, subnets=subnets,
        bucket=bucket, alb_security_group=alb_sg, worker_security_group=worker_sg,
        key_name=key_name, key_file=str(key_out.resolve()), role_name=role_name,
        instance_profile_name=role_name, instance_profile_arn=profile_arn,
        target_group_arn=tg_arn, load_balancer_arn=lb["LoadBalancerArn"],
        load_balancer_dns=lb["DNSName"], listener_arn=listener_arn, ami=ami,
        instance_types=tuple(options.instance_types), ssh_user=options.ssh_user,
        result_days=options.result_days, endpoint_url=options.endpoint_url,
        profile=options.profile, api_url=api_url, token_parameter=token_parameter,
        certificate_arn=certificate.arn if certificate else None,
        ca_pem=certificate.pem if certificate else None,
        insecure_http=options.insecure_http, **previous,
    )
    save_config(config, options.config_out)
    report(f"wrote    fleet config {options.config_out}")
    ca_path = ca_file_path(options.config_out)
    if config.ca_pem:
        # Public, but only the admin writes it: clients pin exactly this certificate.
        write_private_file(ca_path, config.ca_pem, mode=0o644)
        report(f"wrote    certificate {ca_path} (pass it as --ca-file / the app's CA file)")
    else:
        ca_path.unlink(missing_ok=True)
    report(f"endpoint {api_url}")
    if token_parameter:
        report(f"token    `python -m scripts.bootstrap_aws status --name {names.fleet} "
               "--show-token` prints it")
    return config


def ca_file_path(config_path: Path) -> Path:
    """Where ``up`` writes the self-signed certificate beside the fleet config."""
    return config_path.with_suffix(".ca.pem")


# Tunables a user may have edited in an existing config survive a re-run of `up`.
_KEPT_SETTINGS = ("desired", "min", "max", "bootstrap", "bootstrap_timeout_s",
                  "grace_period_s", "observe_interval_s", "lease_ttl_s", "admin_host",
                  "admin_port", "results_prefix")


def _previous_settings(path: Path, name: str) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        old = load_config(path)
    except ConfigError as exc:
        raise InfraError(f"{path} exists but is not a valid fleet config ({exc}); move it "
                         "away or pass --config-out") from exc
    if old.name != name:
        raise InfraError(f"{path} belongs to fleet {old.name!r}, not {name!r}; pass "
                         "--config-out")
    return {key: getattr(old, key) for key in _KEPT_SETTINGS}


# ----------------------------------------------------------------------------- status

def status(clients: Clients, name: str, *, show_token: bool = False) -> dict[str, Any]:
    """What exists for the fleet. The token's value only with ``show_token``."""
    names = fleet_names(clients, name)
    result: dict[str, Any] = {"name": names.fleet, "region": clients.region}
    result["bucket"] = names.bucket if bucket_exists(clients, names) else None
    if result["bucket"]:
        rules = clients.s3.get_bucket_lifecycle_configuration(Bucket=names.bucket)["Rules"]
        result["result_days"] = next(
            (r["Expiration"]["Days"] for r in rules if r.get("ID") == "expire-results"), None)
    result["security_groups"] = {role: find_security_group(clients, name, role)
                                 for role in ("alb", "workers")}
    result["key_pair"] = find_key_pair(clients, name)
    role = _iam_get(lambda: clients.iam.get_role(RoleName=names.role))
    result["iam_role"] = names.role if role else None
    profile = _iam_get(lambda: clients.iam.get_instance_profile(InstanceProfileName=names.role))
    result["instance_profile"] = profile["InstanceProfile"]["Arn"] if profile else None
    parameter = find_token_parameter(clients, names)
    result["token_parameter"] = ({"name": names.token_parameter, "type": parameter["Type"],
                                  "version": parameter.get("Version")} if parameter else None)
    if show_token:
        if parameter is None:
            raise InfraError(f"fleet {name} has no token parameter (made with --no-token?)")
        result["token"] = read_token_set(clients, names).current
    lb = find_load_balancer(clients, names)
    result["load_balancer"] = ({"arn": lb["LoadBalancerArn"], "dns": lb["DNSName"],
                                "state": lb["State"]["Code"]} if lb else None)
    result["listeners"] = [] if not lb else [
        {"port": lst["Port"], "protocol": lst["Protocol"],
         "action": lst["DefaultActions"][0]["Type"] if lst.get("DefaultActions") else "-",
         "certificates": [c["CertificateArn"] for c in lst.get("Certificates", [])],
         "ssl_policy": lst.get("SslPolicy")}
        for lst in _paginate(clients.elbv2, "describe_listeners", "Listeners",
                             LoadBalancerArn=lb["LoadBalancerArn"])]
    result["certificates"] = [
        {"arn": c["CertificateArn"], "domain": c.get("DomainName"),
         "not_after": c["NotAfter"].isoformat() if c.get("NotAfter") else None}
        for c in fleet_certificates(clients, names)]
    https = any(lst["protocol"] == "HTTPS" for lst in result["listeners"])
    result["endpoint"] = (f"{'https' if https else 'http'}://{lb['DNSName']}" if lb else None)
    tg_arn = find_target_group(clients, names)
    result["target_group"] = tg_arn
    health: dict[str, dict[str, str]] = {}
    if tg_arn:
        for desc in clients.elbv2.describe_target_health(
                TargetGroupArn=tg_arn)["TargetHealthDescriptions"]:
            state = desc["TargetHealth"]
            health[desc["Target"]["Id"]] = {"state": state.get("State", "unknown"),
                                            "reason": state.get("Reason", "")}
    result["instances"] = [
        {"id": i["InstanceId"], "state": i["State"]["Name"], "type": i["InstanceType"],
         "public_ip": i.get("PublicIpAddress"), "private_ip": i.get("PrivateIpAddress"),
         "launched_at": i["LaunchTime"].isoformat(),
         "target": health.pop(i["InstanceId"], {"state": "unregistered", "reason": ""})}
        for i in fleet_instances(clients, name)]
    # Targets still registered but no longer (or never) ours to see as instances.
    result["other_targets"] = health
    result["manager"] = manager_status(clients, names.bucket) if result["bucket"] else None
    return result


# Where `fleet run` keeps its lease (AwsFleetConfig.lease_key's default).
DEFAULT_LEASE_KEY = AwsFleetConfig.__dataclass_fields__["lease_key"].default


def manager_status(clients: Clients, bucket: str, key: str = DEFAULT_LEASE_KEY,
                   now: float | None = None) -> dict[str, Any] | None:
    """Who manages the fleet, from the lease object the managers share: the holder
    (``host:pid:id``), since when, and whether its lease is still live (a live holder
    renews it every few seconds, so ``expires_at`` in the future means it ran a cycle
    recently). None when no manager ever ran."""
    try:
        body = clients.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:
        if _error_code(exc) in ("NoSuchKey", "404"):
            return None
        raise
    record = LeaseRecord.parse(body)
    if record is None:
        return {"holder": None, "active": False, "acquired_at": None, "expires_at": None}
    now = time.time() if now is None else now
    iso = lambda t: dt.datetime.fromtimestamp(t, dt.UTC).isoformat() if t else None  # noqa: E731
    return {"holder": record.holder or None, "active": record.expires_at > now,
            "acquired_at": iso(record.acquired_at), "expires_at": iso(record.expires_at)}


def format_status(info: dict[str, Any]) -> str:
    lines = [f"fleet {info['name']} in {info['region']}"]
    lines.append(f"  bucket            {info['bucket'] or '-'}"
                 + (f" (results expire after {info['result_days']} days)"
                    if info.get("result_days") else ""))
    for role, group in info["security_groups"].items():
        lines.append(f"  security group    {group or '-'} ({role})")
    lines.append(f"  key pair          {info['key_pair'] or '-'}")
    lines.append(f"  IAM role          {info['iam_role'] or '-'}")
    lines.append(f"  instance profile  {info['instance_profile'] or '-'}")
    token = info.get("token_parameter")
    lines.append(f"  token parameter   {token['name']} ({token['type']}, version "
                 f"{token['version']})" if token else "  token parameter   - (no token: public)")
    for cert in info.get("certificates", []):
        lines.append(f"  certificate       {cert['arn']} (self-signed for {cert['domain']}, "
                     f"until {cert['not_after']})")
    lb = info["load_balancer"]
    lines.append(f"  load balancer     {lb['arn']} [{lb['state']}]" if lb else
                 "  load balancer     -")
    for lst in info.get("listeners", []):
        policy = f" {lst['ssl_policy']}" if lst.get("ssl_policy") else ""
        lines.append(f"  listener          :{lst['port']} {lst['protocol']}{policy} -> "
                     f"{lst['action']}")
    if info.get("endpoint"):
        lines.append(f"  endpoint          {info['endpoint']}")
    if "token" in info:
        lines.append(f"  token             {info['token']}")
    manager = info.get("manager")
    if manager is None:
        lines.append("  manager           - (none has run: python -m fleet run --config ...)")
    else:
        state = ("active, lease until " + str(manager["expires_at"]) if manager["active"]
                 else "not running (lease expired)")
        lines.append(f"  manager           {manager['holder'] or '-'} ({state}; since "
                     f"{manager['acquired_at'] or '-'})")
    lines.append(f"  target group      {info['target_group'] or '-'}")
    lines.append(f"  instances         {len(info['instances'])}")
    for inst in info["instances"]:
        target = inst["target"]
        reason = f" ({target['reason']})" if target["reason"] else ""
        lines.append(f"    {inst['id']}  {inst['state']:<13} {inst['type']:<10} "
                     f"{inst['public_ip'] or '-':<15} target {target['state']}{reason}")
    for target_id, target in info["other_targets"].items():
        lines.append(f"    {target_id}  (not a fleet instance) target {target['state']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- down

def down(clients: Clients, name: str, report: Report, *, timeout: float = 900.0) -> None:
    names = fleet_names(clients, name)

    instances = [i["InstanceId"] for i in fleet_instances(clients, name)]
    if instances:
        clients.ec2.terminate_instances(InstanceIds=instances)
        report(f"terminating {len(instances)} instance(s): {', '.join(instances)}")
        clients.ec2.get_waiter("instance_terminated").wait(
            InstanceIds=instances, WaiterConfig={"Delay": 5, "MaxAttempts": int(timeout / 5)})
        report("deleted  instances")

    lb = find_load_balancer(clients, names)
    if lb:
        for listener in _paginate(clients.elbv2, "describe_listeners", "Listeners",
                                  LoadBalancerArn=lb["LoadBalancerArn"]):
            clients.elbv2.delete_listener(ListenerArn=listener["ListenerArn"])
            report(f"deleted  listener {listener['ListenerArn']}")
        clients.elbv2.delete_load_balancer(LoadBalancerArn=lb["LoadBalancerArn"])
        clients.elbv2.get_waiter("load_balancers_deleted").wait(
            LoadBalancerArns=[lb["LoadBalancerArn"]],
            WaiterConfig={"Delay": 5, "MaxAttempts": int(timeout / 5)})
        report(f"deleted  load balancer {lb['LoadBalancerArn']}")
    remove_unused_certificates(clients, names, None, report, timeout)

    tg_arn = find_target_group(clients, names)
    if tg_arn:
        _retry_in_use(f"target group {tg_arn}",
                      lambda: clients.elbv2.delete_target_group(TargetGroupArn=tg_arn),
                      ("ResourceInUse",), timeout)
        report(f"deleted  target group {tg_arn}")

    alb_sg = find_security_group(clients, name, "alb")
    worker_sg = find_security_group(clients, name, "workers")
    if worker_sg and alb_sg:
        # The workers' group refers to the ALB's; drop the reference first.
        group = clients.ec2.describe_security_groups(GroupIds=[worker_sg])["SecurityGroups"][0]
        refs = [p for p in group.get("IpPermissions", [])
                if any(g.get("GroupId") == alb_sg for g in p.get("UserIdGroupPairs", []))]
        if refs:
            clients.ec2.revoke_security_group_ingress(GroupId=worker_sg, IpPermissions=refs)
    for group_id in (worker_sg, alb_sg):
        if group_id:
            # Network interfaces of a deleted ALB linger for a minute or two.
            _retry_in_use(f"security group {group_id}",
                          lambda g=group_id: clients.ec2.delete_security_group(GroupId=g),
                          ("DependencyViolation",), timeout)
            report(f"deleted  security group {group_id}")

    key = find_key_pair(clients, name)
    if key:
        clients.ec2.delete_key_pair(KeyName=key)
        report(f"deleted  key pair {key}")

    profile = _iam_get(lambda: clients.iam.get_instance_profile(InstanceProfileName=names.role))
    if profile:
        for role in profile["InstanceProfile"].get("Roles", []):
            clients.iam.remove_role_from_instance_profile(
                InstanceProfileName=names.role, RoleName=role["RoleName"])
        clients.iam.delete_instance_profile(InstanceProfileName=names.role)
        report(f"deleted  instance profile {names.role}")
    role = _iam_get(lambda: clients.iam.get_role(RoleName=names.role))
    if role:
        if not _has_fleet_tag(role["Role"].get("Tags", []), names.fleet):
            raise InfraError(f"IAM role {names.role} is not tagged for this fleet; left alone")
        for policy in _paginate(clients.iam, "list_role_policies", "PolicyNames",
                                RoleName=names.role):
            clients.iam.delete_role_policy(RoleName=names.role, PolicyName=policy)
        for policy in _paginate(clients.iam, "list_attached_role_policies", "AttachedPolicies",
                                RoleName=names.role):
            clients.iam.detach_role_policy(RoleName=names.role, PolicyArn=policy["PolicyArn"])
        clients.iam.delete_role(RoleName=names.role)
        report(f"deleted  IAM role {names.role}")

    remove_token(clients, names, report)

    if bucket_exists(clients, names):
        _empty_bucket(clients, names.bucket)
        clients.s3.delete_bucket(Bucket=names.bucket)
        report(f"deleted  bucket {names.bucket} and its contents")
    report(f"fleet {name}: nothing tagged {FLEET_TAG_KEY}={name} is left")


def _empty_bucket(clients: Clients, bucket: str) -> None:
    for page in clients.s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        objects = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                   for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        if objects:
            clients.s3.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})


def _retry_in_use(what: str, call: Callable[[], Any], codes: tuple[str, ...],
                  timeout: float) -> None:
    def attempt() -> bool:
        try:
            call()
        except Exception as exc:
            if _error_code(exc) in codes:
                log.info("%s still in use (%s); retrying", what, _error_code(exc))
                return False
            raise
        return True

    _poll(f"{what} to be deletable", attempt, timeout, first_delay=2.0)


def _forget_local_files(config_path: Path, name: str, report: Report) -> None:
    """After ``down``: the config names resources that are gone and the key is useless."""
    if not config_path.exists():
        return
    try:
        config = load_config(config_path)
    except ConfigError:
        return
    if config.name != name:
        return
    Path(config.key_file).unlink(missing_ok=True)
    ca_file_path(config_path).unlink(missing_ok=True)
    config_path.unlink()
    report(f"removed  {config_path} and {config.key_file}")


# -------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bootstrap_aws",
        description="Create (up), report (status) or remove (down) the AWS side of an "
                    "ImageFleet fleet. Everything is tagged imagefleet:fleet=NAME.")
    parser.add_argument("command", choices=("up", "status", "down"))
    parser.add_argument("--name", required=True, help="fleet name (1-20 of a-z, 0-9, -)")
    parser.add_argument("--region", help="AWS region (default: from the profile/env)")
    parser.add_argument("--profile", help="AWS credentials profile")
    parser.add_argument("--endpoint-url", help="endpoint for every service (moto, LocalStack)")
    parser.add_argument("--admin-cidr",
                        help="required for up: the only source allowed to SSH to workers "
                             "(e.g. your address/32)")
    parser.add_argument("--allowed-cidr", "--alb-cidr", dest="allowed_cidr",
                        help="who may reach the load balancer (default with a token: "
                             "anyone, 0.0.0.0/0; without one it must be given)")
    parser.add_argument("--certificate-arn",
                        help="ACM certificate for your own domain (default: a self-signed "
                             "one for the load balancer's DNS name, which clients pin)")
    parser.add_argument("--insecure-http", action="store_true",
                        help="serve plain HTTP on port 80 and no HTTPS (not for real use)")
    parser.add_argument("--no-token", dest="token", action="store_false",
                        help="no API token (needs --public and --allowed-cidr)")
    parser.add_argument("--public", action="store_true",
                        help="with --no-token: yes, anyone allowed may use the fleet")
    parser.add_argument("--rotate-token", action="store_true",
                        help="up: write a new API token; the old one stays accepted for "
                             "--token-overlap seconds")
    parser.add_argument("--token-overlap", type=float, default=DEFAULT_TOKEN_OVERLAP_S,
                        metavar="SECONDS",
                        help=f"how long a rotated-out token is still accepted (default "
                             f"{DEFAULT_TOKEN_OVERLAP_S:.0f})")
    parser.add_argument("--show-token", action="store_true",
                        help="status: print the API token (for the app and the CLI)")
    parser.add_argument("--instance-type", action="append", dest="instance_types",
                        help="EC2 instance type, repeat for fallbacks in order "
                             f"(default: {' '.join(DEFAULT_INSTANCE_TYPES)})")
    parser.add_argument("--ami", help="AMI id (default: latest Debian 12 from SSM)")
    parser.add_argument("--ssh-user", default=DEFAULT_SSH_USER,
                        help=f"login user of the AMI (default: {DEFAULT_SSH_USER})")
    parser.add_argument("--result-days", type=int, default=7,
                        help="days before results expire from the bucket (default: 7)")
    parser.add_argument("--vpc-id", help="VPC (default: the region's default VPC)")
    parser.add_argument("--subnets", help="comma-separated public subnets, >= 2 zones")
    parser.add_argument("--config-out", type=Path,
                        help="fleet config file (default: imagefleet-NAME.json)")
    parser.add_argument("--key-out", type=Path,
                        help="private key file (default: the config path with .pem)")
    parser.add_argument("--json", action="store_true", help="status: print JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_fleet_name(args.name)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.command == "up" and not args.admin_cidr:
        parser.error("up needs --admin-cidr (the address allowed to SSH to the workers, "
                     "e.g. 203.0.113.7/32); there is deliberately no default")

    def report(line: str) -> None:
        print(line, flush=True)

    try:
        clients = make_clients(args.region, args.profile, args.endpoint_url)
        if args.command == "up":
            up(clients, UpOptions(
                name=args.name, admin_cidr=args.admin_cidr, allowed_cidr=args.allowed_cidr,
                token=args.token, public=args.public, rotate_token=args.rotate_token,
                token_overlap_s=args.token_overlap, certificate_arn=args.certificate_arn,
                insecure_http=args.insecure_http,
                instance_types=tuple(args.instance_types or DEFAULT_INSTANCE_TYPES),
                ami=args.ami, result_days=args.result_days,
                config_out=args.config_out or Path(f"imagefleet-{args.name}.json"),
                key_out=args.key_out, vpc_id=args.vpc_id,
                subnets=tuple(s for s in (args.subnets or "").split(",") if s),
                ssh_user=args.ssh_user, endpoint_url=args.endpoint_url,
                profile=args.profile,
            ), report)
        elif args.command == "status":
            info = status(clients, args.name, show_token=args.show_token)
            print(json.dumps(info, indent=2) if args.json else format_status(info))
        else:
            down(clients, args.name, report)
            _forget_local_files(args.config_out or Path(f"imagefleet-{args.name}.json"),
                                args.name, report)
    except (InfraError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # botocore's errors (credentials, permissions, throttling) carry a useful message.
        if type(exc).__module__.startswith("botocore"):
            print(f"error: AWS refused or failed: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(main())
