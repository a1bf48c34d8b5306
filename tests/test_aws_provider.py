"""The AWS provider and ``python -m fleet run``'s service against moto.

moto plays EC2, ELBv2 and S3; the infrastructure is made by ``fleet.aws.operator.up``
itself. What moto cannot show is injected at the provider's boundary (a proxy around
the boto3 client), and each such test says so:

- target health: moto reports every registered running instance ``healthy`` at once, so
  ``initial`` and ``unhealthy`` are injected into ``DescribeTargetHealth`` answers;
- ClientToken idempotency: moto ignores ``ClientToken`` and starts a new instance on
  every call, so a proxy gives ``RunInstances`` EC2's behaviour (same token → same
  instance);
- capacity, throttling and permission errors are raised by the proxy;
- the SSH bootstrap is replaced by a fake bootstrapper (moto's instances run no sshd;
  tests/test_ssh_bootstrap.py covers the real one against a real sshd).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from helpers_aws import (
    BootAssumptions,
    ClientProxy,
    HealthSettings,
    RepairTimes,
    client_error,
    simulate_repair,
)
from moto import mock_aws

from fleet.aws import operator as aws_operator
from fleet.aws import stack as aws_stack
from fleet.aws.config import FLEET_TAG_KEY, AwsFleetConfig, ConfigError, config_from_dict
from fleet.aws.main import build_service, spec_from_config
from fleet.aws.main import main as aws_main
from fleet.aws.provider import AwsProvider, client_token
from fleet.aws.ssh_bootstrap import BootstrapFailed, HostKeyMismatch
from fleet.manager import AdminError, FleetManager
from fleet.model import Health, InstanceState
from fleet.providers.base import PermanentProviderError, TransientProviderError

REGION = "eu-west-1"
NAME = "prov"


class FakeBootstrapper:
    """Stands in for SSH (see the module docstring). ``gate`` holds bootstraps until set;
    ``fail`` makes them raise."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail: Exception | None = None

    def __call__(self, record: dict[str, Any], deadline: float) -> None:
        self.calls.append(record["InstanceId"])
        if not self.gate.wait(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("bootstrap deadline passed")
        if self.fail is not None:
            raise self.fail


@pytest.fixture
def infra(fake_aws: None, monkeypatch: pytest.MonkeyPatch,
          tmp_path: Path) -> Iterator[AwsFleetConfig]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        clients = aws_operator.make_clients(REGION, None, None)
        ami = "ami-12c6146b"  # any id: moto does not check it
        config = aws_operator.up(clients, aws_operator.UpOptions(
            name=NAME, ami=ami,
            config_out=tmp_path / "fleet.json"), report=lambda line: None)
        yield dataclasses.replace(config, desired=2, min=1, max=4, grace_period_s=120.0,
                                  bootstrap_timeout_s=60.0, observe_interval_s=0.2)


def _proxies() -> tuple[ClientProxy, ClientProxy, ClientProxy]:
    return (ClientProxy(boto3.client("ec2", region_name=REGION)),
            ClientProxy(boto3.client("elbv2", region_name=REGION)),
            ClientProxy(boto3.client("s3", region_name=REGION)))


def _spec(config: AwsFleetConfig, **changes: Any) -> Any:
    # Launch backoff shortened so a test sees the replacement launch within a second.
    return dataclasses.replace(spec_from_config(config), launch_backoff_base_s=0.2,
                               launch_backoff_max_s=1.0, **changes)


def _provider(config: AwsFleetConfig, bootstrapper: FakeBootstrapper | None = None,
              clients: tuple[ClientProxy, ClientProxy, ClientProxy] | None = None,
              ) -> tuple[AwsProvider, tuple[ClientProxy, ClientProxy, ClientProxy]]:
    clients = clients or _proxies()
    provider = AwsProvider(config, clients=clients,  # type: ignore[arg-type]
                           bootstrapper=bootstrapper or FakeBootstrapper())
    return provider, clients


def _live_instances() -> list[dict[str, Any]]:
    ec2 = boto3.client("ec2", region_name=REGION)
    return [i for r in ec2.describe_instances(Filters=[
        {"Name": f"tag:{FLEET_TAG_KEY}", "Values": [NAME]},
        {"Name": "instance-state-name", "Values": ["pending", "running"]}])["Reservations"]
        for i in r["Instances"]]


async def _tick_until(manager: FleetManager, predicate: Any, timeout: float = 30.0,
                      what: str = "fleet state") -> None:
    deadline = time.monotonic() + timeout
    while True:
        await manager.tick()
        if predicate(manager.instances):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; instances: {manager.instances}; "
                        f"events: {[e.to_json() for e in manager.events][-10:]}")
        await asyncio.sleep(0.05)  # let bootstrap threads run between ticks


