"""Create, report and remove the AWS side of an ImageFleet fleet: ``up``, ``status`` and
``down`` (``python -m scripts.bootstrap_aws`` is their command line).

The resources are described once (:func:`fleet.aws.stack.describe`) and applied by one
mechanism (:mod:`fleet.aws.apply`): :func:`up` creates what is missing and converges what
exists, :func:`down` deletes it all in reverse order, :func:`status` reports what exists.
This module turns the operator's options into the description's parameters, writes the
admin's fleet config and formats the report.

Closed and encrypted by default: ``up`` generates the API token and the admin token and
keeps them in SSM Parameter Store as SecureStrings (workers may read the API token only,
the manager both), and the load balancer serves HTTPS only (TLS 1.3/1.2; port 80
redirects) with the admin's ACM certificate (``certificate_arn``) or a self-signed one
for its own DNS name, whose PEM clients pin. The manager runs in the cloud in an Auto
Scaling group of exactly one, with its own least-privilege role; its admin API is at
``https://<load balancer>/fleet``. Without a token ``up`` insists on ``public``; plain
HTTP needs ``insecure_http``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.aws import apply as aws_apply
from fleet.aws import stack as aws_stack
from fleet.aws.apply import (
    Clients,
    Context,
    InfraError,
    fleet_certificates,
    fleet_filter,
    make_clients,
    paginate,
)
from fleet.aws.config import (
    AwsFleetConfig,
    ConfigError,
    config_from_dict,
    load_config,
    save_config,
    validate_fleet_name,
    write_private_file,
)
from fleet.aws.lease import LeaseRecord
from fleet.aws.stack import MANAGER_OF_TAG_KEY, Names, StackParams
from server.tokens import TokenSet

__all__ = ["Clients", "InfraError", "UpOptions", "down", "make_clients", "status", "up"]

log = logging.getLogger(__name__)

DEFAULT_INSTANCE_TYPES = ("t3.small", "t3a.small")
# Debian 12 ships Python 3.11, the version the server is developed and tested on.
DEFAULT_AMI_PARAMETER = "/aws/service/debian/release/12/latest/amd64"
DEFAULT_SSH_USER = "admin"
LIVE_INSTANCE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
DEFAULT_TOKEN_OVERLAP_S = 3600.0
# Where `fleet run` keeps its lease (AwsFleetConfig.lease_key's default).
DEFAULT_LEASE_KEY = AwsFleetConfig.__dataclass_fields__["lease_key"].default

Report = Callable[[str], None]


def validate_cidr(value: str, *, what: str, allow_world: bool) -> str:
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise InfraError(f"{what}: {value!r} is not a CIDR block like 203.0.113.7/32 "
                         f"({exc})") from exc
    if network.version != 4:
        raise InfraError(f"{what}: only IPv4 CIDR blocks are supported (got {value})")
    if network.prefixlen == 0 and not allow_world:
        raise InfraError(f"{what}: {value} would open it to the whole internet")
    return str(network)


def fleet_names(clients: Clients, name: str) -> Names:
    account = clients.sts.get_caller_identity()["Account"]
    return Names(fleet=validate_fleet_name(name), account=account, region=clients.region)


def read_token_set(clients: Clients, names: Names, parameter: str | None = None) -> TokenSet:
    return aws_apply.read_token_set(clients, parameter or names.token_parameter)


def ensure_token(clients: Clients, names: Names, *, rotate: bool, overlap_s: float,
                 report: Report, now: float | None = None) -> str:
    """The API token parameter alone (created, kept or rotated), as ``up`` applies it."""
    ctx = Context(clients, names, report,
                  now=(lambda: now) if now is not None else time.time)
    resource = next(r for r in aws_stack.describe(_lookup_params(names))
                    if r.key == "api_token")
    aws_apply.apply(ctx, [aws_stack.Resource(
        resource.key, resource.kind, resource.name, resource.role,
        {**resource.props, "rotate": rotate, "overlap_s": overlap_s})])
    return names.token_parameter


def fleet_instances(clients: Clients, name: str, tag_key: str = aws_stack.FLEET_TAG_KEY
                    ) -> list[dict[str, Any]]:
    filters = [{"Name": f"tag:{tag_key}", "Values": [name]},
               {"Name": "instance-state-name", "Values": list(LIVE_INSTANCE_STATES)}]
    return [instance
            for reservation in paginate(clients.ec2, "describe_instances", "Reservations",
                                        Filters=filters)
            for instance in reservation["Instances"]]


# --------------------------------------------------------------------------------- up

@dataclass(frozen=True)
class UpOptions:
    name: str
    # Who may reach the load balancer; None: anyone (0.0.0.0/0), allowed with a token only.
    allowed_cidr: str | None = None
    token: bool = True
    public: bool = False
    rotate_token: bool = False
    rotate_admin_token: bool = False
    token_overlap_s: float = DEFAULT_TOKEN_OVERLAP_S
    certificate_arn: str | None = None
    insecure_http: bool = False
    instance_types: tuple[str, ...] = DEFAULT_INSTANCE_TYPES
    manager_instance_type: str = "t3.small"
    ami: str | None = None
    result_days: int = 7
    config_out: Path = Path("imagefleet.json")
    vpc_id: str | None = None
    subnets: tuple[str, ...] = ()
    ssh_user: str = DEFAULT_SSH_USER
    endpoint_url: str | None = None
    profile: str | None = None


def resolve_network(clients: Clients, vpc_id: str | None, subnets: tuple[str, ...]
                    ) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """The VPC, its usable subnets, and one of them per zone (for the ALB)."""
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
    found = list(paginate(clients.ec2, "describe_subnets", "Subnets", Filters=filters))
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
    per_zone: dict[str, str] = {}
    for subnet in found:
        per_zone.setdefault(subnet["AvailabilityZone"], subnet["SubnetId"])
    return vpc_id, tuple(s["SubnetId"] for s in found), tuple(sorted(per_zone.values()))


def resolve_ami(clients: Clients, ami: str | None) -> str:
    if ami:
        return ami
    try:
        return clients.ssm.get_parameter(Name=DEFAULT_AMI_PARAMETER)["Parameter"]["Value"]
    except Exception as exc:
        raise InfraError(f"could not resolve the Debian 12 AMI from SSM parameter "
                         f"{DEFAULT_AMI_PARAMETER} ({exc}); pass --ami ami-...") from exc


def check_up_options(options: UpOptions) -> str:
    """Refuse the combinations that would open the fleet by accident; returns the
    validated allowed CIDR."""
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
    if not 1 <= options.result_days <= 3650:
        raise InfraError(f"--result-days must be 1..3650 (got {options.result_days})")
    return validate_cidr(options.allowed_cidr or "0.0.0.0/0", what="--allowed-cidr",
                         allow_world=True)


# Tunables a user may have edited in an existing config survive a re-run of `up` (and
# reach the manager's config too).
_KEPT_SETTINGS = ("desired", "min", "max", "bootstrap", "bootstrap_timeout_s",
                  "grace_period_s", "observe_interval_s", "lease_ttl_s", "admin_port",
                  "results_prefix")


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


def _lookup_params(names: Names, **overrides: Any) -> StackParams:
    """Parameters enough to find (not create) every resource: status and down."""
    values: dict[str, Any] = {"fleet": names.fleet, "account": names.account,
                              "region": names.region, "vpc_id": "", "subnets": (),
                              "lb_subnets": (), "ami": ""}
    return StackParams(**{**values, **overrides})


def up(clients: Clients, options: UpOptions, report: Report) -> AwsFleetConfig:
    from fleet.aws.manager_host import render_manager_user_data
    from fleet.aws.ssh_bootstrap import build_manager_bundle

    allowed_cidr = check_up_options(options)
    names = fleet_names(clients, options.name)
    previous = _previous_settings(options.config_out, names.fleet)
    vpc_id, subnets, lb_subnets = resolve_network(clients, options.vpc_id, options.subnets)
    ami = resolve_ami(clients, options.ami)
    https = not options.insecure_http
    # Every kept setting spelled out, so a re-run writes the same manager config.
    defaults = AwsFleetConfig.__dataclass_fields__
    tunables = {key: previous.get(key, defaults[key].default) for key in _KEPT_SETTINGS}
    admin_port = int(tunables["admin_port"])
    wanted = aws_stack.manager_config(
        names=names, vpc_id=vpc_id, subnets=subnets, ami=ami,
        instance_types=tuple(options.instance_types), ssh_user=options.ssh_user,
        result_days=options.result_days, https=https, token=options.token,
        admin_port=admin_port, endpoint_url=options.endpoint_url, tunables=tunables)
    params = StackParams(
        fleet=names.fleet, account=names.account, region=names.region, vpc_id=vpc_id,
        subnets=subnets, lb_subnets=lb_subnets, ami=ami, allowed_cidr=allowed_cidr,
        https=https, certificate_arn=options.certificate_arn, token=options.token,
        rotate_token=options.rotate_token, rotate_admin_token=options.rotate_admin_token,
        token_overlap_s=options.token_overlap_s, result_days=options.result_days,
        admin_port=admin_port, manager_instance_type=options.manager_instance_type,
        manager_user_data=render_manager_user_data(
            bucket=names.bucket, region=names.region,
            bundle_key=aws_stack.MANAGER_BUNDLE_KEY, config_key=aws_stack.MANAGER_CONFIG_KEY),
        manager_bundle=build_manager_bundle(), manager_config=wanted)
    # Validated before anything is made: a bad tunable fails here, not on the manager.
    _check_manager_config(wanted)

    ctx = Context(clients, names, report)
    outputs = aws_apply.apply(ctx, aws_stack.describe(params))
    certificate = outputs.get("certificate")
    # After the listeners moved: a replaced (or no longer used) self-signed certificate.
    aws_apply.remove_unused_certificates(ctx, certificate["arn"] if certificate else None)
    if options.insecure_http:
        report("WARNING  --insecure-http: images, results and the tokens cross the network "
               "in clear text")

    manager = config_from_dict(aws_stack.resolve(wanted, outputs), source="manager config")
    # The admin's copy: the same fleet, seen from the admin's machine (the app and CLI
    # read the endpoint, token parameter and pinned certificate from it).
    # A manager run there for development keeps its state (the SSH key) beside the config.
    state_dir = options.config_out.resolve().with_name(f"{options.config_out.stem}-state")
    config = config_from_dict({
        **json.loads(manager.to_json()), "admin_host": "127.0.0.1", "admin_tls": False,
        "poll_worker_load": False, "cloudwatch_metrics": False, "profile": options.profile,
        "state_dir": str(state_dir), "key_file": str(state_dir / "workers-ssh-key"),
    }, source="fleet config")
    save_config(config, options.config_out)
    report(f"wrote    fleet config {options.config_out}")
    ca_path = ca_file_path(options.config_out)
    if config.ca_pem:
        # Public, but only the admin writes it: clients pin exactly this certificate.
        write_private_file(ca_path, config.ca_pem, mode=0o644)
        report(f"wrote    certificate {ca_path} (pass it as --ca-file / the app's CA file)")
    else:
        ca_path.unlink(missing_ok=True)
    report(f"endpoint {config.api_url}")
    report(f"admin    {config.api_url}/fleet (the manager; needs the admin token)")
    report(f"tokens   `python -m scripts.bootstrap_aws status --name {names.fleet} "
           "--show-token` prints them")
    return config


def _check_manager_config(wanted: dict[str, Any]) -> None:
    placeholder = aws_stack.resolve(wanted, _Placeholders())
    try:
        config_from_dict(placeholder, source="manager config")
    except ConfigError as exc:
        raise InfraError(str(exc)) from exc


class _Placeholders(dict[str, dict[str, Any]]):
    """Outputs that answer every Ref with a stand-in string (to validate a config
    before the resources it names exist)."""

    def get(self, key: str, default: Any = None) -> dict[str, Any]:  # type: ignore[override]
        return _Stand(key)


class _Stand(dict[str, Any]):
    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def get(self, attr: str, default: Any = None) -> Any:  # type: ignore[override]
        return f"https-pending-{self.key}-{attr}" if attr == "domain" else (
            f"pending-{self.key}-{attr}")


def ca_file_path(config_path: Path) -> Path:
    """Where ``up`` writes the self-signed certificate beside the fleet config."""
    return config_path.with_suffix(".ca.pem")


# ----------------------------------------------------------------------------- status

def status(clients: Clients, name: str, *, show_token: bool = False) -> dict[str, Any]:
    """What exists for the fleet. The tokens' values only with ``show_token``."""
    names = fleet_names(clients, name)
    ctx = Context(clients, names, log.info)
    found = aws_apply.find_all(ctx, _skip_objects(aws_stack.describe(_lookup_params(names))))
    result: dict[str, Any] = {"name": names.fleet, "region": clients.region}
    result["bucket"] = names.bucket if "bucket" in found else None
    if result["bucket"]:
        rules = clients.s3.get_bucket_lifecycle_configuration(Bucket=names.bucket)["Rules"]
        result["result_days"] = next(
            (r["Expiration"]["Days"] for r in rules if r.get("ID") == "expire-results"), None)
    result["security_groups"] = {role: (found.get(key) or {}).get("id") for key, role in (
        ("alb_sg", "alb"), ("manager_sg", "manager"), ("worker_sg", "workers"))}
    result["iam_roles"] = {who: names_ if key in found else None for key, who, names_ in (
        ("worker_role", "workers", names.role), ("manager_role", "manager",
                                                 names.manager_role))}
    result["iam_role"] = result["iam_roles"]["workers"]
    result["instance_profile"] = (found.get("worker_profile") or {}).get("arn")
    for key, field in (("api_token", "token_parameter"),
                       ("admin_token", "admin_token_parameter")):
        parameter = found.get(key)
        result[field] = ({"name": parameter["name"], "type": parameter["type"],
                          "version": parameter.get("version")} if parameter else None)
    if show_token:
        if result["token_parameter"] is None:
            raise InfraError(f"fleet {name} has no token parameter (made with --no-token?)")
        result["token"] = read_token_set(clients, names).current
        if result["admin_token_parameter"]:
            result["admin_token"] = read_token_set(
                clients, names, names.admin_token_parameter).current
    lb = found.get("load_balancer")
    result["load_balancer"] = ({"arn": lb["arn"], "dns": lb["dns"], "state": lb["state"]}
                               if lb else None)
    result["listeners"] = [] if not lb else [
        {"port": lst["Port"], "protocol": lst["Protocol"],
         "action": lst["DefaultActions"][0]["Type"] if lst.get("DefaultActions") else "-",
         "certificates": [c["CertificateArn"] for c in lst.get("Certificates", [])],
         "ssl_policy": lst.get("SslPolicy"),
         "rules": _rules(clients, lst["ListenerArn"])}
        for lst in paginate(clients.elbv2, "describe_listeners", "Listeners",
                            LoadBalancerArn=lb["arn"])]
    result["certificates"] = [
        {"arn": c["CertificateArn"], "domain": c.get("DomainName"),
         "not_after": c["NotAfter"].isoformat() if c.get("NotAfter") else None}
        for c in fleet_certificates(clients, names)]
    https = any(lst["protocol"] == "HTTPS" for lst in result["listeners"])
    result["endpoint"] = f"{'https' if https else 'http'}://{lb['dns']}" if lb else None
    result["admin_endpoint"] = f"{result['endpoint']}/fleet" if lb else None
    tg_arn = (found.get("target_group") or {}).get("arn")
    result["target_group"] = tg_arn
    health = _target_health(clients, tg_arn)
    result["instances"] = [
        {"id": i["InstanceId"], "state": i["State"]["Name"], "type": i["InstanceType"],
         "public_ip": i.get("PublicIpAddress"), "private_ip": i.get("PrivateIpAddress"),
         "launched_at": i["LaunchTime"].isoformat(),
         "target": health.pop(i["InstanceId"], {"state": "unregistered", "reason": ""})}
        for i in fleet_instances(clients, name)]
    # Targets still registered but no longer (or never) ours to see as instances.
    result["other_targets"] = health
    lease = None
    if result["bucket"]:
        key, ttl_s = _lease_settings(clients, names.bucket)
        lease = manager_status(clients, names.bucket, key, ttl_s=ttl_s)
    result["manager"] = lease
    result["manager_group"] = _manager_group(clients, names, found)
    return result


