"""Apply a fleet description (:mod:`fleet.aws.stack`) to AWS: one find / create /
converge / delete mechanism, one handler per resource kind.

``apply`` walks the description in order: a resource that is found (EC2 objects by the
``imagefleet:fleet`` tag and role, named ones by their derived name, then checked for
the tag so a stranger's resource is never adopted) is converged (settings that can drift
are re-applied or corrected), one that is not is created; then the resources marked
absent are deleted, last first, once nothing present refers to them any more. ``destroy``
deletes everything in reverse order after releasing the references between security
groups. Every line of what was done goes to ``report``: ``created``, ``exists``,
``updated``, ``allowed``, ``revoked``, ``deleted``.

Waiters and polling are used here (a one-shot command may block); the reconcile loop
never waits.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fleet.aws.config import FLEET_TAG_KEY, ROLE_TAG_KEY
from fleet.aws.errors import error_code
from fleet.aws.stack import Names, Resource, resolve, substitute, tags
from fleet.tls import certificate_info, needs_new_certificate, self_signed_certificate
from server.backoff import doubling_delays
from server.tokens import TokenSet, TokenSourceError, parse_token_document

log = logging.getLogger(__name__)

Report = Callable[[str], None]
Outputs = dict[str, Any]
# ACM lists only RSA-2048 certificates unless asked for other key types.
ACM_KEY_TYPES = ["RSA_2048", "RSA_3072", "RSA_4096", "EC_prime256v1", "EC_secp384r1"]


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
    autoscaling: Any
    region: str


def make_clients(region: str | None, profile: str | None, endpoint_url: str | None) -> Clients:
    import boto3
    from botocore.config import Config

    session = boto3.Session(profile_name=profile, region_name=region)
    region = session.region_name
    if not region:
        raise InfraError("no AWS region: pass --region or set AWS_REGION / a profile region")
    config = Config(retries={"mode": "standard", "max_attempts": 8}, connect_timeout=10,
                    read_timeout=60)

    def client(service: str) -> Any:
        return session.client(service, region_name=region, endpoint_url=endpoint_url,
                              config=config)

    return Clients(
        ec2=client("ec2"), elbv2=client("elbv2"), s3=client("s3"), iam=client("iam"),
        sts=client("sts"), ssm=client("ssm"), acm=client("acm"),
        autoscaling=client("autoscaling"), region=region)


@dataclass(frozen=True)
class Context:
    clients: Clients
    names: Names
    report: Report
    timeout: float = 900.0
    now: Callable[[], float] = time.time


# ------------------------------------------------------------------------- helpers



def has_fleet_tag(found: Iterable[Mapping[str, str]] | None, fleet: str) -> bool:
    return any(t.get("Key") == FLEET_TAG_KEY and t.get("Value") == fleet
               for t in found or ())


def refuse_stranger(what: str, found: Iterable[Mapping[str, str]] | None,
                    fleet: str) -> None:
    if not has_fleet_tag(found, fleet):
        raise InfraError(f"{what} exists but is not tagged {FLEET_TAG_KEY}={fleet}; "
                         "refusing to adopt or delete it")


def fleet_filter(fleet: str, role: str | None = None) -> list[dict[str, Any]]:
    filters = [{"Name": f"tag:{FLEET_TAG_KEY}", "Values": [fleet]}]
    if role:
        filters.append({"Name": f"tag:{ROLE_TAG_KEY}", "Values": [role]})
    return filters


def paginate(client: Any, operation: str, key: str, **kwargs: Any) -> Iterator[Any]:
    for page in client.get_paginator(operation).paginate(**kwargs):
        yield from page.get(key, [])


def poll(what: str, attempt: Callable[[], bool], timeout: float, first_delay: float = 1.0,
         max_delay: float = 15.0) -> None:
    """Call ``attempt`` until it returns True, backing off, or raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    delays = doubling_delays(first_delay, max_delay)
    while not attempt():
        delay = next(delays)
        if time.monotonic() + delay > deadline:
            raise InfraError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(delay)


def retry_in_use(what: str, call: Callable[[], Any], codes: tuple[str, ...],
                 timeout: float) -> None:
    def attempt() -> bool:
        try:
            call()
        except Exception as exc:
            if error_code(exc) in codes:
                log.info("%s still in use (%s); retrying", what, error_code(exc))
                return False
            raise
        return True

    poll(f"{what} to be deletable", attempt, timeout, first_delay=2.0)


