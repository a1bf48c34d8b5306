"""``python -m fleet run --config FILE``: the fleet manager against AWS.

The same :class:`fleet.manager.FleetManager` as the local fleet, with
:class:`fleet.aws.provider.AwsProvider`, behind an S3 lease (:mod:`fleet.aws.lease`) so that
only one manager acts on a fleet. A manager that does not hold the lease is a standby: it
keeps observing (its ``/fleet`` shows the live instances and who leads) and takes over
when the leader's lease expires. The admin API (``GET /fleet``, ``POST /fleet/scale``,
``POST /fleet/instances/<id>/terminate``, ``GET /fleet/ping``) listens on
``admin_host:admin_port`` from the config (loopback by default); set
``IMAGEFLEET_ADMIN_TOKEN`` to require a bearer token. Off loopback (the manager in the
cloud) a token is required and may come from SSM, and the API may serve HTTPS: see
:mod:`fleet.aws.admin_access`. With ``manage_ssh_key`` the manager makes the workers' SSH key
itself (:mod:`fleet.aws.ssh_key`). With ``cloudwatch_metrics`` the leader publishes its
rolling window to CloudWatch (:mod:`fleet.aws.cloudwatch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import ssl
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from fleet.aws.config import AwsFleetConfig, ConfigError, load_config
from fleet.aws.lease import S3Lease
from fleet.loop import run_every
from fleet.manager import AdminError, FleetManager
from fleet.model import Event, FleetSpec
from fleet.providers.base import Provider, ProviderError

if TYPE_CHECKING:
    from fleet.window import Sample

log = logging.getLogger(__name__)

# Matches the target group `up` creates (fleet.aws.operator, described in fleet.aws.stack).
HEALTH_CHECK_INTERVAL_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 3.0
HEALTH_THRESHOLD = 2
DEREGISTRATION_DELAY_S = 30.0


def spec_from_config(config: AwsFleetConfig) -> FleetSpec:
    return FleetSpec(
        name=config.name, desired=config.desired, min=config.min, max=config.max,
        health_check_interval_s=HEALTH_CHECK_INTERVAL_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        healthy_threshold=HEALTH_THRESHOLD, unhealthy_threshold=HEALTH_THRESHOLD,
        grace_period_s=config.grace_period_s,
        # The ALB reports `unused` once the deregistration delay is over; a little more
        # before giving up on a drain.
        drain_timeout_s=DEREGISTRATION_DELAY_S + 15.0,
        launch_backoff_base_s=10.0, launch_backoff_max_s=300.0,
        tick_interval_s=config.observe_interval_s,
        # The AWS provider sees progress only as the ALB calling a target healthy (it
        # cannot count completed requests), and the ALB calls it unhealthy only after two
        # failed checks, about 8 s without a passed one. Workers answer /health outside
        # their work queue, so a busy one keeps passing; one more observe confirms the
        # verdict rather than waiting the local fleet's 10 s again.
        no_progress_timeout_s=config.observe_interval_s,
    )


def manager_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class AwsFleetService:
    """Lease + manager. :meth:`step` is one tick; it is also the ``FleetAdmin`` the
    admin routes serve."""

    def __init__(self, provider: Provider, spec: FleetSpec, lease: S3Lease, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.provider = provider
        self.lease = lease
        self.manager = FleetManager(provider, spec, clock=clock)
        self._clock = clock
        self._leader: str | None = None
        self._standby_instances: tuple = ()

    @property
    def leading(self) -> bool:
        return self.lease.held

    async def step(self) -> None:
        if self.lease.renew_due():
            try:
                status = await asyncio.to_thread(self.lease.refresh)
            except (BotoCoreError, ClientError) as exc:
                # S3 trouble: keep acting only while the lease lasts
                self.manager.record(Event(self._clock(), "lease_error", None,
                                          f"could not refresh the lease: {exc}"))
            else:
                new_leader = status.holder != self._leader
                self._leader = status.holder
                if status.changed and status.held:
                    self.manager.record(Event(self._clock(), "lease_acquired", None,
                                              "this manager now runs the fleet"))
                elif status.changed or (new_leader and not status.held):
                    self.manager.record(Event(
                        self._clock(), "lease_lost" if status.changed else "standby", None,
                        f"{status.holder or 'another manager'} runs the fleet; "
                        "observing only"))
        if self.lease.held:
            await self.manager.tick()
            return
        try:
            self._standby_instances = await self.provider.observe()
        except ProviderError as exc:
            log.warning("standby observe failed: %s", exc)

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        await run_every(self.step, stop, interval_s, what="fleet step",
                        on_failure=self.manager.record_cycle_failure)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.lease.release)
        await self.provider.close()

    # --- FleetAdmin -----------------------------------------------------------------

    @property
    def metrics(self) -> Any:
        """The manager's Prometheus registry, served at ``GET /metrics`` (admin rule)."""
        return self.manager.metrics

    def window(self, seconds: float) -> dict[str, Any]:
        """``GET /fleet/metrics``: the manager's rolling window."""
        return self.manager.window(seconds)

    def snapshot(self) -> dict[str, Any]:
        snap = self.manager.snapshot()
        if not self.leading:
            snap["instances"] = [i.to_json() for i in self._standby_instances]
        snap["leader"] = self._leader
        snap["role"] = "leader" if self.leading else "standby"
        return snap

    def _require_leader(self) -> None:
        if not self.leading:
            raise AdminError(409, "standby",
                             f"this manager is a standby; {self._leader or 'another manager'}"
                             " runs the fleet: send the request there")

    def scale(self, desired: object) -> dict[str, Any]:
        self._require_leader()
        return self.manager.scale(desired)

    def terminate(self, instance_id: str) -> dict[str, Any]:
        self._require_leader()
        return self.manager.terminate(instance_id)