def _lease_settings(clients: Clients, bucket: str) -> tuple[str, float | None]:
    """The lease key and TTL the manager runs with, from its config in the bucket (the
    defaults when there is none or it cannot be read)."""
    try:
        body = clients.s3.get_object(Bucket=bucket, Key=aws_stack.MANAGER_CONFIG_KEY)[
            "Body"].read()
        data = json.loads(body)
        return str(data.get("lease_key") or DEFAULT_LEASE_KEY), float(data["lease_ttl_s"])
    except Exception as exc:  # noqa: BLE001 - status reports what it can
        log.info("manager config not readable (%s); lease defaults assumed", exc)
        return DEFAULT_LEASE_KEY, None


def _skip_objects(resources: tuple[aws_stack.Resource, ...]) -> list[aws_stack.Resource]:
    # Reading the manager's bundle back tells status nothing.
    return [r for r in resources if r.kind != "s3_object"]


def _rules(clients: Clients, listener_arn: str) -> list[dict[str, Any]]:
    out = []
    for rule in clients.elbv2.describe_rules(ListenerArn=listener_arn)["Rules"]:
        if rule.get("IsDefault"):
            continue
        paths = [v for c in rule.get("Conditions", []) for v in (
            c.get("PathPatternConfig", {}).get("Values") or c.get("Values") or [])]
        targets = [a.get("TargetGroupArn") for a in rule.get("Actions", [])]
        out.append({"paths": paths, "target_groups": targets})
    return out


