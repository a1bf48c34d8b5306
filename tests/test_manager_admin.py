"""Who may use the AWS manager's admin API (fleet/aws/admin_access.py): the decision, the
admin token read from SSM (moto) and re-read, and HTTPS with a certificate made in
memory, served by the real admin app on loopback."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from helpers_manager import REGION
from moto import mock_aws
from test_manager_host import MINIMAL
from waiting import wait_until

from fleet.aws.admin_access import (
    ADMIN_CERT_FILE,
    admin_tls_context,
    open_admin_gate,
    plan_admin_access,
)
from fleet.aws.config import AwsFleetConfig, ConfigError, config_from_dict
from fleet.aws.main import main as aws_main
from fleet.aws.main import prepare_admin, start_admin
from server.tokens import TokenSet

PARAMETER = "/imagefleet/mgr/admin-token"
TOKEN = "first-admin-token"


def _config(**changes: Any) -> AwsFleetConfig:
    return config_from_dict({**MINIMAL, "region": REGION, **changes})


class StubFleet:
    """The FleetAdmin the routes serve (the routes and their policy are under test)."""

    def snapshot(self) -> dict[str, Any]:
        return {"name": "mgr", "provider": "aws", "desired": 0, "min": 0, "max": 1,
                "instances": [], "events": []}

    def scale(self, desired: object) -> dict[str, Any]:
        return {"desired": desired}

    def terminate(self, instance_id: str) -> dict[str, Any]:
        return {"status": "replacing"}


# ---------------------------------------------------------------------------- decision

def test_off_loopback_without_a_token_is_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"not a loopback address.*admin_token_parameter"):
        plan_admin_access(_config(admin_host="0.0.0.0"), {})
    plan = plan_admin_access(_config(admin_host="0.0.0.0", admin_token_parameter=PARAMETER),
                             {})
    assert (plan.token_parameter, plan.token_from_env, plan.loopback_reads_open) == \
        (PARAMETER, None, False)
    plan = plan_admin_access(_config(admin_host="10.0.1.5", admin_token_parameter=PARAMETER),
                             {"IMAGEFLEET_ADMIN_TOKEN": "from-env-token"})
    assert (plan.token_parameter, plan.token_from_env) == (None, "from-env-token")


def test_on_loopback_the_admin_api_behaves_as_before() -> None:
    plan = plan_admin_access(_config(), {})
    assert (plan.token_parameter, plan.token_from_env, plan.loopback_reads_open,
            plan.tls) == (None, None, True, False)
    assert open_admin_gate(plan, _config()) is None


def test_fleet_run_refuses_to_start_off_loopback_without_a_token(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEFLEET_ADMIN_TOKEN", raising=False)
    path = tmp_path / "fleet.json"
    path.write_text(_config(admin_host="0.0.0.0").to_json())
    assert aws_main(path) == 2
    assert "needs a token" in capsys.readouterr().err


# ------------------------------------------------------------------------ SSM token

def test_the_admin_token_comes_from_ssm_and_a_rotation_is_picked_up(fake_aws: None) -> None:
    with mock_aws():
        ssm = boto3.client("ssm", region_name=REGION)
        ssm.put_parameter(Name=PARAMETER, Value=TOKEN, Type="SecureString")
        config = _config(admin_host="0.0.0.0", admin_token_parameter=PARAMETER)
        gate = open_admin_gate(plan_admin_access(config, {}), config, ssm=ssm,
                               refresh_s=0.05)
        assert gate is not None
        try:
            assert gate.accepts(f"Bearer {TOKEN}") and not gate.accepts("Bearer other-token")
            rotated = TokenSet(TOKEN).rotated("second-admin-token", time.time(), 300)
            ssm.put_parameter(Name=PARAMETER, Value=rotated.to_json(), Type="SecureString",
                              Overwrite=True)
            wait_until(lambda: gate.accepts("Bearer second-admin-token"), 10,
                       what="the rotated admin token")
            assert gate.accepts(f"Bearer {TOKEN}")  # still inside its overlap
        finally:
            gate.close()


def test_an_unreadable_token_parameter_fails_the_start(fake_aws: None) -> None:
    from server.tokens import TokenSourceError

    with mock_aws():
        config = _config(admin_host="0.0.0.0", admin_token_parameter="/imagefleet/none")
        with pytest.raises(TokenSourceError, match="SSM parameter /imagefleet/none"):
            open_admin_gate(plan_admin_access(config, {}), config,
                            ssm=boto3.client("ssm", region_name=REGION))


# ------------------------------------------------------------------------------ HTTPS

def test_admin_api_over_tls_requires_the_token_everywhere_and_ping_is_open(
        tmp_path: Path) -> None:
    """The manager's admin app on loopback, served as off loopback (every route needs
    the token) over HTTPS with the certificate made in memory and pinned by the client."""
    config = _config(admin_host="0.0.0.0", admin_tls=True, state_dir=str(tmp_path / "s"))
    serving = prepare_admin(config, {"IMAGEFLEET_ADMIN_TOKEN": TOKEN})
    assert serving.ssl_context is not None and not serving.loopback_reads_open
    pem = (tmp_path / "s" / ADMIN_CERT_FILE).read_text()
    assert "PRIVATE" not in pem and not [p for p in (tmp_path / "s").iterdir()
                                         if p.name != ADMIN_CERT_FILE]

    async def scenario() -> dict[str, Any]:
        runner, url = await start_admin(StubFleet(), "127.0.0.1", 0, serving)  # type: ignore[arg-type]
        assert url.startswith("https://127.0.0.1:")
        pinned = ssl.create_default_context(cadata=pem)
        other = ssl.create_default_context()  # the system's trust: must refuse it
        seen: dict[str, Any] = {}
        try:
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=10)) as http:
                async def status(method: str, path: str, **kw: Any) -> int:
                    async with http.request(method, url + path, ssl=pinned, **kw) as resp:
                        await resp.read()
                        return resp.status

                auth = {"Authorization": f"Bearer {TOKEN}"}
                seen["ping"] = await status("GET", "/ping")
                seen["read_without"] = await status("GET", "")
                seen["read_with"] = await status("GET", "", headers=auth)
                seen["scale_without"] = await status("POST", "/scale", json={"desired": 1})
                seen["scale_with"] = await status("POST", "/scale", json={"desired": 1},
                                                  headers=auth)
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await http.get(url + "/ping", ssl=other)
                async with http.get(url + "/ping", ssl=pinned) as resp:
                    seen["ping_body"] = await resp.json()
        finally:
            await runner.cleanup()
            serving.close()
        return seen

    seen = asyncio.run(scenario())
    assert seen == {"ping": 200, "read_without": 401, "read_with": 200, "scale_without": 401,
                    "scale_with": 200, "ping_body": {"status": "ok"}}


def test_every_start_makes_a_new_certificate(tmp_path: Path) -> None:
    config = _config(admin_tls=True, state_dir=str(tmp_path))
    first, second = admin_tls_context(config)[1], admin_tls_context(config)[1]
    assert first != second and (tmp_path / ADMIN_CERT_FILE).read_text() == second


def test_start_admin_without_serving_keeps_the_env_token_and_plain_http(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEFLEET_ADMIN_TOKEN", TOKEN)

    async def scenario() -> tuple[str, int, int]:
        runner, url = await start_admin(StubFleet(), "127.0.0.1", 0)  # type: ignore[arg-type]
        try:
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=10)) as http:
                async with http.get(url) as read:  # loopback reads stay open
                    pass
                async with http.post(url + "/scale", json={"desired": 1}) as change:
                    pass
        finally:
            await runner.cleanup()
        return url, read.status, change.status

    url, read, change = asyncio.run(scenario())
    assert url.startswith("http://") and (read, change) == (200, 401)




def test_the_aws_managers_metrics_need_the_admin_token_off_loopback() -> None:
    """``GET /metrics`` (Prometheus) and ``GET /fleet/metrics`` on the AWS manager's admin
    address: read-only, under the same rule as GET /fleet."""
    from prometheus_client.parser import text_string_to_metric_families

    from fleet.aws.main import AdminServing
    from fleet.window import Window

    class MeteredFleet(StubFleet):
        def __init__(self) -> None:
            from fleet.metrics import ManagerMetrics
            self.metrics = ManagerMetrics(lambda: {"desired": 2, "min": 1, "max": 4,
                                                   "instances": 2, "healthy": 1})
            self.metrics.action("launch", False)
            self.metrics.action("terminate", True, "unhealthy")

        def window(self, seconds: float) -> dict[str, Any]:
            return Window().series(seconds, 0.0) | {"alerts": [], "events": []}

    async def scenario() -> dict[str, Any]:
        serving = AdminServing(token=TOKEN, loopback_reads_open=False)
        runner, url = await start_admin(MeteredFleet(), "127.0.0.1", 0, serving)  # type: ignore[arg-type]
        root = url.removesuffix("/fleet")
        seen: dict[str, Any] = {}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                auth = {"Authorization": f"Bearer {TOKEN}"}
                for name, path in (("prom", "/metrics"), ("window", "/fleet/metrics")):
                    async with http.get(root + path) as resp:
                        seen[name + "_without"] = resp.status
                    async with http.get(root + path, headers=auth) as resp:
                        seen[name + "_with"] = resp.status
                        seen[name + "_body"] = await resp.text()
        finally:
            await runner.cleanup()
        return seen

    seen = asyncio.run(scenario())
    assert {k: v for k, v in seen.items() if not k.endswith("_body")} == {
        "prom_without": 401, "prom_with": 200, "window_without": 401, "window_with": 200}
    got = {s.name: s.value for f in text_string_to_metric_families(seen["prom_body"])
           for s in f.samples if not s.labels}
    assert got["imagefleet_manager_desired"] == 2 and got["imagefleet_manager_healthy"] == 1
    assert got["imagefleet_manager_launch_failures_total"] == 1
    assert got["imagefleet_manager_replacements_total"] == 1
    assert json.loads(seen["window_body"])["capacity_s"] == 3600