def build_service(config: AwsFleetConfig, *, provider: Provider | None = None,
                  s3: Any = None, holder: str | None = None,
                  clock: Callable[[], float] = time.time) -> AwsFleetService:
    from fleet.aws.provider import AwsProvider

    if provider is None:
        provider = AwsProvider(config, clock=clock)
    if s3 is None:
        s3 = getattr(provider, "s3", None)
    lease = S3Lease(s3, config.bucket, config.lease_key, holder or manager_identity(),
                    ttl_s=config.lease_ttl_s, clock=clock)
    return AwsFleetService(provider, spec_from_config(config), lease, clock=clock)


def leader_only(service: AwsFleetService,
                publish: Callable[[Sample], None]) -> Callable[[Sample], None]:
    """``publish`` for the leader's samples only: a standby runs no fleet (its window
    counts no instances), and its samples would contradict the leader's under the same
    ``Fleet`` dimension."""
    def on_sample(sample: Sample) -> None:
        if service.leading:
            publish(sample)
    return on_sample


async def _upload_bundle(config: AwsFleetConfig, s3: Any) -> None:
    """For ``bootstrap: user-data``: instances fetch the bundle from the fleet bucket."""
    from fleet.aws.ssh_bootstrap import build_bundle

    body = build_bundle()
    await asyncio.to_thread(s3.put_object, Bucket=config.bucket, Key="fleet/bundle.tar.gz",
                            Body=body)


@dataclass
class AdminServing:
    """How the admin API is served: the token (a fixed string or a refreshing
    ``TokenGate``), whether loopback may read ``GET /fleet`` without it, and TLS."""

    token: Any = None
    loopback_reads_open: bool = True
    ssl_context: ssl.SSLContext | None = None

    def close(self) -> None:
        if self.token is not None and hasattr(self.token, "close"):
            self.token.close()


def prepare_admin(config: AwsFleetConfig,
                  environ: Mapping[str, str] = os.environ) -> AdminServing:
    """The admin API's token and TLS for ``config``; raises ``ConfigError`` (off
    loopback without a token) or ``TokenSourceError`` (SSM unreadable now)."""
    from fleet.aws.admin_access import admin_tls_context, open_admin_gate, plan_admin_access

    plan = plan_admin_access(config, environ)
    serving = AdminServing(open_admin_gate(plan, config), plan.loopback_reads_open)
    try:
        serving.ssl_context = admin_tls_context(config)[0] if plan.tls else None
    except BaseException:
        serving.close()  # stop the token's re-read thread
        raise
    return serving