def _target_health(clients: Clients, tg_arn: str | None) -> dict[str, dict[str, str]]:
    health: dict[str, dict[str, str]] = {}
    if tg_arn:
        for desc in clients.elbv2.describe_target_health(
                TargetGroupArn=tg_arn)["TargetHealthDescriptions"]:
            state = desc["TargetHealth"]
            health[desc["Target"]["Id"]] = {"state": state.get("State", "unknown"),
                                            "reason": state.get("Reason", "")}
    return health


def _manager_group(clients: Clients, names: Names, found: dict[str, Any]
                   ) -> dict[str, Any] | None:
    """The manager's Auto Scaling group: its size and instance(s), with each one's
    health as the manager target group (the ALB's /fleet/ping check) sees it."""
    group = (found.get("manager_group") or {}).get("group")
    if group is None:
        return None
    health = _target_health(clients, (found.get("manager_target_group") or {}).get("arn"))
    return {"name": group["AutoScalingGroupName"], "min": group["MinSize"],
            "max": group["MaxSize"], "desired": group["DesiredCapacity"],
            "instances": [{"id": i["InstanceId"], "lifecycle": i.get("LifecycleState"),
                           "health": i.get("HealthStatus"),
                           "target": health.get(i["InstanceId"], {}).get("state",
                                                                         "unregistered")}
                          for i in group.get("Instances", [])]}