def _iam_get(call: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    try:
        return call()
    except Exception as exc:
        if error_code(exc) == "NoSuchEntity":
            return None
        raise


def _iam_tags(res: Resource, fleet: str) -> list[dict[str, str]]:
    return tags(fleet, res.role, name=False)


def _as_list(value: Any) -> list[Any]:
    return [value] if isinstance(value, str) else list(value or [])


# ------------------------------------------------------------------------ handlers

class Handler(Protocol):
    def find(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs | None: ...
    def create(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs: ...
    def converge(self, ctx: Context, res: Resource, props: dict[str, Any],
                 found: Outputs) -> Outputs: ...
    def delete(self, ctx: Context, res: Resource, found: Outputs) -> None: ...


class BucketHandler:
    what = "bucket"

    def find(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs | None:
        s3 = ctx.clients.s3
        try:
            s3.head_bucket(Bucket=res.name)
        except Exception as exc:
            if error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                return None
            raise
        try:
            found = s3.get_bucket_tagging(Bucket=res.name)["TagSet"]
        except Exception as exc:
            if error_code(exc) != "NoSuchTagSet":
                raise
            found = []
        refuse_stranger(f"bucket {res.name}", found, ctx.names.fleet)
        return {"id": res.name, "name": res.name}

    def create(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs:
        s3 = ctx.clients.s3
        kwargs: dict[str, Any] = {"Bucket": res.name}
        if ctx.clients.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": ctx.clients.region}
        s3.create_bucket(**kwargs)
        s3.get_waiter("bucket_exists").wait(Bucket=res.name,
                                            WaiterConfig={"Delay": 2, "MaxAttempts": 30})
        s3.put_bucket_tagging(Bucket=res.name,
                              Tagging={"TagSet": tags(ctx.names.fleet, res.role)})
        return self.converge(ctx, res, props, {"id": res.name, "name": res.name})

    def converge(self, ctx: Context, res: Resource, props: dict[str, Any],
                 found: Outputs) -> Outputs:
        # Re-applied on every run: cheap, idempotent, and repairs drift.
        s3, bucket = ctx.clients.s3, res.name
        s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={
            "BlockPublicAcls": True, "IgnorePublicAcls": True,
            "BlockPublicPolicy": True, "RestrictPublicBuckets": True})
        s3.put_bucket_ownership_controls(Bucket=bucket, OwnershipControls={
            "Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]})
        s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"},
                       "BucketKeyEnabled": True}]})
        s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={
            "Rules": [
                {"ID": "expire-results", "Status": "Enabled", "Filter": {"Prefix": "results/"},
                 "Expiration": {"Days": props["result_days"]}},
                {"ID": "abort-incomplete-uploads", "Status": "Enabled",
                 "Filter": {"Prefix": ""},
                 "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}},
            ]})
        return found

    def delete(self, ctx: Context, res: Resource, found: Outputs) -> None:
        s3 = ctx.clients.s3
        # Not something a description can say: a bucket must be empty to be deleted.
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=res.name):
            objects = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                       for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
            if objects:
                s3.delete_objects(Bucket=res.name, Delete={"Objects": objects, "Quiet": True})
        s3.delete_bucket(Bucket=res.name)


def _permission(rule: dict[str, Any]) -> dict[str, Any]:
    perm: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": rule["port"],
                            "ToPort": rule["port"]}
    if rule.get("group"):
        perm["UserIdGroupPairs"] = [{"GroupId": rule["group"],
                                     "Description": rule["description"]}]
    else:
        perm["IpRanges"] = [{"CidrIp": rule["cidr"], "Description": rule["description"]}]
    return perm