def _serving(n: int) -> Any:
    def check(instances: tuple) -> bool:
        good = [i for i in instances if i.state is InstanceState.RUNNING and i.bootstrapped
                and i.registered and i.health is Health.HEALTHY]
        return len(good) == n and len([i for i in instances if i.live]) == n
    return check


# --------------------------------------------------------------------------- launch

def test_launch_tags_imdsv2_profile_and_subnet(infra: AwsFleetConfig) -> None:
    provider, _ = _provider(infra)
    iid = asyncio.run(provider.launch("prov-1"))
    record = boto3.client("ec2", region_name=REGION).describe_instances(
        InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    tags = {t["Key"]: t["Value"] for t in record["Tags"]}
    assert tags[FLEET_TAG_KEY] == NAME and tags["imagefleet:role"] == "worker"
    assert record["MetadataOptions"]["HttpTokens"] == "required"
    assert record["IamInstanceProfile"]["Arn"] == infra.instance_profile_arn
    assert record["SubnetId"] in infra.subnets
    assert record["InstanceType"] == infra.instance_types[0]
    assert record["KeyName"] == infra.key_name
    groups = [g["GroupId"] for g in record["NetworkInterfaces"][0]["Groups"]]
    assert groups == [infra.worker_security_group]
    # Visible at once, even before EC2 lists it (placeholder), as pending or running.
    observed = asyncio.run(provider.observe())
    assert [i.id for i in observed] == [iid]
    assert not observed[0].bootstrapped and not observed[0].registered


def test_user_data_mode_launches_with_the_setup_script(infra: AwsFleetConfig) -> None:
    config = dataclasses.replace(infra, bootstrap="user-data")
    bootstrapper = FakeBootstrapper()
    provider, _ = _provider(config, bootstrapper)
    iid = asyncio.run(provider.launch("prov-1"))
    attribute = boto3.client("ec2", region_name=REGION).describe_instance_attribute(
        InstanceId=iid, Attribute="userData")
    script = base64.b64decode(attribute["UserData"]["Value"]).decode()
    assert f"s3://{config.bucket}/fleet/bundle.tar.gz" in script
    assert f"remote_setup.sh --source . --storage {config.storage_url}" in script
    observed = asyncio.run(provider.observe())
    assert observed[0].bootstrapped  # no SSH step: the ALB health check is the judge
    assert bootstrapper.calls == []


def test_successive_launches_spread_over_subnets(infra: AwsFleetConfig) -> None:
    provider, _ = _provider(infra)
    ids = [asyncio.run(provider.launch(f"prov-{n}")) for n in range(1, 4)]
    records = boto3.client("ec2", region_name=REGION).describe_instances(
        InstanceIds=ids)["Reservations"]
    subnets = {i["SubnetId"] for r in records for i in r["Instances"]}
    assert len(subnets) == min(3, len(infra.subnets))


def test_client_token_makes_a_retried_launch_idempotent(infra: AwsFleetConfig) -> None:
    """Injected at the boundary: moto ignores ClientToken, so the proxy gives RunInstances
    EC2's documented behaviour — a repeated token returns the first call's instance. The
    first call also 'times out' after EC2 started the instance, as a lost response does."""
    provider, (ec2, _, _) = _provider(infra)
    by_token: dict[str, Any] = {}
    lost_first_response = [True]

    def honour_client_token(real: Any, **kwargs: Any) -> Any:
        token = kwargs["ClientToken"]
        if token not in by_token:
            by_token[token] = real(**kwargs)
        if lost_first_response.pop() if lost_first_response else False:
            raise client_error("RequestTimeout", "response lost after the instance started")
        return by_token[token]

    ec2.overrides["run_instances"] = honour_client_token
    with pytest.raises(TransientProviderError):
        asyncio.run(provider.launch("prov-7"))
    first = asyncio.run(provider.launch("prov-7"))
    again = asyncio.run(provider.launch("prov-7"))
    assert first == again
    assert len(_live_instances()) == 1
    other = asyncio.run(provider.launch("prov-8"))
    assert other != first and len(_live_instances()) == 2
    # Tokens: stable per decision and candidate, new per manager session, <= 64 chars.
    token = client_token(NAME, provider.session_id, "prov-7", "t3.small/subnet-1")
    assert token == client_token(NAME, provider.session_id, "prov-7", "t3.small/subnet-1")
    assert token != client_token(NAME, "another-session", "prov-7", "t3.small/subnet-1")
    assert len(token) <= 64


def test_capacity_falls_back_across_types_and_subnets(infra: AwsFleetConfig) -> None:
    """Injected at the boundary: moto never runs out of capacity."""
    provider, (ec2, _, _) = _provider(infra)
    tried: list[tuple[str, str]] = []

    def no_t3_small(real: Any, **kwargs: Any) -> Any:
        subnet = kwargs["NetworkInterfaces"][0]["SubnetId"]
        tried.append((kwargs["InstanceType"], subnet))
        if kwargs["InstanceType"] == "t3.small" or subnet == infra.subnets[0]:
            raise client_error("InsufficientInstanceCapacity", "no capacity in this zone")
        return real(**kwargs)

    ec2.overrides["run_instances"] = no_t3_small
    iid = asyncio.run(provider.launch("prov-1"))
    record = boto3.client("ec2", region_name=REGION).describe_instances(
        InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert record["InstanceType"] == "t3a.small" and record["SubnetId"] != infra.subnets[0]
    assert [t for t, _ in tried[:len(infra.subnets)]] == ["t3.small"] * len(infra.subnets)

    def none_anywhere(real: Any, **kwargs: Any) -> Any:
        raise client_error("InsufficientInstanceCapacity", "none")

    ec2.overrides["run_instances"] = none_anywhere
    with pytest.raises(TransientProviderError, match="no capacity for any configured"):
        asyncio.run(provider.launch("prov-2"))


@pytest.mark.parametrize(("code", "kind", "words"), [
    ("UnauthorizedOperation", PermanentProviderError, "missing permission"),
    ("AccessDenied", PermanentProviderError, "missing permission"),
    ("RequestLimitExceeded", TransientProviderError, "throttling"),
    ("InvalidAMIID.NotFound", PermanentProviderError, "InvalidAMIID"),
    ("InternalError", TransientProviderError, "InternalError"),
])
def test_errors_map_to_transient_or_permanent(infra: AwsFleetConfig, code: str, kind: type,
                                              words: str) -> None:
    """Injected at the boundary: the proxy raises the error EC2 would."""
    provider, (ec2, _, _) = _provider(infra)
    ec2.overrides["run_instances"] = lambda real, **kw: (_ for _ in ()).throw(
        client_error(code, "from the test"))
    with pytest.raises(kind, match=words):
        asyncio.run(provider.launch("prov-1"))
    assert ec2.calls.count("run_instances") == 1  # no fallback storm on these


def test_observe_costs_the_same_few_calls_for_any_fleet_size(infra: AwsFleetConfig) -> None:
    provider, (ec2, elbv2, _) = _provider(infra)
    counts = []
    for launches in (1, 6):
        for n in range(launches):
            asyncio.run(provider.launch(f"size-{launches}-{n}"))
        ec2.calls.clear()
        elbv2.calls.clear()
        observed = asyncio.run(provider.observe())
        assert len(observed) >= launches
        counts.append((list(ec2.calls), list(elbv2.calls)))
    assert counts[0] == counts[1] == (["paginate:describe_instances"],
                                      ["describe_target_health"])


# -------------------------------------------------------------------------- manager

def test_manager_replaces_terminated_and_stopped_instances(infra: AwsFleetConfig) -> None:
    bootstrapper = FakeBootstrapper()
    provider, _ = _provider(infra, bootstrapper)
    manager = FleetManager(provider, _spec(infra))
    ec2 = boto3.client("ec2", region_name=REGION)

    async def scenario() -> None:
        await _tick_until(manager, _serving(2), what="2 healthy instances")
        first = sorted(i.id for i in manager.instances if i.live)
        assert sorted(bootstrapper.calls) == first  # each bootstrapped once
        # Outside the manager: one instance terminated, the other stopped.
        ec2.terminate_instances(InstanceIds=[first[0]])
        ec2.stop_instances(InstanceIds=[first[1]])
        await _tick_until(
            manager, lambda inst: _serving(2)(inst) and not {i.id for i in inst if i.live}
            & set(first), what="2 new healthy instances")
        await provider.close()
        return first

    first = asyncio.run(scenario())
    died = [e for e in manager.events if e.kind == "instance_died"]
    assert {e.instance_id for e in died} == set(first)
    assert any("EC2 stopped" in e.message for e in died)
    states = {i["InstanceId"]: i["State"]["Name"] for r in ec2.describe_instances(
        InstanceIds=first)["Reservations"] for i in r["Instances"]}
    assert states == dict.fromkeys(first, "terminated")  # the stopped one is cleaned up
    assert len(_live_instances()) == 2
    targets = boto3.client("elbv2", region_name=REGION).describe_target_health(
        TargetGroupArn=infra.target_group_arn)["TargetHealthDescriptions"]
    assert {t["Target"]["Id"] for t in targets} == {i["InstanceId"] for i in _live_instances()}


def test_initial_and_unhealthy_targets_injected(infra: AwsFleetConfig) -> None:
    """Injected at the boundary: moto reports registered targets healthy at once, so the
    proxy rewrites DescribeTargetHealth to say `initial` (new target still being checked)
    and later `unhealthy`. The manager's clock is shifted to move through the grace
    period without waiting for it."""
    provider, (_, elbv2, _) = _provider(infra)
    offset = [0.0]
    manager = FleetManager(provider, _spec(infra, desired=1),
                           clock=lambda: time.time() + offset[0])
    forced: dict[str, str] = {}
    default = ["initial"]  # every new target starts `initial`, as on a real ALB

    def rewrite_health(real: Any, **kwargs: Any) -> Any:
        answer = real(**kwargs)
        for desc in answer["TargetHealthDescriptions"]:
            state = forced.get(desc["Target"]["Id"], default[0])
            if state:
                desc["TargetHealth"] = {"State": state, "Reason": "Target.FailedHealthChecks",
                                        "Description": "Health checks failed (injected)"}
        return answer

    elbv2.overrides["describe_target_health"] = rewrite_health

    async def scenario() -> None:
        await _tick_until(manager, lambda inst: any(i.registered for i in inst),
                          what="a registered instance")
        iid = next(i.id for i in manager.instances if i.registered)
        forced[iid] = "initial"
        # Well past what health checks need, still inside the grace period: kept.
        offset[0] = infra.grace_period_s - 5
        for _ in range(3):
            plan = await manager.tick()
            assert not any(type(a).__name__ == "Terminate" for a in plan.actions)
        assert [i.health for i in manager.instances] == [Health.INITIAL]
        forced[iid] = "healthy"
        await manager.tick()
        forced[iid] = "unhealthy"  # failed after having been healthy: replace
        await _tick_until(manager, lambda inst: iid not in {i.id for i in inst if i.live},
                          what="the unhealthy instance to be replaced")
        default[0] = "healthy"
        await _tick_until(manager, _serving(1), what="a healthy replacement")
        await provider.close()
        return iid

    iid = asyncio.run(scenario())
    assert any(e.kind == "instance_unhealthy" and e.instance_id == iid
               for e in manager.events)


def test_bootstrapping_instance_is_kept_in_grace_then_bootstrap_timeout(
        infra: AwsFleetConfig) -> None:
    """The bootstrapper (fake, see the module docstring) hangs: while it runs, the
    instance is `bootstrapping` and never replaced inside the grace period; after the
    grace period it is replaced as a launch failure."""
    bootstrapper = FakeBootstrapper()
    bootstrapper.gate.clear()
    provider, _ = _provider(infra, bootstrapper)
    offset = [0.0]
    manager = FleetManager(provider, _spec(infra, desired=1),
                           clock=lambda: time.time() + offset[0])

    async def scenario() -> str:
        await _tick_until(manager, lambda inst: any(
            i.state is InstanceState.BOOTSTRAPPING for i in inst), what="bootstrapping")
        iid = manager.instances[0].id
        offset[0] = infra.grace_period_s - 5
        plan = await manager.tick()
        assert plan.actions == ()
        assert manager.instances[0].state is InstanceState.BOOTSTRAPPING
        offset[0] = infra.grace_period_s + 1
        await _tick_until(manager, lambda inst: iid not in {i.id for i in inst if i.live},
                          what="boot timeout replacement")
        bootstrapper.gate.set()
        await provider.close()
        return iid

    iid = asyncio.run(scenario())
    kinds = [(e.kind, e.instance_id) for e in manager.events]
    assert ("boot_timeout", iid) in kinds and ("launch_failed", iid) in kinds


@pytest.mark.parametrize("failure", [
    BootstrapFailed(1, "remote_setup: no healthy answer from http://127.0.0.1:8080/health"),
    HostKeyMismatch("198.51.100.7", "ssh-ed25519", "SHA256:impostor"),
])
def test_failed_bootstrap_is_replaced_with_a_clear_event(infra: AwsFleetConfig,
                                                         failure: Exception) -> None:
    bootstrapper = FakeBootstrapper()
    bootstrapper.fail = failure
    provider, _ = _provider(infra, bootstrapper)
    manager = FleetManager(provider, _spec(infra, desired=1))

    async def scenario() -> None:
        await _tick_until(manager, lambda inst: len(bootstrapper.calls) >= 2,
                          what="a replacement after the failed bootstrap")
        await provider.close()

    asyncio.run(scenario())
    died = [e for e in manager.events if e.kind == "instance_died"]
    assert died and str(failure) in died[0].message
    assert died[0].instance_id == bootstrapper.calls[0]
    assert any(e.kind == "launch_failed" for e in manager.events)  # feeds the backoff


def test_adopts_bootstrapped_instances_after_a_restart(infra: AwsFleetConfig) -> None:
    bootstrapper = FakeBootstrapper()
    provider, _ = _provider(infra, bootstrapper)
    manager = FleetManager(provider, _spec(infra))

    async def scenario() -> tuple[str, ...]:
        await _tick_until(manager, _serving(2), what="2 healthy instances")
        await provider.close()
        again, _ = _provider(infra, bootstrapper)
        second = FleetManager(again, _spec(infra))
        plan = await second.tick()
        await again.close()
        return plan.actions

    actions = asyncio.run(scenario())
    assert actions == ()  # nothing launched, bootstrapped or registered again
    assert len(bootstrapper.calls) == 2


# ---------------------------------------------------------------------------- lease

def test_two_managers_cooperate_through_the_lease(infra: AwsFleetConfig) -> None:
    first_provider, (ec2_a, _, s3_a) = _provider(infra)
    second_provider, (ec2_b, _, s3_b) = _provider(infra)
    first = build_service(infra, provider=first_provider, s3=s3_a, holder="manager-a")
    second = build_service(infra, provider=second_provider, s3=s3_b, holder="manager-b")

    async def scenario() -> None:
        deadline = time.monotonic() + 30
        while not _serving(2)(first.manager.instances):
            await first.step()
            await second.step()
            if time.monotonic() > deadline:
                pytest.fail(f"no healthy fleet; events {first.manager.events[-5:]}")
            await asyncio.sleep(0.05)
        assert first.leading and not second.leading
        assert ec2_b.calls.count("run_instances") == 0  # the standby never acts
        snapshot = second.snapshot()
        assert snapshot["role"] == "standby" and snapshot["leader"] == "manager-a"
        assert len(snapshot["instances"]) == 2  # but it does observe
        with pytest.raises(AdminError) as refused:
            second.scale(3)
        assert refused.value.status == 409 and "manager-a" in refused.value.message
        # The leader stops (releases the lease); the standby takes over the same fleet.
        await first.aclose()
        await second.step()
        assert second.leading
        for _ in range(5):
            await second.step()
        assert _serving(2)(second.manager.instances)
        assert ec2_b.calls.count("run_instances") == 0  # adopted, nothing relaunched
        assert second.scale(3) == {"desired": 3, "min": 1, "max": 4}
        await second.aclose()

    asyncio.run(scenario())
    assert len(_live_instances()) == 2
    kinds = [e.kind for e in second.manager.events]
    assert kinds.count("standby") == 1 and kinds.count("lease_acquired") == 1
    assert [e.kind for e in first.manager.events].count("lease_acquired") == 1
    assert ec2_a.calls.count("run_instances") == 2


# --------------------------------------------------------------------------- config

def test_config_errors_name_the_field(infra: AwsFleetConfig, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = dataclasses.asdict(infra)
    with pytest.raises(ConfigError, match="'grace_period_s' must be at least"):
        config_from_dict({**data, "grace_period_s": 30.0, "bootstrap_timeout_s": 60.0})
    with pytest.raises(ConfigError, match=r"'bootstrap' must be one of"):
        config_from_dict({**data, "bootstrap": "telepathy"})
    with pytest.raises(ConfigError, match="unknown field 'colour'"):
        config_from_dict({**data, "colour": "blue"})
    with pytest.raises(ConfigError, match="min <= desired <= max"):
        config_from_dict({**data, "desired": 9})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert aws_main(bad) == 2
    assert "not valid JSON" in capsys.readouterr().err


# ------------------------------------------------------------------ repair timeline

def _worst(settings: HealthSettings, *, hang: bool) -> tuple[RepairTimes, RepairTimes]:
    """Best and worst over failure times spread across the check and observe phases."""
    period = 2 * max(settings.interval_s, settings.observe_s)
    runs = [simulate_repair(settings, BootAssumptions(), 20.0 + k * 0.5, hang=hang)
            for k in range(int(period / 0.5))]
    return (RepairTimes(min(r.detect_s for r in runs), min(r.healthy_s for r in runs)),
            RepairTimes(max(r.detect_s for r in runs), max(r.healthy_s for r in runs)))


def test_repair_timeline_meets_the_targets_with_the_chosen_settings() -> None:
    """The pure decide() with a fake clock against a model of EC2 and the ALB (the
    assumptions are BootAssumptions' defaults, stated in the README). The settings are
    the ones `bootstrap_aws up` configures and `fleet run` uses."""
    tg = aws_stack.HEALTH_CHECK
    chosen = HealthSettings(
        interval_s=tg["HealthCheckIntervalSeconds"], timeout_s=tg["HealthCheckTimeoutSeconds"],
        healthy_threshold=tg["HealthyThresholdCount"],
        unhealthy_threshold=tg["UnhealthyThresholdCount"],
        observe_s=AwsFleetConfig.__dataclass_fields__["observe_interval_s"].default)
    spec = spec_from_config(config_from_dict({**_MINIMAL_CONFIG}))
    chosen = dataclasses.replace(chosen, no_progress_s=spec.no_progress_timeout_s)
    assert (spec.health_check_interval_s, spec.health_check_timeout_s,
            spec.healthy_threshold, spec.unhealthy_threshold) == (
        chosen.interval_s, chosen.timeout_s, chosen.healthy_threshold,
        chosen.unhealthy_threshold)
    _, hung = _worst(chosen, hang=True)
    _, died = _worst(chosen, hang=False)
    assert hung.detect_s <= 15 and hung.healthy_s <= 90
    assert died.detect_s <= chosen.observe_s and died.healthy_s <= 90
    # The same model with ALB defaults (30 s interval, 5 s timeout, thresholds 5/2) and a
    # 10 s health poll, as an Auto Scaling group does it: detection takes a minute.
    defaults = HealthSettings(interval_s=30, timeout_s=5, healthy_threshold=5,
                              unhealthy_threshold=2, observe_s=10)
    best, worst = _worst(defaults, hang=True)
    assert worst.detect_s >= 60 and best.healthy_s >= 180


_MINIMAL_CONFIG: dict[str, Any] = {
    "name": "sim", "region": REGION, "vpc_id": "vpc-1", "subnets": ["subnet-1", "subnet-2"],
    "bucket": "b", "alb_security_group": "sg-1", "worker_security_group": "sg-2",
    "key_name": "k", "key_file": "k.pem", "role_name": "r", "instance_profile_name": "r",
    "instance_profile_arn": "arn:aws:iam::1:instance-profile/r", "target_group_arn": "tg",
    "load_balancer_arn": "lb", "load_balancer_dns": "lb.example", "listener_arn": "l",
    "ami": "ami-1", "instance_types": ["t3.small"],
}


def test_fleet_run_serves_the_admin_api(infra: AwsFleetConfig) -> None:
    """`python -m fleet run`'s pieces: lease, manager loop and admin API over HTTP."""
    import aiohttp

    from fleet.aws.main import start_admin

    provider, (_, _, s3) = _provider(infra)
    service = build_service(infra, provider=provider, s3=s3, holder="only")

    async def scenario() -> tuple[dict[str, Any], int, dict[str, Any]]:
        runner, url = await start_admin(service, "127.0.0.1", 0)
        stop = asyncio.Event()
        loop_task = asyncio.create_task(service.run(stop, 0.1))
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                deadline = time.monotonic() + 30
                while True:
                    async with http.get(url) as response:
                        state = await response.json()
                    healthy = [i for i in state["instances"] if i["health"] == "healthy"]
                    if len(healthy) == 2:
                        break
                    assert time.monotonic() < deadline, state
                    await asyncio.sleep(0.1)
                async with http.post(f"{url}/scale", json={"desired": 99}) as response:
                    status, error = response.status, await response.json()
        finally:
            stop.set()
            await loop_task
            await service.aclose()
            await runner.cleanup()
        return state, status, error

    state, status, error = asyncio.run(scenario())
    assert state["name"] == NAME and state["provider"] == "aws" and state["desired"] == 2
    assert state["role"] == "leader" and state["leader"] == "only"
    assert all(i["address"].endswith(":8080") for i in state["instances"])
    assert any(e["kind"] == "lease_acquired" for e in state["events"])
    assert status == 400 and "1..4" in error["error"]["message"]


def test_polled_worker_load_scales_the_aws_fleet_out_and_in(infra: AwsFleetConfig,
                                                            tmp_path: Path) -> None:
    """With ``poll_worker_load`` the provider reads each worker's own /health: in-flight
    work and completed requests reach ``decide()``, which scales on them as it does for a
    local fleet. EC2 and the ALB are moto; moto's instances have private IPs nothing
    listens on, so (injected at the provider's boundary) the probe's addresses are mapped
    to real ``python -m server`` processes on loopback, one per instance."""
    import requests
    from helpers_fleet import IMAGES, ServerProcess

    from fleet.aws.load_probe import probe_all
    from fleet.model import Memory, Observed
    from fleet.reconcile import decide

    config = dataclasses.replace(infra, bootstrap="user-data", poll_worker_load=True)
    servers = [ServerProcess(tmp_path / "storage", f"w{n}",
                             ["--process-slots", "1", "--queue-limit", "8"]) for n in (1, 2)]
    try:
        for server in servers:
            server.wait_healthy()
        by_instance: dict[str, ServerProcess] = {}
        provider = AwsProvider(config, clients=_proxies(),  # type: ignore[arg-type]
                               bootstrapper=FakeBootstrapper(), load_probe=lambda addresses:
                               probe_all({iid: by_instance[iid].address for iid in addresses}))
        for n, server in enumerate(servers):
            iid = asyncio.run(provider.launch(f"load-{n}"))
            asyncio.run(provider.register(iid))
            by_instance[iid] = server
        busy_iid = next(iter(by_instance))
        observed = asyncio.run(provider.observe())
        assert {i.id: i.inflight for i in observed} == dict.fromkeys(by_instance, 0)

        photo = (IMAGES / "astronaut.png").read_bytes()
        slow = json.dumps([{"op": "bilateral", "diameter": 15}] * 3)

        def heavy() -> None:
            requests.post(f"http://{by_instance[busy_iid].address}/process",
                          files={"image": ("a.png", photo)},
                          data={"steps": slow, "format": "png"}, timeout=120)

        spec = dataclasses.replace(spec_from_config(config), desired=2, min=1, max=4,
                                   target_inflight=2, scale_out_window_s=0,
                                   scale_cooldown_s=0)
        seen = Memory(ever_healthy=frozenset(by_instance))
        threads = [threading.Thread(target=heavy) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            deadline = time.monotonic() + 30
            while True:
                observed = asyncio.run(provider.observe())
                loads = {i.id: i.inflight for i in observed}
                if (loads[busy_iid] or 0) >= 6:
                    break
                assert time.monotonic() < deadline, f"load never showed: {loads}"
            plan = decide(spec, Observed(observed, seen), time.time())
            assert plan.desired > 2, plan.events  # 6+ in flight over 2 workers: scale out
            assert any(e.kind == "scale_out" for e in plan.events)
        finally:
            for thread in threads:
                thread.join(120)

        # The work finished: the busy worker's completed counter grew (progress), its load
        # is gone, and a long quiet window scales the fleet back in.
        observed = asyncio.run(provider.observe())
        busy = next(i for i in observed if i.id == busy_iid)
        assert busy.inflight == 0 and busy.last_progress_at is not None
        quiet = dataclasses.replace(spec, desired=3, scale_in_window_s=0)
        plan = decide(quiet, Observed(observed, Memory(ever_healthy=frozenset(by_instance),
                                                       low_load_since=0.0)), time.time())
        assert plan.desired == 2 and any(e.kind == "scale_in" for e in plan.events)
    finally:
        for server in servers:
            server.close()


def test_the_manager_scales_the_aws_fleet_out_and_in_on_polled_worker_load(
        infra: AwsFleetConfig, tmp_path: Path) -> None:
    """The whole loop of the cloud manager, not just ``decide()``: ``FleetManager`` on the
    AWS provider (EC2 and the target group on moto) launches, registers, scales out when
    the workers' own /health shows load and back in when it is gone, draining the surplus
    instance through deregistration. moto's instances run nothing, so (injected at the
    provider's boundary, the load probe) each instance the manager launches is mapped to
    the next real ``python -m server`` on loopback."""
    import requests
    from helpers_fleet import IMAGES, ServerProcess

    from fleet.aws.load_probe import probe_all

    config = dataclasses.replace(infra, bootstrap="user-data", poll_worker_load=True)
    servers = [ServerProcess(tmp_path / "storage", f"w{n}",
                             ["--process-slots", "1", "--queue-limit", "8"]) for n in (1, 2, 3)]
    assigned: dict[str, ServerProcess] = {}

    def probe(addresses: dict[str, str]) -> dict[str, Any]:
        for iid in sorted(addresses):
            if iid not in assigned and len(assigned) < len(servers):
                assigned[iid] = servers[len(assigned)]
        return probe_all({iid: assigned[iid].address for iid in addresses if iid in assigned})

    ec2, elbv2, s3 = _proxies()
    provider = AwsProvider(config, clients=(ec2, elbv2, s3),  # type: ignore[arg-type]
                           bootstrapper=FakeBootstrapper(), load_probe=probe)
    manager = FleetManager(provider, _spec(
        config, desired=2, min=2, max=3, target_inflight=2, scale_out_window_s=0,
        scale_in_window_s=0, scale_cooldown_s=0))
    photo = (IMAGES / "astronaut.png").read_bytes()
    slow = json.dumps([{"op": "bilateral", "diameter": 15}] * 3)
    stop_load = threading.Event()

    def heavy(server: ServerProcess) -> None:
        while not stop_load.is_set():
            requests.post(f"http://{server.address}/process", files={"image": ("a.png", photo)},
                          data={"steps": slow, "format": "png"}, timeout=120)

    def kinds() -> list[str]:
        return [e.kind for e in manager.events]

    async def scenario() -> tuple[str, set[str]]:
        await _tick_until(manager, _serving(2), what="2 serving instances")
        first = {i.id for i in manager.instances if i.live}
        # moto's LaunchTime has one-second resolution: a third instance launched in the
        # same second as the first two would tie with them on "newest", and the drain
        # order would fall to the instance id. Start the load in a later second.
        launched = max(i.launched_at for i in manager.instances if i.live)
        deadline = time.monotonic() + 5
        while time.time() < launched + 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        busy = servers[0]
        threads = [threading.Thread(target=heavy, args=(busy,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            await _tick_until(manager, _serving(3), timeout=60,
                              what="a third instance launched for the load")
        finally:
            stop_load.set()
            for thread in threads:
                await asyncio.to_thread(thread.join, 120)
        third = next(i.id for i in manager.instances if i.live and i.id not in first)
        await _tick_until(manager, lambda inst: _serving(2)(inst)
                          and third not in {i.id for i in inst if i.live}, timeout=60,
                          what="the surplus instance drained once the load was gone")
        await provider.close()
        return third, first

    for server in servers:
        server.wait_healthy()
    try:
        third, first = asyncio.run(scenario())
    finally:
        stop_load.set()
        for server in servers:
            server.close()
    assert "scale_out" in kinds() and "scale_in" in kinds()
    assert kinds().index("scale_out") < kinds().index("scale_in")
    drained = [e for e in manager.events if e.kind == "scale_in_drain"]
    assert [e.instance_id for e in drained] == [third]  # the idle newcomer, not the busy one
    assert ec2.calls.count("run_instances") == 3
    assert "deregister_targets" in elbv2.calls
    assert {i["InstanceId"] for i in _live_instances()} == first


def test_progress_is_a_completed_counter_that_grew() -> None:
    from fleet.aws.load_probe import progress_times
    from fleet.local.gateway import HealthReport

    counters, progressed = progress_times({}, {"a": HealthReport(1, 5), "b": None}, 10.0)
    assert counters == {"a": 5} and progressed == {}  # a first reading is no evidence yet
    counters, progressed = progress_times(counters, {"a": HealthReport(0, 7),
                                                     "b": HealthReport(0, 3)}, 12.0)
    assert counters == {"a": 7, "b": 3} and progressed == {"a": 12.0}
    counters, progressed = progress_times(counters, {"a": HealthReport(4, 7)}, 14.0)
    assert progressed == {}  # busy but nothing finished since: not progress


def test_a_worker_that_answers_no_http_gives_no_load_report() -> None:
    """Something on the worker's port that does not speak HTTP (a real socket on
    loopback): no report, and the probe does not raise into the manager's observe."""
    import socket

    from fleet.aws.load_probe import probe_all

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def answer_garbage() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"garbage\r\n\r\n")

        thread = threading.Thread(target=answer_garbage)
        thread.start()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        assert probe_all({"i-odd": address}) == {"i-odd": None}
        thread.join(5)