def manager_status(clients: Clients, bucket: str, key: str = DEFAULT_LEASE_KEY,
                   now: float | None = None, ttl_s: float | None = None
                   ) -> dict[str, Any] | None:
    """Who manages the fleet, from the lease object the managers share: the holder
    (``host:pid:id``), since when, and whether its lease is still live (a live holder
    renews it every cycle, so ``expires_at`` in the future means it ran a cycle
    recently). None when no manager ever ran."""
    try:
        body = clients.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:
        if aws_apply.error_code(exc) in ("NoSuchKey", "404"):
            return None
        raise
    record = LeaseRecord.parse(body)
    if record is None:
        return {"holder": None, "active": False, "acquired_at": None, "expires_at": None,
                "last_cycle": None}
    now = time.time() if now is None else now
    ttl_s = AwsFleetConfig.__dataclass_fields__["lease_ttl_s"].default if ttl_s is None \
        else ttl_s
    iso = lambda t: dt.datetime.fromtimestamp(t, dt.UTC).isoformat() if t else None  # noqa: E731
    return {"holder": record.holder or None, "active": record.expires_at > now,
            "acquired_at": iso(record.acquired_at), "expires_at": iso(record.expires_at),
            # The lease is renewed once a cycle, for ttl_s each time.
            "last_cycle": iso(record.expires_at - ttl_s)}


