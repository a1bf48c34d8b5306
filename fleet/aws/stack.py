"""The AWS side of a fleet, described once: a pure function from :class:`StackParams` to
the list of resources, in the order they are applied (deletion runs in reverse).

Nothing here talks to AWS. Each :class:`Resource` names a ``kind`` that one handler in
:mod:`fleet.aws.apply` knows how to find, create, converge and delete; values that exist
only once another resource does (a security group's id, the load balancer's DNS name)
are :class:`Ref` placeholders that the applier resolves from what it applied before.
A resource with ``present=False`` is one that must not exist (the HTTPS listener of an
``--insecure-http`` fleet, the token of a ``--no-token`` one): the applier removes it.

Why a table and not a CloudFormation stack: moto (which the tests run against) accepts a
template with all of these resource types, but ignores what matters most here (the
bucket's public access block, lifecycle and ownership controls, the target group's
deregistration delay, the load balancer's idle timeout, tags on ELB resources) and its
``delete_stack`` leaves target groups and the bucket behind, so the tests could show
neither a closed bucket nor a ``down`` that leaves nothing. Three steps would stay SDK
calls anyway (a SecureString parameter, a self-signed certificate for the load
balancer's own name, emptying the bucket), so one mechanism covers everything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet.aws.config import APP_PORT, FLEET_TAG_KEY, ROLE_TAG_KEY, resource_prefix

# Large images take a while; the ALB's default idle timeout (60 s) would cut them off.
ALB_IDLE_TIMEOUT_S = 180
DEREGISTRATION_DELAY_S = 30
# TLS 1.3 and 1.2 only, forward-secret AEAD ciphers (AWS's recommended policy).
TLS_POLICY = "ELBSecurityPolicy-TLS13-1-2-2021-06"
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
# The manager answers /fleet/ping with 200 and nothing else; the ALB does not verify the
# manager's self-signed certificate (it never does for targets), the hop is still TLS.
MANAGER_HEALTH_CHECK = {
    "HealthCheckProtocol": "HTTPS",
    "HealthCheckPort": "traffic-port",
    "HealthCheckPath": "/fleet/ping",
    "HealthCheckIntervalSeconds": 10,
    "HealthCheckTimeoutSeconds": 5,
    "HealthyThresholdCount": 2,
    "UnhealthyThresholdCount": 3,
    "Matcher": {"HttpCode": "200"},
}
ADMIN_PATHS = ("/fleet", "/fleet/*")
ADMIN_RULE_PRIORITY = 10
# Prometheus scrapes each worker and the manager on its own address inside the VPC; the
# load balancer answers these paths itself, so metrics are never served to the internet
# (a worker would otherwise answer anyone holding the API token).
METRICS_PATHS = ("/metrics", "/metrics/*")
METRICS_RULE_PRIORITY = 5
METRICS_REFUSED = {
    "StatusCode": "404", "ContentType": "application/json",
    "MessageBody": '{"error": "not_found", "message": "metrics are not served through the '
                   'load balancer; scrape each worker and the manager on its private '
                   'address"}'}
MANAGER_BUNDLE_KEY = "fleet/manager/bundle.tar.gz"
MANAGER_CONFIG_KEY = "fleet/manager/config.json"
# Where the manager puts the workers' bundle for `bootstrap: user-data` (fleet.aws.main).
WORKER_BUNDLE_KEY = "fleet/bundle.tar.gz"
DEFAULT_LEASE_KEY = "fleet/lease.json"
MANAGER_STATE_DIR = "/var/lib/imagefleet-manager"
# The manager instance carries this tag instead of the fleet tag: the manager observes
# and may terminate every instance tagged imagefleet:fleet=NAME, and must never count
# (or terminate) itself. The Auto Scaling group, which AWS uses to replace it, is tagged
# for the fleet.
MANAGER_OF_TAG_KEY = "imagefleet:manager-of"


@dataclass(frozen=True)
class Ref:
    """The ``attr`` output of resource ``resource`` (its id, arn, dns, ...), once applied."""

    resource: str
    attr: str = "id"


@dataclass(frozen=True)
class Fmt:
    """A string made from outputs: ``Fmt("https://{}", Ref("certificate", "domain"))``."""

    pattern: str
    refs: tuple[Ref, ...]

    def __init__(self, pattern: str, *refs: Ref) -> None:
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "refs", refs)


@dataclass(frozen=True)
class Resource:
    key: str  # unique in the description; what a Ref names
    kind: str  # the handler in fleet.aws.apply
    name: str  # the AWS name (or the Name tag where AWS takes none)
    role: str  # the imagefleet:role tag
    props: Mapping[str, Any] = field(default_factory=dict)
    present: bool = True


@dataclass(frozen=True)
class StackParams:
    fleet: str
    account: str
    region: str
    vpc_id: str
    subnets: tuple[str, ...]  # one or more per zone, at least two zones
    lb_subnets: tuple[str, ...]  # one per zone (an ALB takes at most one per zone)
    ami: str
    allowed_cidr: str = "0.0.0.0/0"
    https: bool = True
    certificate_arn: str | None = None  # the admin's own; None: a self-signed one
    token: bool = True
    rotate_token: bool = False
    rotate_admin_token: bool = False
    token_overlap_s: float = 3600.0
    result_days: int = 7
    admin_port: int = 8001
    manager_instance_type: str = "t3.small"
    # The manager's user data (fleet.aws.manager_host) and bundle (fleet.aws.ssh_bootstrap), and its
    # config as a mapping whose values may be Refs; given, so this module stays pure.
    manager_user_data: str = ""
    manager_bundle: bytes = b""
    manager_config: Mapping[str, Any] = field(default_factory=dict)
    lease_key: str = DEFAULT_LEASE_KEY


@dataclass(frozen=True)
class Names:
    """Every derived name, from the fleet name, account and region."""

    fleet: str
    account: str
    region: str

    @property
    def prefix(self) -> str:
        return resource_prefix(self.fleet)

    @property
    def bucket(self) -> str:
        return f"{self.prefix}-{self.account}-{self.region}"

    @property
    def target_group(self) -> str:
        return f"{self.prefix}-tg"

    @property
    def manager_target_group(self) -> str:
        return f"{self.prefix}-mgr"

    @property
    def load_balancer(self) -> str:
        return f"{self.prefix}-alb"

    @property
    def role(self) -> str:
        return f"{self.prefix}-worker"

    @property
    def manager_role(self) -> str:
        return f"{self.prefix}-manager"

    @property
    def manager_group(self) -> str:
        """The launch template's and the Auto Scaling group's name."""
        return f"{self.prefix}-manager"

    @property
    def key_pair(self) -> str:
        return self.prefix

    @property
    def token_parameter(self) -> str:
        return f"/imagefleet/{self.fleet}/api-token"

    @property
    def admin_token_parameter(self) -> str:
        return f"/imagefleet/{self.fleet}/admin-token"

    def parameter_arn(self, parameter: str) -> str:
        return f"arn:aws:ssm:{self.region}:{self.account}:parameter{parameter}"

    @property
    def token_parameter_arn(self) -> str:
        return self.parameter_arn(self.token_parameter)


def tags(fleet: str, role: str, *, name: bool = True) -> list[dict[str, str]]:
    out = [{"Key": FLEET_TAG_KEY, "Value": fleet}, {"Key": ROLE_TAG_KEY, "Value": role}]
    if name:
        out.append({"Key": "Name", "Value": f"{resource_prefix(fleet)}-{role}"})
    return out


# ------------------------------------------------------------------------ policies

def _doc(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


EC2_TRUST = _doc({"Effect": "Allow", "Action": "sts:AssumeRole",
                  "Principal": {"Service": "ec2.amazonaws.com"}})


def worker_bucket_policy(bucket: str) -> dict[str, Any]:
    return _doc(
        {"Sid": "ListFleetBucket", "Effect": "Allow",
         "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
         "Resource": f"arn:aws:s3:::{bucket}"},
        {"Sid": "ReadWriteFleetObjects", "Effect": "Allow",
         "Action": ["s3:GetObject", "s3:PutObject"],
         "Resource": f"arn:aws:s3:::{bucket}/*"})


def read_parameters_policy(names: Names, parameters: tuple[str, ...]) -> dict[str, Any]:
    """Read these parameters and nothing else in Parameter Store; decrypt them with KMS
    only through SSM (the AWS-managed aws/ssm key or any key SSM uses)."""
    arns = [names.parameter_arn(p) for p in parameters]
    return _doc(
        {"Sid": "ReadFleetTokens", "Effect": "Allow", "Action": "ssm:GetParameter",
         "Resource": arns[0] if len(arns) == 1 else arns},
        {"Sid": "DecryptThroughSsmOnly", "Effect": "Allow", "Action": "kms:Decrypt",
         "Resource": f"arn:aws:kms:{names.region}:{names.account}:key/*",
         "Condition": {"StringEquals": {
             "kms:ViaService": f"ssm.{names.region}.amazonaws.com"}}})


def manager_policy(names: Names, *, worker_sg: str, target_group_arn: str,
                   lease_key: str = DEFAULT_LEASE_KEY) -> dict[str, Any]:
    """What ``python -m fleet run`` does on AWS, and no more: start workers only tagged
    for this fleet, with the worker role, in the workers' group, with the fleet's key;
    tag and terminate only instances tagged for this fleet; register and deregister only
    on the workers' target group; the lease and its own bundle/config in the bucket;
    import and delete only the fleet's key pair; metrics only into the ImageFleet
    namespace. Describe calls and PutMetricData take no resource ARNs."""
    from fleet.aws.cloudwatch import NAMESPACE  # here: edits elsewhere in this file merge

    region, account = names.region, names.account
    ec2 = f"arn:aws:ec2:{region}:{account}"
    fleet_tag = f"aws:RequestTag/{FLEET_TAG_KEY}"
    owned = {"StringEquals": {f"ec2:ResourceTag/{FLEET_TAG_KEY}": names.fleet}}
    bucket = f"arn:aws:s3:::{names.bucket}"
    return _doc(
        {"Sid": "Describe", "Effect": "Allow", "Resource": "*",
         "Action": ["ec2:DescribeInstances", "ec2:DescribeInstanceStatus",
                    "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups",
                    "ec2:DescribeImages", "ec2:DescribeKeyPairs",
                    "ec2:DescribeInstanceTypes", "ec2:DescribeTags",
                    "elasticloadbalancing:DescribeTargetHealth",
                    "elasticloadbalancing:DescribeTargetGroups"]},
        {"Sid": "RunOnlyFleetTaggedInstances", "Effect": "Allow",
         "Action": "ec2:RunInstances",
         "Resource": [f"{ec2}:instance/*", f"{ec2}:volume/*"],
         "Condition": {"StringEquals": {fleet_tag: names.fleet}}},
        {"Sid": "RunWithTheFleetsParts", "Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": [f"arn:aws:ec2:{region}::image/*", f"{ec2}:subnet/*",
                      f"{ec2}:network-interface/*", f"{ec2}:security-group/{worker_sg}",
                      f"{ec2}:key-pair/{names.key_pair}"]},
        {"Sid": "TagAtLaunchOrImport", "Effect": "Allow", "Action": "ec2:CreateTags",
         "Resource": [f"{ec2}:instance/*", f"{ec2}:volume/*", f"{ec2}:key-pair/*"],
         "Condition": {"StringEquals": {"ec2:CreateAction": ["RunInstances",
                                                             "ImportKeyPair"]}}},
        {"Sid": "TagTerminateConsoleOwnInstances", "Effect": "Allow",
         "Action": ["ec2:CreateTags", "ec2:TerminateInstances", "ec2:GetConsoleOutput"],
         "Resource": f"{ec2}:instance/*", "Condition": owned},
        {"Sid": "OwnKeyPair", "Effect": "Allow",
         "Action": ["ec2:ImportKeyPair", "ec2:DeleteKeyPair"],
         "Resource": f"{ec2}:key-pair/{names.key_pair}"},
        {"Sid": "PassOnlyTheWorkerRole", "Effect": "Allow", "Action": "iam:PassRole",
         "Resource": f"arn:aws:iam::{account}:role/imagefleet/{names.role}",
         "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}},
        {"Sid": "OnlyTheWorkersTargetGroup", "Effect": "Allow",
         "Action": ["elasticloadbalancing:RegisterTargets",
                    "elasticloadbalancing:DeregisterTargets"],
         "Resource": target_group_arn},
        # The lease; its own bundle and config; the workers' bundle, which it uploads
        # for `bootstrap: user-data`. No results: the manager never touches images.
        {"Sid": "LeaseAndOwnFiles", "Effect": "Allow",
         "Action": ["s3:GetObject", "s3:PutObject"],
         "Resource": [f"{bucket}/{lease_key}", f"{bucket}/fleet/manager/*",
                      f"{bucket}/{WORKER_BUNDLE_KEY}"]},
        # Without ListBucket a missing key answers 403 instead of 404, and a first
        # manager could not tell "no lease yet" from "forbidden".
        {"Sid": "ListOnlyFleetPrefix", "Effect": "Allow", "Action": "s3:ListBucket",
         "Resource": bucket, "Condition": {"StringLike": {"s3:prefix": ["fleet/*"]}}},
        # The rolling window for AWS alarms (cloudwatch_metrics). PutMetricData has no
        # resource-level permissions; the namespace condition is its only scope.
        {"Sid": "PutOnlyFleetMetrics", "Effect": "Allow", "Action": "cloudwatch:PutMetricData",
         "Resource": "*", "Condition": {"StringEquals": {"cloudwatch:namespace": NAMESPACE}}},
    )


# -------------------------------------------------------------------- description

def _ingress(port: int, description: str, *, cidr: str | None = None,
             group: Ref | None = None) -> dict[str, Any]:
    return {"port": port, "cidr": cidr, "group": group, "description": description}


def listener_actions_forward(target_group: Ref) -> list[dict[str, Any]]:
    return [{"Type": "forward", "TargetGroupArn": target_group}]


REDIRECT_TO_HTTPS = [{"Type": "redirect", "RedirectConfig": {
    "Protocol": "HTTPS", "Port": "443", "Host": "#{host}", "Path": "/#{path}",
    "Query": "#{query}", "StatusCode": "HTTP_301"}}]


def describe(params: StackParams) -> tuple[Resource, ...]:
    """Every resource of the fleet, in the order to apply them."""
    names = Names(params.fleet, params.account, params.region)
    fleet = params.fleet
    prefix = names.prefix
    alb_ports = ([(443, "HTTPS"), (80, "HTTP, redirected to HTTPS")] if params.https
                 else [(80, "plain HTTP (--insecure-http)")])
    token_parameters = ((names.token_parameter,) if params.token else ()) + (
        names.admin_token_parameter,)
    https = params.https
    forwarding_listener = "listener_https" if https else "listener_http"
    manager_tags = [{"Key": MANAGER_OF_TAG_KEY, "Value": fleet},
                    {"Key": ROLE_TAG_KEY, "Value": "manager"},
                    {"Key": "Name", "Value": f"{prefix}-manager"}]
    resources = [
        Resource("bucket", "bucket", names.bucket, "storage",
                 {"result_days": params.result_days}),
        Resource("alb_sg", "security_group", f"{prefix}-alb", "alb", {
            "vpc_id": params.vpc_id,
            "description": "ImageFleet load balancer: HTTPS from clients",
            "ingress": [_ingress(port, f"clients: {what}", cidr=params.allowed_cidr)
                        for port, what in alb_ports]}),
        Resource("manager_sg", "security_group", f"{prefix}-manager", "manager", {
            "vpc_id": params.vpc_id,
            "description": "ImageFleet manager: admin API from the ALB only",
            "ingress": [_ingress(params.admin_port, "admin API from the ALB only",
                                 group=Ref("alb_sg"))]}),
        Resource("worker_sg", "security_group", f"{prefix}-workers", "workers", {
            "vpc_id": params.vpc_id,
            "description": "ImageFleet workers: app port from the ALB, SSH from the manager",
            "ingress": [
                _ingress(APP_PORT, "from the ALB", group=Ref("alb_sg")),
                _ingress(APP_PORT, "manager polls /health", group=Ref("manager_sg")),
                _ingress(22, "SSH from the manager (bootstrap)", group=Ref("manager_sg")),
            ]}),
        Resource("api_token", "secure_parameter", names.token_parameter, "token", {
            "description": f"ImageFleet API token of fleet {fleet}",
            "rotate": params.rotate_token, "overlap_s": params.token_overlap_s},
            present=params.token),
        Resource("admin_token", "secure_parameter", names.admin_token_parameter,
                 "admin-token", {
                     "description": f"ImageFleet admin token of fleet {fleet}",
                     "rotate": params.rotate_admin_token,
                     "overlap_s": params.token_overlap_s}),
        Resource("worker_role", "iam_role", names.role, "worker", {
            "description": f"ImageFleet workers of fleet {fleet}: their bucket only",
            "trust": EC2_TRUST,
            "policies": {"fleet-bucket": worker_bucket_policy(names.bucket),
                         **({"fleet-token": read_parameters_policy(
                             names, (names.token_parameter,))} if params.token else {})}}),
        Resource("worker_profile", "instance_profile", names.role, "worker",
                 {"role": Ref("worker_role", "name")}),
        Resource("target_group", "target_group", names.target_group, "targets", {
            "Protocol": "HTTP", "Port": APP_PORT, "VpcId": params.vpc_id,
            "health_check": HEALTH_CHECK,
            "attributes": {"deregistration_delay.timeout_seconds":
                           str(DEREGISTRATION_DELAY_S)}}),
        Resource("manager_target_group", "target_group", names.manager_target_group,
                 "manager-targets", {
                     "Protocol": "HTTPS", "Port": params.admin_port,
                     "VpcId": params.vpc_id, "health_check": MANAGER_HEALTH_CHECK,
                     "attributes": {"deregistration_delay.timeout_seconds": "10"}}),
        Resource("manager_role", "iam_role", names.manager_role, "manager", {
            "description": f"ImageFleet manager of fleet {fleet}: its instances only",
            "trust": EC2_TRUST,
            "policies": {
                "fleet-manager": manager_policy(
                    names, worker_sg="{worker_sg}", target_group_arn="{target_group}",
                    lease_key=params.lease_key),
                "fleet-tokens": read_parameters_policy(names, token_parameters)},
            # The ids exist only once the group and target group do.
            "substitute": {"{worker_sg}": Ref("worker_sg"),
                           "{target_group}": Ref("target_group", "arn")}}),
        Resource("manager_profile", "instance_profile", names.manager_role, "manager",
                 {"role": Ref("manager_role", "name")}),
        Resource("load_balancer", "load_balancer", names.load_balancer, "alb", {
            "subnets": list(params.lb_subnets), "security_groups": [Ref("alb_sg")],
            "attributes": {"idle_timeout.timeout_seconds": str(ALB_IDLE_TIMEOUT_S)}}),
        Resource("certificate", "certificate", f"{prefix}-certificate", "certificate", {
            "domain": Ref("load_balancer", "dns"), "arn": params.certificate_arn},
            present=https),
        Resource("listener_https", "listener", f"{prefix}-https", "listener", {
            "load_balancer": Ref("load_balancer", "arn"), "Port": 443, "Protocol": "HTTPS",
            "SslPolicy": TLS_POLICY,
            "Certificates": [{"CertificateArn": Ref("certificate", "arn")}],
            "DefaultActions": listener_actions_forward(Ref("target_group", "arn"))},
            present=https),
        Resource("listener_http", "listener", f"{prefix}-http", "listener", {
            "load_balancer": Ref("load_balancer", "arn"), "Port": 80, "Protocol": "HTTP",
            "DefaultActions": (REDIRECT_TO_HTTPS if https else
                               listener_actions_forward(Ref("target_group", "arn")))}),
        Resource("admin_rule", "listener_rule", f"{prefix}-admin", "listener", {
            "listener": Ref(forwarding_listener, "arn"), "priority": ADMIN_RULE_PRIORITY,
            "paths": list(ADMIN_PATHS),
            "target_group": Ref("manager_target_group", "arn")}),
        Resource("metrics_rule", "listener_rule", f"{prefix}-metrics", "listener", {
            "listener": Ref(forwarding_listener, "arn"), "priority": METRICS_RULE_PRIORITY,
            "paths": list(METRICS_PATHS), "fixed_response": dict(METRICS_REFUSED)}),
        Resource("manager_bundle", "s3_object", MANAGER_BUNDLE_KEY, "manager", {
            "bucket": names.bucket, "body": params.manager_bundle,
            "content_type": "application/gzip"}),
        Resource("manager_config", "s3_object", MANAGER_CONFIG_KEY, "manager", {
            "bucket": names.bucket, "json": dict(params.manager_config),
            "content_type": "application/json"}),
        Resource("manager_template", "launch_template", names.manager_group, "manager", {
            "data": {
                "ImageId": params.ami, "InstanceType": params.manager_instance_type,
                "IamInstanceProfile": {"Arn": Ref("manager_profile", "arn")},
                "SecurityGroupIds": [Ref("manager_sg")],
                "UserData": params.manager_user_data,
                "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                    "HttpPutResponseHopLimit": 1},
                "TagSpecifications": [{"ResourceType": "instance", "Tags": manager_tags},
                                      {"ResourceType": "volume", "Tags": manager_tags}],
            },
            # A new config object starts a new launch template version, so the next
            # manager the group starts reads it (see the README on replacing it).
            "config_digest": Ref("manager_config", "digest")}),
        Resource("manager_group", "auto_scaling_group", names.manager_group, "manager", {
            "launch_template": Ref("manager_template"),
            "version": Ref("manager_template", "version"),
            "min": 1, "max": 1, "desired": 1, "subnets": list(params.subnets),
            "target_groups": [Ref("manager_target_group", "arn")],
            # The ALB's /fleet/ping verdict, not only EC2's: a manager instance that runs
            # but no longer answers is replaced too (systemd restarts a crashed process
            # first). The grace covers the first boot's apt, venv and pip.
            "health_check": "ELB", "grace_s": 900}),
    ]
    return tuple(resources)


def template(params: StackParams) -> dict[str, Any]:
    """The description as plain data (Refs as ``{"Ref": "key.attr"}``), e.g. to print
    or compare; the bundle appears as its size only."""

    def plain(value: Any) -> Any:
        if isinstance(value, Ref):
            return {"Ref": f"{value.resource}.{value.attr}"}
        if isinstance(value, Fmt):
            return {"Fmt": value.pattern, "refs": [plain(r) for r in value.refs]}
        if isinstance(value, bytes):
            return {"bytes": len(value)}
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return {r.key: {"kind": r.kind, "name": r.name, "role": r.role, "present": r.present,
                    "props": plain(r.props)} for r in describe(params)}


def resolve(value: Any, outputs: Mapping[str, Mapping[str, Any]]) -> Any:
    """``value`` with every Ref replaced by the output it names (None for a resource
    that is absent)."""
    if isinstance(value, Ref):
        found = outputs.get(value.resource)
        return None if found is None else found.get(value.attr)
    if isinstance(value, Fmt):
        return value.pattern.format(*(resolve(r, outputs) for r in value.refs))
    if isinstance(value, Mapping):
        return {k: resolve(v, outputs) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [resolve(v, outputs) for v in value]
    return value


def substitute(document: Any, values: Mapping[str, str]) -> Any:
    """A policy document with placeholders like ``{worker_sg}`` filled in."""
    text = json.dumps(document)
    for placeholder, value in values.items():
        text = text.replace(placeholder, str(value))
    return json.loads(text)


def manager_config(*, names: Names, vpc_id: str, subnets: tuple[str, ...], ami: str,
                   instance_types: tuple[str, ...], ssh_user: str, result_days: int,
                   https: bool, token: bool, admin_port: int,
                   endpoint_url: str | None = None, lease_key: str = DEFAULT_LEASE_KEY,
                   tunables: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fleet config the manager instance runs with (an ``AwsFleetConfig`` as a
    mapping, Refs where ids exist only after apply): listening for the ALB on all
    interfaces over TLS, the admin token from SSM, its own SSH key, polling the workers'
    load over their private addresses, publishing its window to CloudWatch."""
    listener = "listener_https" if https else "listener_http"
    return {
        **dict(tunables or {}),
        "name": names.fleet, "region": names.region, "vpc_id": vpc_id,
        "subnets": list(subnets), "bucket": names.bucket,
        "alb_security_group": Ref("alb_sg"), "worker_security_group": Ref("worker_sg"),
        "manager_security_group": Ref("manager_sg"),
        "key_name": names.key_pair, "key_file": f"{MANAGER_STATE_DIR}/workers-ssh-key",
        "manage_ssh_key": True, "state_dir": MANAGER_STATE_DIR,
        "role_name": names.role, "instance_profile_name": names.role,
        "instance_profile_arn": Ref("worker_profile", "arn"),
        "target_group_arn": Ref("target_group", "arn"),
        "load_balancer_arn": Ref("load_balancer", "arn"),
        "load_balancer_dns": Ref("load_balancer", "dns"),
        "listener_arn": Ref(listener, "arn"),
        "ami": ami, "instance_types": list(instance_types), "ssh_user": ssh_user,
        "result_days": result_days, "endpoint_url": endpoint_url, "profile": None,
        "api_url": (Fmt("https://{}", Ref("certificate", "domain")) if https
                    else Fmt("http://{}", Ref("load_balancer", "dns"))),
        "token_parameter": names.token_parameter if token else None,
        "certificate_arn": Ref("certificate", "arn") if https else None,
        "ca_pem": Ref("certificate", "pem") if https else None,
        "insecure_http": not https,
        "admin_host": "0.0.0.0", "admin_port": admin_port, "admin_tls": True,
        "admin_token_parameter": names.admin_token_parameter,
        "poll_worker_load": True, "cloudwatch_metrics": True, "lease_key": lease_key,
    }
