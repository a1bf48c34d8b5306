"""The app's Fleet view on an AWS fleet needs only the endpoint, its pinned certificate
and the admin token.

An AWS fleet's load balancer serves the processing API and, by a listener rule,
``/fleet`` from the manager, over HTTPS with the fleet's self-signed certificate. Here a
TLS front on loopback plays that load balancer: ``/fleet`` goes to the manager's real
admin routes (``fleet.admin``, off-loopback policy: every route needs the admin token)
over a real fleet manager (``FleetManager`` on the in-memory provider, answering as the
AWS one does), everything else to a real ``python -m server``. The app runs under Xvfb.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, ClientTimeout, web
from conftest import free_port
from helpers_gui import ScriptedDialogs, app_environ, pump_until, threads_now

from fleet.admin import admin_routes, json_errors_middleware, ping
from fleet.aws.admin_access import server_tls_context
from fleet.manager import FleetManager
from fleet.model import FleetSpec
from fleet.providers.memory import InMemoryProvider
from fleet.tls import self_signed_certificate
from gui.settings import Settings, save_settings, settings_path

pytestmark = pytest.mark.gui

ADMIN_TOKEN = "fleet-admin-token-42"


class LoadBalancerOnLoopback:
    """HTTPS on 127.0.0.1 with a self-signed certificate: ``/fleet*`` to a fleet
    manager's admin routes, the rest proxied to ``worker_url``. Its own thread and loop;
    :meth:`close` stops both."""

    def __init__(self, worker_url: str, pem_path: Path) -> None:
        made = self_signed_certificate(("127.0.0.1",))
        pem_path.write_text(made.certificate_pem)
        self._context = server_tls_context(made.certificate_pem, made.private_key_pem)
        self.worker_url = worker_url
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.fleet_requests: list[str | None] = []  # the Authorization header of each
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="test-alb", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the TLS front did not start")

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        provider = InMemoryProvider(time.time, start_healthy=True)
        provider.name = "aws"  # answer as the cloud manager does
        manager = FleetManager(provider, FleetSpec(name="demo", desired=2, min=1, max=4,
                                                   tick_interval_s=0.1), clock=time.time)
        for _ in range(3):
            await manager.tick()
        http = ClientSession(timeout=ClientTimeout(total=30, connect=5))

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path.startswith("/fleet"):
                self.fleet_requests.append(request.headers.get("Authorization"))
            return await handler(request)

        async def to_worker(request: web.Request) -> web.Response:
            async with http.get(self.worker_url + request.path_qs) as answer:
                return web.Response(body=await answer.read(), status=answer.status,
                                    content_type=answer.content_type)

        app = web.Application(middlewares=[record, json_errors_middleware()])
        app.add_routes(admin_routes(manager, ADMIN_TOKEN, loopback_reads_open=False))
        app.router.add_get("/fleet/ping", ping)
        app.router.add_get("/{tail:.*}", to_worker)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self._context).start()
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await http.close()
            await runner.cleanup()

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture
def front(server_process: Any, tmp_path: Path) -> Iterator[LoadBalancerOnLoopback]:
    worker = server_process()
    lb = LoadBalancerOnLoopback(worker.url, tmp_path / "fleet-ca.pem")
    yield lb
    lb.close()


def test_fleet_view_fills_from_https_endpoint_fleet_with_the_admin_token(
        x_display: str, front: LoadBalancerOnLoopback, tmp_path: Path) -> None:
    from gui.app import ImageFleetApp

    before = threads_now()
    env = app_environ(tmp_path)
    # The operator's settings: the endpoint and its certificate, no admin token yet (so
    # no embedded fleet starts).
    save_settings(Settings(endpoint=front.url, ca_file=str(tmp_path / "fleet-ca.pem")),
                  settings_path(env))
    app = ImageFleetApp(environ=env, dialogs=ScriptedDialogs())
    try:
        pump_until(app, lambda: app.connected is not None, 60,
                   "the app to connect over the pinned certificate")
        assert app.connected.endpoint == front.url and not app.connected.embedded
        pump_until(app, lambda: "401" in app.fleet_view.totals.cget("text"), 30,
                   "the Fleet view to report the missing admin token")
        assert "Set the admin token in Settings" in app.fleet_view.totals.cget("text")
        assert app.fleet_view.instance_ids() == []

        app.apply_settings({**app.settings_view.raw_values(), "admin_token": ADMIN_TOKEN})
        pump_until(app, lambda: len(app.fleet_view.instance_ids()) == 2, 30,
                   "the instance table to fill")
        ids = app.fleet_view.instance_ids()
        assert all(app.fleet_view.health_of(i) == "healthy" for i in ids)
        assert "demo (aws)" in app.fleet_view.title.cget("text")
        # The admin token went to /fleet (and only the admin token: no API token is set).
        assert front.fleet_requests[-1] == f"Bearer {ADMIN_TOKEN}"
        saved = (Path(env["XDG_CONFIG_HOME"]) / "imagefleet" / "settings.json")
        assert ADMIN_TOKEN in saved.read_text() and (saved.stat().st_mode & 0o077) == 0
        assert app.failures == []
    finally:
        app.close()
    assert [t for t in threading.enumerate() if t not in before
            and t.name != "test-alb" and t.is_alive()] == []