def format_status(info: dict[str, Any]) -> str:
    lines = [f"fleet {info['name']} in {info['region']}"]
    lines.append(f"  bucket            {info['bucket'] or '-'}"
                 + (f" (results expire after {info['result_days']} days)"
                    if info.get("result_days") else ""))
    for role, group in info["security_groups"].items():
        lines.append(f"  security group    {group or '-'} ({role})")
    for who, role in info.get("iam_roles", {}).items():
        lines.append(f"  IAM role          {role or '-'} ({who})")
    lines.append(f"  instance profile  {info['instance_profile'] or '-'}")
    token = info.get("token_parameter")
    lines.append(f"  token parameter   {token['name']} ({token['type']}, version "
                 f"{token['version']})" if token else "  token parameter   - (no token: public)")
    admin = info.get("admin_token_parameter")
    lines.append(f"  admin token param {admin['name']} ({admin['type']}, version "
                 f"{admin['version']})" if admin else "  admin token param -")
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
        for rule in lst.get("rules", []):
            lines.append(f"    rule            {' '.join(rule['paths'])} -> manager")
    if info.get("endpoint"):
        lines.append(f"  endpoint          {info['endpoint']}")
        lines.append(f"  admin endpoint    {info['admin_endpoint']}")
    if "token" in info:
        lines.append(f"  token             {info['token']}")
        lines.append("                    (API token: the app's and the CLI's --token)")
    if "admin_token" in info:
        lines.append(f"  admin token       {info['admin_token']}")
        lines.append("                    (admin token: the app's Fleet view, /fleet)")
    group = info.get("manager_group")
    if group is None:
        lines.append("  manager group     -")
    else:
        lines.append(f"  manager group     {group['name']} ({group['min']}/{group['desired']}/"
                     f"{group['max']})")
        for inst in group["instances"]:
            lines.append(f"    {inst['id']}  {inst['lifecycle'] or '-':<13} "
                         f"{inst['health'] or '-':<10} target {inst['target']}")
    manager = info.get("manager")
    if manager is None:
        lines.append("  manager           - (none has run yet: the manager instance takes "
                     "a few minutes to start)")
    else:
        state = ("active, lease until " + str(manager["expires_at"]) if manager["active"]
                 else "not running (lease expired)")
        lines.append(f"  manager           {manager['holder'] or '-'} ({state}; since "
                     f"{manager['acquired_at'] or '-'}; last cycle "
                     f"{manager.get('last_cycle') or '-'})")
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
    """Delete the fleet: the manager's group first (so nothing launches any more), then
    every instance tagged for the fleet, then the description in reverse order, the key
    pair the manager imported and the fleet's certificates."""
    names = fleet_names(clients, name)
    ctx = Context(clients, names, report, timeout=timeout)
    resources = aws_stack.describe(_lookup_params(names))
    aws_apply.destroy(ctx, [r for r in resources if r.key == "manager_group"])

    instances = [i["InstanceId"] for i in (fleet_instances(clients, name)
                                           + fleet_instances(clients, name, MANAGER_OF_TAG_KEY))]
    if instances:
        clients.ec2.terminate_instances(InstanceIds=instances)
        report(f"terminating {len(instances)} instance(s): {', '.join(instances)}")
        clients.ec2.get_waiter("instance_terminated").wait(
            InstanceIds=instances, WaiterConfig={"Delay": 5, "MaxAttempts": int(timeout / 5)})
        report("deleted  instances")

    aws_apply.destroy(ctx, resources)
    aws_apply.remove_unused_certificates(ctx, keep=None)
    for key in _fleet_key_pairs(clients, names):
        clients.ec2.delete_key_pair(KeyName=key)
        report(f"deleted  key pair {key}")
    report(f"fleet {name}: nothing tagged {aws_stack.FLEET_TAG_KEY}={name} is left")


def _fleet_key_pairs(clients: Clients, names: Names) -> Iterator[str]:
    """The key pair the manager imported: tagged for the fleet, or bearing the fleet's
    derived name (``imgf-NAME``, which nothing else of ours uses)."""
    seen = set()
    # DescribeKeyPairs has no paginator; the filters keep the answers to our one key.
    for filters in (fleet_filter(names.fleet),
                    [{"Name": "key-name", "Values": [names.key_pair]}]):
        for pair in clients.ec2.describe_key_pairs(Filters=filters)["KeyPairs"]:
            if pair["KeyName"] not in seen:
                seen.add(pair["KeyName"])
                yield pair["KeyName"]


def forget_local_files(config_path: Path, name: str, report: Report) -> None:
    """After ``down``: the config names resources that are gone."""
    if not config_path.exists():
        return
    try:
        config = load_config(config_path)
    except ConfigError:
        return
    if config.name != name:
        return
    ca_file_path(config_path).unlink(missing_ok=True)
    config_path.unlink()
    report(f"removed  {config_path}")
