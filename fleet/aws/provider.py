"""The AWS provider: EC2 instances behind an ALB target group.

Observe costs a constant number of paginated calls whatever the fleet size: one
``DescribeInstances`` filtered by the fleet tag, one ``DescribeTargetHealth`` for the
target group. Acting:

- ``launch``: ``RunInstances`` with tags at launch, IMDSv2 required, the instance
  profile, and a ``ClientToken`` derived from the launch decision, so a retried call
  (botocore's own retries, or the manager retrying the same decision) never starts a
  second instance. On capacity errors it falls back across the configured instance types
  and subnets before giving up.
- ``bootstrap``: in the background (a worker thread; never awaited by the manager) wait
  for the host keys on the console, SSH in and run ``remote_setup.sh`` (see
  :mod:`fleet.aws.ssh_bootstrap`), then tag the instance ``imagefleet:bootstrapped=true`` so a
  restarted manager adopts it as set up. While it runs the instance is reported
  ``bootstrapping``; the reconcile grace period (which the config keeps above the
  bootstrap timeout) keeps it from being replaced for not being healthy yet. A failed or
  timed-out bootstrap reports the instance ``stopped`` with the reason, so it is
  replaced and counted as a launch failure (backoff).
- ``register`` / ``deregister`` targets; ``terminate`` deregisters if needed, then
  terminates (the reconcile loop only asks for a graceful terminate once the target
  has drained).

Errors map to :class:`TransientProviderError` (capacity, throttling, eventual
consistency, network) or :class:`PermanentProviderError` (permissions, bad AMI, key pair,
subnet or group) with a message that says which and why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fleet.aws.config import FLEET_TAG_KEY, ROLE_TAG_KEY, AwsFleetConfig
from fleet.aws.errors import error_code
from fleet.aws.load_probe import LoadProbe, probe_all, progress_times
from fleet.model import Health, Instance, InstanceState
from fleet.providers.base import PermanentProviderError, TransientProviderError

log = logging.getLogger(__name__)

BOOTSTRAPPED_TAG_KEY = "imagefleet:bootstrapped"
# How long a just-launched instance is reported even if DescribeInstances does not list it
# yet (EC2's eventual consistency).
LAUNCH_VISIBILITY_S = 300.0

CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity", "InstanceLimitExceeded", "Unsupported",
    "InsufficientCapacity", "VcpuLimitExceeded", "InsufficientFreeAddressesInSubnet",
})
THROTTLING_CODES = frozenset({
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException",
    "SlowDown", "RequestThrottled",
})
PERMISSION_CODES = frozenset({
    "UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "AuthFailure",
    "OptInRequired", "Blocked",
})
PERMANENT_PREFIXES = ("InvalidAMIID", "InvalidKeyPair", "InvalidSubnetID", "InvalidGroup",
                      "InvalidParameterCombination", "IdempotentParameterMismatch",
                      "TargetGroupNotFound", "InvalidInstanceType")
TARGET_STATES = {
    "initial": Health.INITIAL, "healthy": Health.HEALTHY, "unhealthy": Health.UNHEALTHY,
    "unused": Health.UNUSED, "draining": Health.DRAINING,
    # health checks disabled or the target's zone is off: it gets no traffic
    "unavailable": Health.UNHEALTHY,
}




def classify(exc: BaseException, what: str) -> TransientProviderError | PermanentProviderError:
    """One place that maps botocore's errors onto the provider's two kinds."""
    code = error_code(exc)
    message = (getattr(exc, "response", None) or {}).get("Error", {}).get("Message", str(exc))
    if code in THROTTLING_CODES:
        return TransientProviderError(f"{what}: AWS is throttling requests ({code}); "
                                      "backing off")
    if code in CAPACITY_CODES:
        return TransientProviderError(f"{what}: no capacity ({code}: {message})")
    if code in PERMISSION_CODES:
        return PermanentProviderError(
            f"{what}: missing permission ({code}: {message}); grant it to the manager's "
            "credentials")
    if code.startswith(PERMANENT_PREFIXES):
        return PermanentProviderError(f"{what}: {code}: {message}")
    if code == "InvalidParameterValue" and "iam instance profile" in message.lower():
        # An instance profile is not usable for a few seconds after it is created.
        return TransientProviderError(f"{what}: instance profile not ready yet ({message})")
    return TransientProviderError(f"{what}: {code or type(exc).__name__}: {message}")


def make_clients(config: AwsFleetConfig) -> tuple[Any, Any, Any]:
    """EC2, ELBv2 and S3 clients, built once, with standard-mode retries and timeouts."""
    import boto3
    from botocore.config import Config

    session = boto3.Session(profile_name=config.profile, region_name=config.region)
    botocore_config = Config(retries={"mode": "standard", "max_attempts": 5},
                             connect_timeout=5, read_timeout=20)
    return tuple(session.client(name, endpoint_url=config.endpoint_url,
                                config=botocore_config)
                 for name in ("ec2", "elbv2", "s3"))  # type: ignore[return-value]


def client_token(fleet: str, session: str, token: str, candidate: str) -> str:
    """EC2 ClientToken (<= 64 ASCII): the same decision and candidate give the same
    token; a new manager session gets new ones (tokens outlive terminated instances)."""
    digest = hashlib.sha256(f"{fleet}\0{session}\0{token}\0{candidate}".encode()).hexdigest()
    return f"imgf-{digest[:48]}"


Bootstrapper = Callable[[dict[str, Any], float], None]
"""Runs the set-up of one instance (its DescribeInstances record) before a deadline
(``time.monotonic()`` value); raises :class:`fleet.aws.ssh_bootstrap.BootstrapError` on failure."""


@dataclass
class _BootstrapJob:
    future: Future[None]
    started: float


class AwsProvider:
    name = "aws"

    def __init__(self, config: AwsFleetConfig, *, clients: tuple[Any, Any, Any] | None = None,
                 bootstrapper: Bootstrapper | None = None, session_id: str | None = None,
                 clock: Callable[[], float] = time.time, max_bootstraps: int = 8,
                 load_probe: LoadProbe | None = None) -> None:
        self.config = config
        # Workers' own /health for load and progress (None: the ALB's verdict only).
        self._load_probe = load_probe or (probe_all if config.poll_worker_load else None)
        self._completed: dict[str, int] = {}
        self._last_progress: dict[str, float] = {}
        self.ec2, self.elbv2, self.s3 = clients or make_clients(config)
        self.session_id = session_id or uuid.uuid4().hex
        self._clock = clock
        self._bootstrapper = bootstrapper or SshBootstrapper(config, self.ec2)
        # Bootstraps run in daemon threads so that stopping the manager never waits for
        # an SSH session; an interrupted bootstrap is redone by the next manager
        # (remote_setup.sh is idempotent).
        self._bootstrap_slots = threading.BoundedSemaphore(max_bootstraps)
        self._jobs: dict[str, _BootstrapJob] = {}
        self._bootstrap_failures: dict[str, str] = {}
        # The ALB reports no completed-request counts per target, so the last time a
        # target was seen healthy is this provider's evidence of progress: a target that
        # flaps between busy and healthy is kept, one unhealthy for longer is replaced.
        self._last_healthy: dict[str, float] = {}
        self._launched: dict[str, Instance] = {}  # id -> placeholder until EC2 lists it
        self._terminating: set[str] = set()

    # ------------------------------------------------------------------------ observe

    async def observe(self) -> tuple[Instance, ...]:
        return await asyncio.to_thread(self._observe)

    def _observe(self) -> tuple[Instance, ...]:
        try:
            records = [
                instance
                for page in self.ec2.get_paginator("describe_instances").paginate(
                    Filters=[{"Name": f"tag:{FLEET_TAG_KEY}", "Values": [self.config.name]}])
                for reservation in page["Reservations"]
                for instance in reservation["Instances"]
            ]
            # One call answers for every registered target; there is no paginator.
            health = {
                d["Target"]["Id"]: d["TargetHealth"]
                for d in self.elbv2.describe_target_health(
                    TargetGroupArn=self.config.target_group_arn)["TargetHealthDescriptions"]
            }
        except Exception as exc:
            raise classify(exc, "observe") from exc
        seen: dict[str, Instance] = {}
        for record in records:
            instance = self._to_instance(record, health.get(record["InstanceId"]))
            if instance is not None:
                seen[instance.id] = instance
        now = self._clock()
        for iid, placeholder in list(self._launched.items()):
            if iid in seen or now - placeholder.launched_at > LAUNCH_VISIBILITY_S:
                self._launched.pop(iid)
            elif iid not in self._terminating:
                seen[iid] = placeholder
        gone = set(self._jobs) - set(seen)
        for iid in gone:
            self._jobs.pop(iid, None)
        if self._load_probe is not None:
            seen = self._with_load(seen, now)
        return tuple(sorted(seen.values(), key=lambda i: (i.launched_at, i.id)))

    def _with_load(self, seen: dict[str, Instance], now: float) -> dict[str, Instance]:
        """Each serving instance's in-flight work and progress from its own /health."""
        assert self._load_probe is not None
        addresses = {iid: i.address for iid, i in seen.items()
                     if i.address and i.registered and i.bootstrapped
                     and i.state is InstanceState.RUNNING}
        reports = self._load_probe(addresses)
        self._completed, progressed = progress_times(
            {k: v for k, v in self._completed.items() if k in seen}, reports, now)
        self._last_progress = {k: v for k, v in self._last_progress.items() if k in seen}
        self._last_progress.update(progressed)
        out = {}
        for iid, instance in seen.items():
            report = reports.get(iid)
            marks = [t for t in (instance.last_progress_at, self._last_progress.get(iid))
                     if t is not None]
            out[iid] = dataclasses.replace(
                instance, inflight=None if report is None else report.inflight,
                last_progress_at=max(marks) if marks else None)
        return out

    def _to_instance(self, record: dict[str, Any],
                     target: dict[str, Any] | None) -> Instance | None:
        iid = record["InstanceId"]
        ec2_state = record["State"]["Name"]
        tags = {t["Key"]: t["Value"] for t in record.get("Tags", [])}
        asked = iid in self._terminating
        detail = record.get("StateReason", {}).get("Message", "")
        if ec2_state in ("shutting-down", "terminated"):
            if asked:
                if ec2_state == "terminated":
                    self._last_healthy.pop(iid, None)
                    return None  # gone for good; forget it
                state = InstanceState.STOPPING
            else:
                state = InstanceState.STOPPED
                detail = f"EC2 {ec2_state}" + (f": {detail}" if detail else "")
        elif ec2_state in ("stopping", "stopped"):
            state = InstanceState.STOPPING if asked else InstanceState.STOPPED
            detail = f"EC2 {ec2_state}" + (f": {detail}" if detail else "")
        elif ec2_state == "pending":
            state = InstanceState.PENDING
        else:
            state = InstanceState.RUNNING
        bootstrapped = (tags.get(BOOTSTRAPPED_TAG_KEY) == "true"
                        or self.config.bootstrap == "user-data")
        if state is InstanceState.RUNNING and not bootstrapped:
            failure = self._bootstrap_failures.get(iid)
            job = self._jobs.get(iid)
            if failure is not None:
                state, detail = InstanceState.STOPPED, failure
            elif job is not None and not job.future.done():
                state = InstanceState.BOOTSTRAPPING
            elif job is not None:
                bootstrapped = self._finish_job(iid, job)
                if not bootstrapped:
                    state, detail = InstanceState.STOPPED, self._bootstrap_failures[iid]
        registered = target is not None
        health = Health.UNUSED
        if target is not None:
            health = TARGET_STATES.get(target.get("State", ""), Health.UNHEALTHY)
            if target.get("Reason") and health is not Health.HEALTHY and not detail:
                detail = f"{target['Reason']}: {target.get('Description', '')}".strip(": ")
        if health is Health.HEALTHY:
            self._last_healthy[iid] = self._clock()
        ip = record.get("PrivateIpAddress")
        return Instance(
            id=iid, state=state, health=health, last_progress_at=self._last_healthy.get(iid),
            address=f"{ip}:{self.config.app_port}" if ip else None,
            launched_at=_timestamp(record["LaunchTime"]),
            inflight=None,  # the ALB does not report per-target in-flight requests
            registered=registered, bootstrapped=bootstrapped, detail=detail,
        )

    def _finish_job(self, iid: str, job: _BootstrapJob) -> bool:
        exc = job.future.exception()
        if exc is None:
            return True
        self._jobs.pop(iid, None)
        self._bootstrap_failures[iid] = f"bootstrap failed: {exc}"
        log.warning("bootstrap of %s failed: %s", iid, exc)
        return False

    # ------------------------------------------------------------------------- launch

    async def launch(self, token: str) -> str:
        return await asyncio.to_thread(self._launch, token)

    def _candidates(self, token: str) -> list[tuple[str, str]]:
        subnets = list(self.config.subnets)
        # Successive launch decisions start in successive subnets (spreading the fleet
        # over availability zones), while a retry of one decision walks the same order
        # and so sends the same ClientTokens.
        tail = token.rsplit("-", 1)[-1]
        seq = int(tail) if tail.isdigit() else int(hashlib.sha256(token.encode()).hexdigest(),
                                                      16)
        start = seq % len(subnets)
        ordered = subnets[start:] + subnets[:start]
        return [(itype, subnet) for itype in self.config.instance_types for subnet in ordered]

    def _launch(self, token: str) -> str:
        config = self.config
        capacity_misses: list[str] = []
        for itype, subnet in self._candidates(token):
            request = self._run_request(token, itype, subnet)
            try:
                response = self.ec2.run_instances(**request)
            except Exception as exc:
                code = error_code(exc)
                if code in CAPACITY_CODES:
                    capacity_misses.append(f"{itype} in {subnet}: {code}")
                    log.info("launch %s: %s in %s has no capacity (%s); trying the next",
                             token, itype, subnet, code)
                    continue
                raise classify(exc, f"launch {itype} in {subnet}") from exc
            record = response["Instances"][0]
            iid = record["InstanceId"]
            self._launched[iid] = Instance(
                id=iid, state=InstanceState.PENDING, health=Health.UNUSED,
                address=None, launched_at=_timestamp(record.get("LaunchTime"), self._clock()),
                inflight=None, registered=False,
                bootstrapped=config.bootstrap == "user-data")
            log.info("launched %s (%s in %s) for %s", iid, itype, subnet, token)
            return iid
        raise TransientProviderError(
            "launch: no capacity for any configured instance type and subnet ("
            + "; ".join(capacity_misses) + "); will retry with backoff")

    def _run_request(self, token: str, itype: str, subnet: str) -> dict[str, Any]:
        config = self.config
        tags = [{"Key": FLEET_TAG_KEY, "Value": config.name},
                {"Key": ROLE_TAG_KEY, "Value": "worker"},
                {"Key": "Name", "Value": f"imgf-{config.name}-worker"},
                *({"Key": k, "Value": v} for k, v in config.extra_tags.items())]
        request: dict[str, Any] = {
            "ImageId": config.ami,
            "InstanceType": itype,
            "MinCount": 1,
            "MaxCount": 1,
            "KeyName": config.key_name,
            "IamInstanceProfile": {"Arn": config.instance_profile_arn},
            "NetworkInterfaces": [{
                "DeviceIndex": 0, "SubnetId": subnet,
                "Groups": [config.worker_security_group],
                "AssociatePublicIpAddress": True, "DeleteOnTermination": True,
            }],
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                "HttpPutResponseHopLimit": 1},
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags},
                                  {"ResourceType": "volume", "Tags": tags}],
            "ClientToken": client_token(config.name, self.session_id, token,
                                        f"{itype}/{subnet}"),
        }
        if config.bootstrap == "user-data":
            from fleet.aws.ssh_bootstrap import render_user_data
            request["UserData"] = render_user_data(
                bundle_url=f"s3://{config.bucket}/fleet/bundle.tar.gz",
                storage=config.storage_url, region=config.region, port=config.app_port,
                token_parameter=config.token_parameter)
        return request

    # ---------------------------------------------------------------------- bootstrap

    async def bootstrap(self, instance_id: str) -> None:
        """Start the set-up in the background and return at once."""
        job = self._jobs.get(instance_id)
        if job is not None and not job.future.done():
            return
        if instance_id in self._bootstrap_failures:
            return  # reported stopped; the manager replaces it
        record = await asyncio.to_thread(self._describe, instance_id)
        deadline = time.monotonic() + self.config.bootstrap_timeout_s
        future: Future[None] = Future()
        threading.Thread(target=self._bootstrap_job, args=(record, deadline, future),
                         name=f"imagefleet-bootstrap-{instance_id}", daemon=True).start()
        self._jobs[instance_id] = _BootstrapJob(future, self._clock())
        log.info("bootstrapping %s (timeout %.0fs)", instance_id,
                 self.config.bootstrap_timeout_s)

    def _bootstrap_job(self, record: dict[str, Any], deadline: float,
                       future: Future[None]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            with self._bootstrap_slots:
                self._bootstrapper(record, deadline)
            self.ec2.create_tags(Resources=[record["InstanceId"]],
                                 Tags=[{"Key": BOOTSTRAPPED_TAG_KEY, "Value": "true"}])
        except Exception as exc:  # noqa: BLE001 - handed to observe() via the future
            future.set_exception(exc)
        else:
            future.set_result(None)

    def _describe(self, instance_id: str) -> dict[str, Any]:
        try:
            reservations = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        except Exception as exc:
            raise classify(exc, f"describe {instance_id}") from exc
        if not reservations or not reservations[0]["Instances"]:
            raise TransientProviderError(f"describe {instance_id}: not visible yet")
        return reservations[0]["Instances"][0]

    # ------------------------------------------------------------- register / remove

    async def register(self, instance_id: str) -> None:
        await asyncio.to_thread(self._targets, "register_targets", instance_id)

    async def deregister(self, instance_id: str) -> None:
        await asyncio.to_thread(self._targets, "deregister_targets", instance_id)

    def _targets(self, operation: str, instance_id: str) -> None:
        try:
            getattr(self.elbv2, operation)(
                TargetGroupArn=self.config.target_group_arn,
                Targets=[{"Id": instance_id, "Port": self.config.app_port}])
        except Exception as exc:
            if operation == "deregister_targets" and error_code(exc) == "InvalidTarget":
                return  # not registered (any more): nothing to undo
            raise classify(exc, f"{operation.split('_', maxsplit=1)[0]} {instance_id}") from exc

    async def terminate(self, instance_id: str, graceful: bool = True) -> None:
        await asyncio.to_thread(self._terminate, instance_id, graceful)

    def _terminate(self, instance_id: str, graceful: bool) -> None:
        # Deregistering first keeps the ALB from sending requests to a dying instance;
        # graceful callers have already drained it, so this is then a no-op.
        self._targets("deregister_targets", instance_id)
        try:
            # EC2 termination is an ACPI shutdown: systemd stops the unit with SIGTERM and
            # the server drains in-flight requests (TimeoutStopSec). There is no harder
            # kill for a hung instance; ``graceful`` only decides whether we deregister
            # and wait first, which the reconcile loop already did.
            self.ec2.terminate_instances(InstanceIds=[instance_id])
        except Exception as exc:
            if not error_code(exc).startswith("InvalidInstanceID.NotFound"):
                raise classify(exc, f"terminate {instance_id}") from exc
        self._terminating.add(instance_id)
        self._launched.pop(instance_id, None)
        self._bootstrap_failures.pop(instance_id, None)
        job = self._jobs.pop(instance_id, None)
        if job is not None:
            job.future.cancel()
        log.info("terminating %s (graceful=%s)", instance_id, graceful)

    async def close(self) -> None:
        # Instances keep running; a restarted manager adopts them. Bootstraps in flight
        # are abandoned (daemon threads, bounded by their own deadline).
        for job in self._jobs.values():
            job.future.cancel()


def _timestamp(value: datetime | str | None, default: float | None = None) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return default if default is not None else time.time()


def ssh_address(record: dict[str, Any], *, inside_vpc: bool) -> str | None:
    """Where to SSH to an instance. A manager inside the VPC (it has a security group of
    its own) uses the private address: the workers' SSH rule names the manager's security
    group, which admits only traffic inside the VPC. From outside: the public one."""
    private, public = record.get("PrivateIpAddress"), record.get("PublicIpAddress")
    return (private or public) if inside_vpc else (public or private)


class SshBootstrapper:
    """The production bootstrapper: console host keys → SSH → ``remote_setup.sh``."""

    def __init__(self, config: AwsFleetConfig, ec2: Any) -> None:
        self.config = config
        self.ec2 = ec2

    def console_output(self, instance_id: str) -> str:
        try:
            response = self.ec2.get_console_output(InstanceId=instance_id, Latest=True)
        except Exception as exc:
            if error_code(exc) != "UnsupportedOperation":
                raise
            # Older (Xen) instance types only keep the buffered output.
            response = self.ec2.get_console_output(InstanceId=instance_id)
        # botocore already base64-decodes Output (its decode_console_output handler).
        return response.get("Output") or ""

    def __call__(self, record: dict[str, Any], deadline: float) -> None:
        from fleet.aws import ssh_bootstrap as bootstrap

        iid = record["InstanceId"]
        host = ssh_address(record, inside_vpc=self.config.manager_security_group is not None)
        if not host:
            raise bootstrap.BootstrapError(f"{iid} has no IP address")
        keys = bootstrap.wait_for_host_keys(lambda: self.console_output(iid),
                                            deadline=deadline)
        target = bootstrap.SshTarget(host=host, username=self.config.ssh_user,
                                     key_file=Path(self.config.key_file), host_keys=keys)
        result = bootstrap.bootstrap_over_ssh(
            target, sudo=True, timeout_s=max(1.0, deadline - time.monotonic()),
            setup_args=bootstrap.remote_setup_args(
                storage=self.config.storage_url, region=self.config.region,
                port=self.config.app_port, instance_id=iid,
                token_parameter=self.config.token_parameter))
        log.info("bootstrapped %s in %.1fs (ssh up after %.1fs)", iid, result.duration_s,
                 result.connect_s)
