"""Create, report and remove the AWS side of an ImageFleet fleet.

    python -m scripts.bootstrap_aws up     --name NAME --admin-cidr 203.0.113.7/32 [options]
    python -m scripts.bootstrap_aws status --name NAME [--region R] [--profile P]
    python -m scripts.bootstrap_aws down   --name NAME [--region R] [--profile P]

``up`` is idempotent: every resource is looked up before it is created (EC2 objects by
the ``imagefleet:fleet=NAME`` tag, named resources by their derived name, then checked
for that tag so a stranger's resource is never adopted), and settings that can drift
(bucket protection, lifecycle, health check, ingress rules) are re-applied. Running it
twice creates nothing new. It writes the fleet config file that ``python -m fleet run
--config FILE`` reads.

``down`` removes everything tagged for the fleet in dependency order: instances (also
those the manager launched), listener, load balancer, target group, security groups,
key pair, IAM role and instance profile, then the bucket with its contents.

Waiters are used here (a one-shot script may block); the reconcile loop never waits.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
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
        sts=client("sts"), ssm=client("ssm"), region=region,
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
    alb_cidr: str = "0.0.0.0/0"
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


def ensure_security_groups(clients: Clients, name: str, *, vpc_id: str, alb_cidr: str,
                           admin_cidr: str, report: Report) -> tuple[str, str]:
    alb = _ensure_group(clients, name, "alb", vpc_id=vpc_id, report=report,
                        description="ImageFleet load balancer: HTTP from clients")
    workers = _ensure_group(clients, name, "workers", vpc_id=vpc_id, report=report,
                            description="ImageFleet workers: app port from the ALB, SSH from admin")
    _ensure_ingress(clients, alb, [
        {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80,
         "IpRanges": [{"CidrIp": alb_cidr, "Description": "clients"}]},
    ], report)
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


def ensure_iam(clients: Clients, names: Names, bucket: str, report: Report) -> tuple[str, str]:
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


def ensure_listener(clients: Clients, names: Names, lb_arn: str, tg_arn: str,
                    report: Report) -> str:
    forward = [{"Type": "forward", "TargetGroupArn": tg_arn}]
    for listener in _paginate(clients.elbv2, "describe_listeners", "Listeners",
                              LoadBalancerArn=lb_arn):
        if listener["Port"] == 80:
            actions = listener.get("DefaultActions", [])
            if [a.get("TargetGroupArn") for a in actions] != [tg_arn]:
                clients.elbv2.modify_listener(ListenerArn=listener["ListenerArn"],
                                              DefaultActions=forward)
            report(f"exists   listener {listener['ListenerArn']}")
            return listener["ListenerArn"]
    arn = clients.elbv2.create_listener(
        LoadBalancerArn=lb_arn, Protocol="HTTP", Port=80, DefaultActions=forward,
        Tags=_tags(names.fleet, "listener"))["Listeners"][0]["ListenerArn"]
    report(f"created  listener {arn} (HTTP :80 -> target group)")
    return arn


def up(clients: Clients, options: UpOptions, report: Report) -> AwsFleetConfig:
    admin_cidr = validate_cidr(options.admin_cidr, what="--admin-cidr", allow_world=False)
    alb_cidr = validate_cidr(options.alb_cidr, what="--alb-cidr", allow_world=True)
    if not 1 <= options.result_days <= 3650:
        raise InfraError(f"--result-days must be 1..3650 (got {options.result_days})")
    names = fleet_names(clients, options.name)
    key_out = options.key_out or options.config_out.with_suffix(".pem")
    vpc_id, subnets = resolve_network(clients, options.vpc_id, options.subnets)
    ami = resolve_ami(clients, options.ami)

    bucket = ensure_bucket(clients, names, options.result_days, report)
    alb_sg, worker_sg = ensure_security_groups(clients, names.fleet, vpc_id=vpc_id,
                                               alb_cidr=alb_cidr, admin_cidr=admin_cidr,
                                               report=report)
    key_name = ensure_key_pair(clients, names, key_out, report)
    role_name, profile_arn = ensure_iam(clients, names, bucket, report)
    tg_arn = ensure_target_group(clients, names, vpc_id, report)
    lb = ensure_load_balancer(clients, names, subnets, alb_sg, report)
    listener_arn = ensure_listener(clients, names, lb["LoadBalancerArn"], tg_arn, report)

    previous = _previous_settings(options.config_out, names.fleet)
    config = AwsFleetConfig(
        name=names.fleet, region=clients.region, vpc_id=vpc_id, subnets=subnets,
        bucket=bucket, alb_security_group=alb_sg, worker_security_group=worker_sg,
        key_name=key_name, key_file=str(key_out.resolve()), role_name=role_name,
        instance_profile_name=role_name, instance_profile_arn=profile_arn,
        target_group_arn=tg_arn, load_balancer_arn=lb["LoadBalancerArn"],
        load_balancer_dns=lb["DNSName"], listener_arn=listener_arn, ami=ami,
        instance_types=tuple(options.instance_types), ssh_user=options.ssh_user,
        result_days=options.result_days, endpoint_url=options.endpoint_url,
        profile=options.profile, **previous,
    )
    save_config(config, options.config_out)
    report(f"wrote    fleet config {options.config_out}")
    report(f"endpoint http://{config.load_balancer_dns}")
    return config


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

def status(clients: Clients, name: str) -> dict[str, Any]:
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
    lb = find_load_balancer(clients, names)
    result["load_balancer"] = ({"arn": lb["LoadBalancerArn"], "dns": lb["DNSName"],
                                "state": lb["State"]["Code"]} if lb else None)
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
    return result


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
    lb = info["load_balancer"]
    lines.append(f"  load balancer     {lb['arn']} [{lb['state']}]" if lb else
                 "  load balancer     -")
    if lb:
        lines.append(f"  endpoint          http://{lb['dns']}")
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
    parser.add_argument("--alb-cidr", default="0.0.0.0/0",
                        help="who may reach the load balancer on HTTP (default: anyone)")
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
                name=args.name, admin_cidr=args.admin_cidr, alb_cidr=args.alb_cidr,
                instance_types=tuple(args.instance_types or DEFAULT_INSTANCE_TYPES),
                ami=args.ami, result_days=args.result_days,
                config_out=args.config_out or Path(f"imagefleet-{args.name}.json"),
                key_out=args.key_out, vpc_id=args.vpc_id,
                subnets=tuple(s for s in (args.subnets or "").split(",") if s),
                ssh_user=args.ssh_user, endpoint_url=args.endpoint_url,
                profile=args.profile,
            ), report)
        elif args.command == "status":
            info = status(clients, args.name)
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