async def start_admin(service: AwsFleetService, host: str, port: int,
                      serving: AdminServing | None = None) -> tuple[Any, str]:
    """Serve the admin API for ``service``; returns the aiohttp runner and its URL.
    Without ``serving``: a token only from ``IMAGEFLEET_ADMIN_TOKEN``, plain HTTP."""
    from aiohttp import web

    from fleet.admin import create_admin_app

    if serving is None:
        serving = AdminServing(token=os.environ.get("IMAGEFLEET_ADMIN_TOKEN") or None)
    app = create_admin_app(service, token=serving.token,
                           loopback_reads_open=serving.loopback_reads_open)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=serving.ssl_context)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    scheme = "https" if serving.ssl_context is not None else "http"
    return runner, f"{scheme}://{host}:{bound}/fleet"


async def prepare_ssh_key(config: AwsFleetConfig) -> AwsFleetConfig:
    """With ``manage_ssh_key``: the key pair made (or reused) in ``state_dir`` and
    imported under ``key_name``; the config then points at that private key."""
    if not config.manage_ssh_key:
        return config
    from fleet.aws.provider import make_clients
    from fleet.aws.ssh_key import ensure_fleet_key

    ec2 = make_clients(config)[0]
    key = await asyncio.to_thread(ensure_fleet_key, ec2, config)
    return dataclasses.replace(config, key_file=str(key.private_key_path))


async def serve(config: AwsFleetConfig, stop: asyncio.Event,
                service: AwsFleetService | None = None,
                serving: AdminServing | None = None) -> None:
    if serving is None:
        serving = await asyncio.to_thread(prepare_admin, config)
    try:
        config = await prepare_ssh_key(config)
        service = service or build_service(config)
        if config.bootstrap == "user-data":
            await _upload_bundle(config, service.lease.s3)
        runner, admin_url = await start_admin(service, config.admin_host, config.admin_port,
                                              serving)
    except BaseException:
        serving.close()
        raise
    print(f"ImageFleet AWS fleet {config.name!r} in {config.region}: endpoint "
          f"{config.api_url or 'http://' + config.load_balancer_dns}; admin {admin_url}",
          flush=True)
    # The rolling window: each worker's /metrics (the worker security group lets the
    # manager reach the app port), with the fleet's API token, which workers ask of
    # anyone off loopback.
    api_token = None
    if config.token_parameter:
        from server.tokens import TokenSourceError, open_token_gate
        try:
            api_token = await asyncio.to_thread(
                open_token_gate, token=None, token_file=None,
                ssm_parameter=config.token_parameter, refresh_s=300.0, region=config.region)
        except TokenSourceError as exc:
            log.warning("the metrics window reads no worker counters: %s", exc)
    loop = asyncio.get_running_loop()
    tasks = []
    on_sample = None
    publisher = None
    if config.cloudwatch_metrics:
        from fleet.aws.cloudwatch import CloudWatchPublisher, cloudwatch_client
        publisher = CloudWatchPublisher(cloudwatch_client(config), config.name)
        on_sample = leader_only(service, publisher.add)
        tasks.append(loop.create_task(publisher.run(stop), name="cloudwatch publisher"))
    tasks.append(loop.create_task(service.manager.sampler(
        api_token.current if api_token else (lambda: None), on_sample=on_sample).run(stop),
        name="fleet sampler"))
    try:
        await service.run(stop, config.observe_interval_s)
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if publisher is not None:
            await publisher.final_flush()
        if api_token is not None:
            with contextlib.suppress(Exception):
                api_token.close()
        await service.aclose()
        await runner.cleanup()
        serving.close()


def main(config_path: str | Path) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"python -m fleet run: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    from server.tokens import TokenSourceError

    try:
        asyncio.run(run())
    except (ConfigError, TokenSourceError) as exc:
        print(f"python -m fleet run: {exc}", file=sys.stderr)
        return 2
    except ProviderError as exc:
        print(f"python -m fleet run: {exc}", file=sys.stderr)
        return 1
    return 0