def _singles(permissions: Iterable[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Each (protocol, from, to, source) a group's rules allow, one per source."""
    out = []
    for perm in permissions:
        key = (perm.get("IpProtocol"), perm.get("FromPort"), perm.get("ToPort"))
        out += [(*key, "cidr", r["CidrIp"]) for r in perm.get("IpRanges", [])]
        out += [(*key, "group", p["GroupId"]) for p in perm.get("UserIdGroupPairs", [])]
        out += [(*key, "ipv6", r["CidrIpv6"]) for r in perm.get("Ipv6Ranges", [])]
        out += [(*key, "prefix", p["PrefixListId"]) for p in perm.get("PrefixListIds", [])]
    return out


def _single_permission(single: tuple[Any, ...]) -> dict[str, Any]:
    proto, lo, hi, kind, source = single
    field_, item = {"cidr": ("IpRanges", "CidrIp"), "group": ("UserIdGroupPairs", "GroupId"),
                    "ipv6": ("Ipv6Ranges", "CidrIpv6"),
                    "prefix": ("PrefixListIds", "PrefixListId")}[kind]
    perm: dict[str, Any] = {"IpProtocol": proto, field_: [{item: source}]}
    if lo is not None:
        perm.update(FromPort=lo, ToPort=hi)
    return perm


class SecurityGroupHandler:
    what = "security group"

    def find(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs | None:
        groups = list(paginate(ctx.clients.ec2, "describe_security_groups", "SecurityGroups",
                               Filters=fleet_filter(ctx.names.fleet, res.role)))
        return {"id": groups[0]["GroupId"]} if groups else None

    def create(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs:
        group_id = ctx.clients.ec2.create_security_group(
            GroupName=res.name, Description=props["description"], VpcId=props["vpc_id"],
            TagSpecifications=[{"ResourceType": "security-group",
                                "Tags": tags(ctx.names.fleet, res.role)}])["GroupId"]
        return self.converge(ctx, res, props, {"id": group_id})

    def converge(self, ctx: Context, res: Resource, props: dict[str, Any],
                 found: Outputs) -> Outputs:
        """Allow what the description names and revoke the rest: a group opens only what
        is listened on, to whom it is meant for (a changed --allowed-cidr or
        --insecure-http closes the rest)."""
        ec2, group_id = ctx.clients.ec2, found["id"]
        group = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
        have = set(_singles(group.get("IpPermissions", [])))
        wanted = [_permission(rule) for rule in props["ingress"]]
        missing = [perm for perm in wanted if not set(_singles([perm])) <= have]
        if missing:
            try:
                ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=missing)
            except Exception as exc:
                if error_code(exc) != "InvalidPermission.Duplicate":
                    raise
            for perm in missing:
                source = (perm.get("IpRanges") or perm.get("UserIdGroupPairs"))[0]
                ctx.report(f"allowed  {group_id} tcp/{perm['FromPort']} from "
                           f"{source.get('CidrIp') or source.get('GroupId')}")
        extra = sorted(have - set(_singles(wanted)), key=str)
        if extra:
            ec2.revoke_security_group_ingress(
                GroupId=group_id, IpPermissions=[_single_permission(s) for s in extra])
            for single in extra:
                ctx.report(f"revoked  {group_id} tcp/{single[1]} from {single[4]} "
                           "(not listened on for it)")
        return found

    def release(self, ctx: Context, res: Resource, found: Outputs) -> None:
        """Drop every ingress rule, so no group still refers to another on deletion."""
        ec2 = ctx.clients.ec2
        group = ec2.describe_security_groups(GroupIds=[found["id"]])["SecurityGroups"][0]
        if group.get("IpPermissions"):
            ec2.revoke_security_group_ingress(GroupId=found["id"],
                                              IpPermissions=group["IpPermissions"])

    def delete(self, ctx: Context, res: Resource, found: Outputs) -> None:
        # Network interfaces of a deleted ALB or instance linger for a minute or two.
        retry_in_use(f"security group {found['id']}",
                     lambda: ctx.clients.ec2.delete_security_group(GroupId=found["id"]),
                     ("DependencyViolation",), ctx.timeout)


class SecureParameterHandler:
    """A token as an SSM SecureString holding a token document (server.tokens). Its
    value is made here, never passed around: created fresh, kept, or rotated (the old
    token stays accepted for ``overlap_s`` seconds)."""

    what = "token parameter"

    def find(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs | None:
        ssm = ctx.clients.ssm
        found = ssm.describe_parameters(ParameterFilters=[
            {"Key": "Name", "Option": "Equals", "Values": [res.name]}])["Parameters"]
        if not found:
            return None
        refuse_stranger(f"SSM parameter {res.name}", ssm.list_tags_for_resource(
            ResourceType="Parameter", ResourceId=res.name)["TagList"], ctx.names.fleet)
        return {"id": res.name, "name": res.name, "type": found[0]["Type"],
                "version": found[0].get("Version")}

    def create(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs:
        ctx.clients.ssm.put_parameter(
            Name=res.name, Type="SecureString", Value=TokenSet(new_token()).to_json(),
            Description=props["description"], Tags=_iam_tags(res, ctx.names.fleet))
        return {"id": res.name, "name": res.name, "type": "SecureString"}

    def converge(self, ctx: Context, res: Resource, props: dict[str, Any],
                 found: Outputs) -> Outputs:
        if props.get("rotate"):
            overlap_s = float(props["overlap_s"])
            rotated = read_token_set(ctx.clients, res.name).rotated(
                new_token(), ctx.now(), overlap_s)
            ctx.clients.ssm.put_parameter(Name=res.name, Type="SecureString",
                                          Value=rotated.to_json(), Overwrite=True)
            ctx.report(f"rotated  {self.what} {res.name}: the previous token is accepted "
                       f"for {overlap_s:.0f} s more (`status --show-token` prints the new one)")
        return found

    def delete(self, ctx: Context, res: Resource, found: Outputs) -> None:
        ctx.clients.ssm.delete_parameter(Name=res.name)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def read_token_set(clients: Clients, parameter: str) -> TokenSet:
    value = clients.ssm.get_parameter(Name=parameter, WithDecryption=True)["Parameter"]["Value"]
    try:
        return parse_token_document(value, f"SSM parameter {parameter}")
    except TokenSourceError as exc:
        raise InfraError(f"{exc}; run `up --rotate-token` to write a fresh one") from exc


class IamRoleHandler:
    what = "IAM role"

    def find(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs | None:
        role = _iam_get(lambda: ctx.clients.iam.get_role(RoleName=res.name))
        if role is None:
            return None
        if not has_fleet_tag(role["Role"].get("Tags", []), ctx.names.fleet):
            raise InfraError(f"IAM role {res.name} exists but is not tagged "
                             f"{FLEET_TAG_KEY}={ctx.names.fleet}; refusing to adopt it")
        return {"id": res.name, "name": res.name, "arn": role["Role"]["Arn"]}

    def create(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs:
        role = ctx.clients.iam.create_role(
            RoleName=res.name, Path="/imagefleet/", Tags=_iam_tags(res, ctx.names.fleet),
            Description=props["description"],
            AssumeRolePolicyDocument=json.dumps(props["trust"]))["Role"]
        return self.converge(ctx, res, props,
                             {"id": res.name, "name": res.name, "arn": role["Arn"]})

    def converge(self, ctx: Context, res: Resource, props: dict[str, Any],
                 found: Outputs) -> Outputs:
        iam = ctx.clients.iam
        wanted = {name: substitute(doc, props.get("substitute") or {})
                  for name, doc in props["policies"].items()}
        for name, doc in wanted.items():
            iam.put_role_policy(RoleName=res.name, PolicyName=name,
                                PolicyDocument=json.dumps(doc))
        for name in list(paginate(iam, "list_role_policies", "PolicyNames",
                                  RoleName=res.name)):
            if name not in wanted:
                iam.delete_role_policy(RoleName=res.name, PolicyName=name)
                ctx.report(f"deleted  IAM policy {name} of {res.name} (not wanted)")
        return found

    def delete(self, ctx: Context, res: Resource, found: Outputs) -> None:
        iam = ctx.clients.iam
        for name in list(paginate(iam, "list_role_policies", "PolicyNames",
                                  RoleName=res.name)):
            iam.delete_role_policy(RoleName=res.name, PolicyName=name)
        for policy in list(paginate(iam, "list_attached_role_policies", "AttachedPolicies",
                                    RoleName=res.name)):
            iam.detach_role_policy(RoleName=res.name, PolicyArn=policy["PolicyArn"])
        iam.delete_role(RoleName=res.name)


class InstanceProfileHandler:
    what = "instance profile"

    def find(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs | None:
        profile = _iam_get(lambda: ctx.clients.iam.get_instance_profile(
            InstanceProfileName=res.name))
        if profile is None:
            return None
        profile = profile["InstanceProfile"]
        return {"id": res.name, "name": res.name, "arn": profile["Arn"],
                "roles": [r["RoleName"] for r in profile.get("Roles", [])]}

    def create(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs:
        iam = ctx.clients.iam
        profile = iam.create_instance_profile(
            InstanceProfileName=res.name, Path="/imagefleet/",
            Tags=_iam_tags(res, ctx.names.fleet))["InstanceProfile"]
        iam.get_waiter("instance_profile_exists").wait(
            InstanceProfileName=res.name, WaiterConfig={"Delay": 2, "MaxAttempts": 30})
        return self.converge(ctx, res, props, {"id": res.name, "name": res.name,
                                               "arn": profile["Arn"], "roles": []})

    def converge(self, ctx: Context, res: Resource, props: dict[str, Any],
                 found: Outputs) -> Outputs:
        if props["role"] not in found.get("roles", []):
            ctx.clients.iam.add_role_to_instance_profile(InstanceProfileName=res.name,
                                                         RoleName=props["role"])
        return {**found, "roles": [props["role"]]}

    def delete(self, ctx: Context, res: Resource, found: Outputs) -> None:
        iam = ctx.clients.iam
        for role in found.get("roles", []):
            iam.remove_role_from_instance_profile(InstanceProfileName=res.name, RoleName=role)
        iam.delete_instance_profile(InstanceProfileName=res.name)


def _check_elb_tag(ctx: Context, arn: str) -> None:
    descriptions = ctx.clients.elbv2.describe_tags(ResourceArns=[arn])["TagDescriptions"]
    refuse_stranger(arn, descriptions[0]["Tags"] if descriptions else [], ctx.names.fleet)


def _attributes(wanted: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in wanted.items()]


class TargetGroupHandler:
    what = "target group"

    def find(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs | None:
        try:
            groups = ctx.clients.elbv2.describe_target_groups(Names=[res.name])["TargetGroups"]
        except Exception as exc:
            if error_code(exc) == "TargetGroupNotFound":
                return None
            raise
        arn = groups[0]["TargetGroupArn"]
        _check_elb_tag(ctx, arn)
        return {"id": arn, "arn": arn}

    def create(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs:
        arn = ctx.clients.elbv2.create_target_group(
            Name=res.name, Protocol=props["Protocol"], Port=props["Port"],
            VpcId=props["VpcId"], TargetType="instance",
            Tags=tags(ctx.names.fleet, res.role), **props["health_check"],
        )["TargetGroups"][0]["TargetGroupArn"]
        self._attributes(ctx, arn, props)
        return {"id": arn, "arn": arn}

    def converge(self, ctx: Context, res: Resource, props: dict[str, Any],
                 found: Outputs) -> Outputs:
        ctx.clients.elbv2.modify_target_group(TargetGroupArn=found["arn"],
                                              **props["health_check"])
        self._attributes(ctx, found["arn"], props)
        return found

    def _attributes(self, ctx: Context, arn: str, props: dict[str, Any]) -> None:
        ctx.clients.elbv2.modify_target_group_attributes(
            TargetGroupArn=arn, Attributes=_attributes(props["attributes"]))

    def delete(self, ctx: Context, res: Resource, found: Outputs) -> None:
        retry_in_use(f"target group {found['arn']}",
                     lambda: ctx.clients.elbv2.delete_target_group(TargetGroupArn=found["arn"]),
                     ("ResourceInUse",), ctx.timeout)


class LoadBalancerHandler:
    what = "load balancer"

    def find(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs | None:
        try:
            lbs = ctx.clients.elbv2.describe_load_balancers(Names=[res.name])["LoadBalancers"]
        except Exception as exc:
            if error_code(exc) == "LoadBalancerNotFound":
                return None
            raise
        _check_elb_tag(ctx, lbs[0]["LoadBalancerArn"])
        return self._outputs(lbs[0])

    @staticmethod
    def _outputs(lb: dict[str, Any]) -> Outputs:
        return {"id": lb["LoadBalancerArn"], "arn": lb["LoadBalancerArn"],
                "dns": lb["DNSName"], "state": lb.get("State", {}).get("Code")}

    def create(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs:
        elbv2 = ctx.clients.elbv2
        lb = elbv2.create_load_balancer(
            Name=res.name, Subnets=props["subnets"], SecurityGroups=props["security_groups"],
            Scheme="internet-facing", Type="application", IpAddressType="ipv4",
            Tags=tags(ctx.names.fleet, res.role))["LoadBalancers"][0]
        elbv2.get_waiter("load_balancer_available").wait(
            LoadBalancerArns=[lb["LoadBalancerArn"]],
            WaiterConfig={"Delay": 10, "MaxAttempts": 60})
        return self.converge(ctx, res, props, self._outputs(lb))

    def converge(self, ctx: Context, res: Resource, props: dict[str, Any],
                 found: Outputs) -> Outputs:
        ctx.clients.elbv2.modify_load_balancer_attributes(
            LoadBalancerArn=found["arn"], Attributes=_attributes(props["attributes"]))
        return found

    def delete(self, ctx: Context, res: Resource, found: Outputs) -> None:
        elbv2 = ctx.clients.elbv2
        for listener in list(paginate(elbv2, "describe_listeners", "Listeners",
                                      LoadBalancerArn=found["arn"])):
            elbv2.delete_listener(ListenerArn=listener["ListenerArn"])
        elbv2.delete_load_balancer(LoadBalancerArn=found["arn"])
        elbv2.get_waiter("load_balancers_deleted").wait(
            LoadBalancerArns=[found["arn"]],
            WaiterConfig={"Delay": 5, "MaxAttempts": int(ctx.timeout / 5)})


def fleet_certificates(clients: Clients, names: Names) -> list[dict[str, Any]]:
    """ACM certificates tagged for the fleet (the self-signed ones ``up`` imported),
    newest first. A certificate the admin passed with --certificate-arn is not tagged
    and is never touched."""
    found = []
    for summary in paginate(clients.acm, "list_certificates", "CertificateSummaryList",
                            Includes={"keyTypes": ACM_KEY_TYPES}):
        arn = summary["CertificateArn"]
        if has_fleet_tag(clients.acm.list_tags_for_certificate(CertificateArn=arn).get(
                "Tags", []), names.fleet):
            found.append(summary)
    found.sort(key=lambda c: str(c.get("ImportedAt") or c.get("CreatedAt") or ""),
               reverse=True)
    return found


def remove_unused_certificates(ctx: Context, keep: str | None) -> None:
    """Delete the fleet's certificates other than ``keep`` (all of them for ``down``);
    ACM refuses while a listener still uses one, which lags a deleted listener a little."""
    for summary in fleet_certificates(ctx.clients, ctx.names):
        arn = summary["CertificateArn"]
        if arn == keep:
            continue
        retry_in_use(f"certificate {arn}",
                     lambda a=arn: ctx.clients.acm.delete_certificate(CertificateArn=a),
                     ("ResourceInUseException",), ctx.timeout)
        ctx.report(f"deleted  certificate {arn}")


class CertificateHandler:
    """The admin's certificate (checked to be issued), or the fleet's self-signed one for
    the load balancer's DNS name, imported into ACM: an SDK step because the name exists
    only once the load balancer does. Reused while it covers the name and is valid for a
    while yet, else made anew (``up`` removes the old one once no listener uses it)."""

    what = "certificate"

    def find(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs | None:
        if props.get("arn"):
            return self._admins(ctx, props["arn"], props["domain"])
        now = dt.datetime.now(dt.UTC)
        for summary in fleet_certificates(ctx.clients, ctx.names):
            pem = ctx.clients.acm.get_certificate(
                CertificateArn=summary["CertificateArn"])["Certificate"]
            if props.get("domain") is None or not needs_new_certificate(
                    pem, props["domain"], now):
                return {"id": summary["CertificateArn"], "arn": summary["CertificateArn"],
                        "pem": pem, "domain": props.get("domain"), "self_signed": True}
        return None

    def _admins(self, ctx: Context, arn: str, lb_dns: str) -> Outputs:
        try:
            described = ctx.clients.acm.describe_certificate(CertificateArn=arn)["Certificate"]
        except Exception as exc:
            raise InfraError(f"--certificate-arn {arn}: {exc}") from exc
        if described.get("Status") != "ISSUED":
            raise InfraError(f"--certificate-arn {arn} is {described.get('Status')}, "
                             "not ISSUED")
        domain = described.get("DomainName") or lb_dns
        return {"id": arn, "arn": arn, "pem": None, "self_signed": False,
                "domain": lb_dns if domain.startswith("*") else domain}

    def create(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs:
        made = self_signed_certificate((props["domain"],))
        arn = ctx.clients.acm.import_certificate(
            Certificate=made.certificate_pem.encode(),
            PrivateKey=made.private_key_pem.encode(), Tags=_iam_tags(res, ctx.names.fleet),
        )["CertificateArn"]
        log.info("self-signed certificate for %s, valid until %s", props["domain"],
                 certificate_info(made.certificate_pem).not_after.date())
        return {"id": arn, "arn": arn, "pem": made.certificate_pem,
                "domain": props["domain"], "self_signed": True}

    def converge(self, ctx: Context, res: Resource, props: dict[str, Any],
                 found: Outputs) -> Outputs:
        return found

    def delete(self, ctx: Context, res: Resource, found: Outputs) -> None:
        remove_unused_certificates(ctx, keep=None)


def _normal_actions(actions: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    out = []
    for a in actions:
        redirect = a.get("RedirectConfig") or {}
        fixed = a.get("FixedResponseConfig") or {}
        out.append((a.get("Type"), a.get("TargetGroupArn"), redirect.get("Protocol"),
                    str(redirect.get("Port") or ""), redirect.get("StatusCode"),
                    str(fixed.get("StatusCode") or ""), fixed.get("MessageBody")))
    return out


class ListenerHandler:
    what = "listener"

    def find(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs | None:
        if not props.get("load_balancer"):
            return None
        for listener in paginate(ctx.clients.elbv2, "describe_listeners", "Listeners",
                                 LoadBalancerArn=props["load_balancer"]):
            if listener["Port"] == props["Port"]:
                return {"id": listener["ListenerArn"], "arn": listener["ListenerArn"],
                        "listener": listener}
        return None

    @staticmethod
    def _settings(props: dict[str, Any]) -> dict[str, Any]:
        keys = ("Port", "Protocol", "DefaultActions", "SslPolicy", "Certificates")
        return {k: props[k] for k in keys if k in props}

    def create(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs:
        arn = ctx.clients.elbv2.create_listener(
            LoadBalancerArn=props["load_balancer"], Tags=tags(ctx.names.fleet, res.role),
            **self._settings(props))["Listeners"][0]["ListenerArn"]
        return {"id": arn, "arn": arn}

    def converge(self, ctx: Context, res: Resource, props: dict[str, Any],
                 found: Outputs) -> Outputs:
        listener = found["listener"]
        differs = (_normal_actions(listener.get("DefaultActions", []))
                   != _normal_actions(props["DefaultActions"])
                   or listener.get("Protocol") != props["Protocol"])
        if props["Protocol"] == "HTTPS":
            certs = [c.get("CertificateArn") for c in listener.get("Certificates", [])]
            differs = differs or listener.get("SslPolicy") != props["SslPolicy"] or (
                certs != [props["Certificates"][0]["CertificateArn"]])
        if differs:
            ctx.clients.elbv2.modify_listener(ListenerArn=found["arn"],
                                              **self._settings(props))
            ctx.report(f"updated  listener :{props['Port']} {props['Protocol']} "
                       f"{found['arn']}")
        return {"id": found["arn"], "arn": found["arn"]}

    def delete(self, ctx: Context, res: Resource, found: Outputs) -> None:
        ctx.clients.elbv2.delete_listener(ListenerArn=found["arn"])


class ListenerRuleHandler:
    """A rule on the forwarding listener, found by its path condition: the admin paths
    forwarded to the manager, or the metrics paths answered by the load balancer itself."""

    what = "listener rule"

    def find(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs | None:
        if not props.get("listener"):
            return None
        for rule in ctx.clients.elbv2.describe_rules(ListenerArn=props["listener"])["Rules"]:
            paths = [v for c in rule.get("Conditions", []) if c.get("Field") == "path-pattern"
                     for v in (c.get("PathPatternConfig", {}).get("Values")
                               or c.get("Values") or [])]
            if sorted(paths) == sorted(props["paths"]):
                return {"id": rule["RuleArn"], "arn": rule["RuleArn"], "rule": rule}
        return None

    @staticmethod
    def _actions(props: dict[str, Any]) -> list[dict[str, Any]]:
        if "fixed_response" in props:
            return [{"Type": "fixed-response", "FixedResponseConfig": props["fixed_response"]}]
        return [{"Type": "forward", "TargetGroupArn": props["target_group"]}]

    def create(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs:
        arn = ctx.clients.elbv2.create_rule(
            ListenerArn=props["listener"], Priority=props["priority"],
            Conditions=[{"Field": "path-pattern",
                         "PathPatternConfig": {"Values": props["paths"]}}],
            Actions=self._actions(props), Tags=tags(ctx.names.fleet, res.role),
        )["Rules"][0]["RuleArn"]
        return {"id": arn, "arn": arn}

    def converge(self, ctx: Context, res: Resource, props: dict[str, Any],
                 found: Outputs) -> Outputs:
        if _normal_actions(found["rule"].get("Actions", [])) != _normal_actions(
                self._actions(props)):
            ctx.clients.elbv2.modify_rule(RuleArn=found["arn"], Actions=self._actions(props))
            ctx.report(f"updated  listener rule {found['arn']}")
        return {"id": found["arn"], "arn": found["arn"]}

    def delete(self, ctx: Context, res: Resource, found: Outputs) -> None:
        ctx.clients.elbv2.delete_rule(RuleArn=found["arn"])


def _object_body(props: dict[str, Any]) -> bytes:
    if "json" in props:
        return (json.dumps(props["json"], indent=2, sort_keys=True) + "\n").encode()
    return bytes(props["body"])


class S3ObjectHandler:
    """An object in the fleet bucket (the manager's bundle and config), rewritten only
    when its content changed."""

    what = "object"

    def find(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs | None:
        try:
            body = ctx.clients.s3.get_object(Bucket=props["bucket"], Key=res.name)[
                "Body"].read()
        except Exception as exc:
            if error_code(exc) in ("NoSuchKey", "404", "NoSuchBucket"):
                return None
            raise
        return {"id": res.name, "key": res.name, "digest": hashlib.sha256(body).hexdigest()}

    def create(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs:
        body = _object_body(props)
        ctx.clients.s3.put_object(Bucket=props["bucket"], Key=res.name, Body=body,
                                  ContentType=props["content_type"])
        return {"id": res.name, "key": res.name, "digest": hashlib.sha256(body).hexdigest()}

    def converge(self, ctx: Context, res: Resource, props: dict[str, Any],
                 found: Outputs) -> Outputs:
        if hashlib.sha256(_object_body(props)).hexdigest() == found["digest"]:
            return found
        ctx.report(f"updated  object s3://{props['bucket']}/{res.name}")
        return self.create(ctx, res, props)

    def delete(self, ctx: Context, res: Resource, found: Outputs) -> None:
        pass  # the bucket goes with everything in it


class LaunchTemplateHandler:
    """The manager's launch template; a changed description adds a version and makes
    it the default."""

    what = "launch template"

    def find(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs | None:
        ec2 = ctx.clients.ec2
        try:
            found = ec2.describe_launch_templates(LaunchTemplateNames=[res.name])[
                "LaunchTemplates"]
        except Exception as exc:
            if error_code(exc) in ("InvalidLaunchTemplateName.NotFoundException",
                                   "InvalidLaunchTemplateId.NotFound"):
                return None
            raise
        if not found:
            return None
        refuse_stranger(f"launch template {res.name}", found[0].get("Tags"), ctx.names.fleet)
        return {"id": found[0]["LaunchTemplateId"],
                "version": str(found[0]["LatestVersionNumber"])}

    @staticmethod
    def _data(props: dict[str, Any]) -> dict[str, Any]:
        import base64

        data = dict(props["data"])
        data["UserData"] = base64.b64encode(data["UserData"].encode()).decode()
        return data

    @staticmethod
    def _digest(props: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps([props["data"], props.get("config_digest")],
                                         sort_keys=True).encode()).hexdigest()[:16]

    def create(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs:
        made = ctx.clients.ec2.create_launch_template(
            LaunchTemplateName=res.name, LaunchTemplateData=self._data(props),
            VersionDescription=self._digest(props),
            TagSpecifications=[{"ResourceType": "launch-template",
                                "Tags": tags(ctx.names.fleet, res.role)}])["LaunchTemplate"]
        return {"id": made["LaunchTemplateId"], "version": str(made["LatestVersionNumber"])}

    def converge(self, ctx: Context, res: Resource, props: dict[str, Any],
                 found: Outputs) -> Outputs:
        ec2 = ctx.clients.ec2
        latest = ec2.describe_launch_template_versions(
            LaunchTemplateId=found["id"], Versions=[found["version"]])[
            "LaunchTemplateVersions"][0]
        if latest.get("VersionDescription") == self._digest(props):
            return found
        version = ec2.create_launch_template_version(
            LaunchTemplateId=found["id"], LaunchTemplateData=self._data(props),
            VersionDescription=self._digest(props))["LaunchTemplateVersion"]["VersionNumber"]
        ec2.modify_launch_template(LaunchTemplateId=found["id"], DefaultVersion=str(version))
        ctx.report(f"updated  launch template {res.name} (version {version}; the next "
                   "manager instance uses it)")
        return {"id": found["id"], "version": str(version)}

    def delete(self, ctx: Context, res: Resource, found: Outputs) -> None:
        ctx.clients.ec2.delete_launch_template(LaunchTemplateId=found["id"])


class AutoScalingGroupHandler:
    """The manager's group of exactly one: AWS itself replaces a dead manager."""

    what = "auto scaling group"

    def find(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs | None:
        groups = ctx.clients.autoscaling.describe_auto_scaling_groups(
            AutoScalingGroupNames=[res.name])["AutoScalingGroups"]
        if not groups:
            return None
        refuse_stranger(f"auto scaling group {res.name}", groups[0].get("Tags"),
                        ctx.names.fleet)
        return {"id": res.name, "name": res.name, "group": groups[0]}

    def _settings(self, props: dict[str, Any]) -> dict[str, Any]:
        return {"MinSize": props["min"], "MaxSize": props["max"],
                "DesiredCapacity": props["desired"],
                "VPCZoneIdentifier": ",".join(props["subnets"]),
                "LaunchTemplate": {"LaunchTemplateId": props["launch_template"],
                                   "Version": props["version"]},
                "HealthCheckType": props["health_check"],
                "HealthCheckGracePeriod": props["grace_s"]}

    def create(self, ctx: Context, res: Resource, props: dict[str, Any]) -> Outputs:
        group_tags = [{**t, "PropagateAtLaunch": False, "ResourceId": res.name,
                       "ResourceType": "auto-scaling-group"}
                      for t in tags(ctx.names.fleet, res.role)]
        ctx.clients.autoscaling.create_auto_scaling_group(
            AutoScalingGroupName=res.name, TargetGroupARNs=props["target_groups"],
            Tags=group_tags, **self._settings(props))
        return {"id": res.name, "name": res.name}

    def converge(self, ctx: Context, res: Resource, props: dict[str, Any],
                 found: Outputs) -> Outputs:
        group = found["group"]
        have = {"MinSize": group["MinSize"], "MaxSize": group["MaxSize"],
                "DesiredCapacity": group["DesiredCapacity"],
                "VPCZoneIdentifier": group.get("VPCZoneIdentifier"),
                "LaunchTemplate": {
                    "LaunchTemplateId": group.get("LaunchTemplate", {}).get("LaunchTemplateId"),
                    "Version": str(group.get("LaunchTemplate", {}).get("Version"))},
                "HealthCheckType": group.get("HealthCheckType"),
                "HealthCheckGracePeriod": group.get("HealthCheckGracePeriod")}
        wanted = self._settings(props)
        if have != wanted:
            ctx.clients.autoscaling.update_auto_scaling_group(AutoScalingGroupName=res.name,
                                                              **wanted)
            ctx.report(f"updated  auto scaling group {res.name}")
        attached = set(group.get("TargetGroupARNs", []))
        if attached != set(props["target_groups"]):
            ctx.clients.autoscaling.attach_load_balancer_target_groups(
                AutoScalingGroupName=res.name, TargetGroupARNs=props["target_groups"])
        return {"id": res.name, "name": res.name}

    def delete(self, ctx: Context, res: Resource, found: Outputs) -> None:
        autoscaling = ctx.clients.autoscaling
        # ForceDelete terminates the manager instance with the group.
        autoscaling.delete_auto_scaling_group(AutoScalingGroupName=res.name, ForceDelete=True)

        def gone() -> bool:
            return not autoscaling.describe_auto_scaling_groups(
                AutoScalingGroupNames=[res.name])["AutoScalingGroups"]

        poll(f"auto scaling group {res.name} to be deleted", gone, ctx.timeout)


HANDLERS: dict[str, Handler] = {
    "bucket": BucketHandler(),
    "security_group": SecurityGroupHandler(),
    "secure_parameter": SecureParameterHandler(),
    "iam_role": IamRoleHandler(),
    "instance_profile": InstanceProfileHandler(),
    "target_group": TargetGroupHandler(),
    "load_balancer": LoadBalancerHandler(),
    "certificate": CertificateHandler(),
    "listener": ListenerHandler(),
    "listener_rule": ListenerRuleHandler(),
    "s3_object": S3ObjectHandler(),
    "launch_template": LaunchTemplateHandler(),
    "auto_scaling_group": AutoScalingGroupHandler(),
}


def _label(res: Resource, found: Outputs) -> str:
    """How a report line names a resource: its AWS id where it has one of its own."""
    what = getattr(HANDLERS[res.kind], "what", res.kind)
    ident = res.name if res.kind in _NAMED_BY_NAME else (found.get("id") or res.name)
    if res.kind == "security_group":
        return f"{what} {ident} ({res.role})"
    if res.kind == "certificate" and found.get("self_signed"):
        return f"{what} {ident} (self-signed, {found.get('domain')})"
    return f"{what} {ident}"


_NAMED_BY_NAME = ("bucket", "iam_role", "instance_profile", "secure_parameter",
                  "launch_template", "auto_scaling_group", "s3_object")


# ------------------------------------------------------------------------ mechanism

def apply(ctx: Context, resources: Iterable[Resource]) -> dict[str, Outputs]:
    """Make AWS match the description; returns each present resource's outputs."""
    resources = tuple(resources)
    outputs: dict[str, Outputs] = {}
    for res in resources:
        if not res.present:
            continue
        handler = HANDLERS[res.kind]
        props = resolve(res.props, outputs)
        found = handler.find(ctx, res, props)
        if found is None:
            outputs[res.key] = handler.create(ctx, res, props)
            ctx.report(f"created  {_label(res, outputs[res.key])}")
        else:
            outputs[res.key] = handler.converge(ctx, res, props, found)
            ctx.report(f"exists   {_label(res, outputs[res.key])}")
    # What must not exist goes last, last first: nothing present refers to it any more.
    for res in reversed(resources):
        if res.present:
            continue
        handler = HANDLERS[res.kind]
        props = resolve(res.props, outputs)
        found = handler.find(ctx, res, props)
        if found is not None:
            handler.delete(ctx, res, found)
            ctx.report(f"deleted  {_label(res, found)} (not wanted)")
    return outputs


def find_all(ctx: Context, resources: Iterable[Resource]) -> dict[str, Outputs]:
    """What exists of the description, changing nothing."""
    outputs: dict[str, Outputs] = {}
    for res in resources:
        props = resolve(res.props, outputs)
        found = HANDLERS[res.kind].find(ctx, res, props)
        if found is not None:
            outputs[res.key] = found
    return outputs


def destroy(ctx: Context, resources: Iterable[Resource]) -> None:
    """Delete every resource of the description that exists, last first."""
    resources = tuple(resources)
    found = find_all(ctx, resources)
    for res in reversed(resources):
        release = getattr(HANDLERS[res.kind], "release", None)
        if release is not None and res.key in found:
            release(ctx, res, found[res.key])
    for res in reversed(resources):
        if res.key in found:
            HANDLERS[res.kind].delete(ctx, res, found[res.key])
            ctx.report(f"deleted  {_label(res, found[res.key])}")
