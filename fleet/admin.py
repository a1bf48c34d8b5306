"""The fleet's admin HTTP API (DESIGN.md): ``GET /fleet``, ``POST /fleet/scale``,
``POST /fleet/instances/<id>/terminate``.

The local gateway mounts these routes next to its proxy; ``python -m fleet run`` (AWS)
serves them alone with :func:`create_admin_app`. Errors are JSON
``{"error": {"code", "message"}}`` like the processing server's.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Protocol

from aiohttp import web

from fleet.manager import AdminError

ADMIN_PREFIX = "/fleet"


class FleetAdmin(Protocol):
    def snapshot(self) -> dict[str, Any]: ...

    def scale(self, desired: object) -> dict[str, Any]: ...

    def terminate(self, instance_id: str) -> dict[str, Any]: ...


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def authorized(request: web.Request, token: str | None) -> bool:
    if token is None:
        return True
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def admin_routes(admin: FleetAdmin, token: str | None = None) -> list[web.RouteDef]:
    """Routes for ``admin``; with a ``token`` they require ``Authorization: Bearer``."""

    def guarded(handler):
        async def wrapper(request: web.Request) -> web.StreamResponse:
            if not authorized(request, token):
                return error_response(401, "unauthorized",
                                      "missing or wrong token: send 'Authorization: Bearer "
                                      "TOKEN'")
            try:
                return await handler(request)
            except AdminError as exc:
                return error_response(exc.status, exc.code, exc.message)
        return wrapper

    async def get_fleet(request: web.Request) -> web.Response:
        return web.json_response(admin.snapshot())

    async def post_scale(request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "invalid_json",
                                  'body must be JSON like {"desired": 3}')
        if not isinstance(body, dict) or "desired" not in body:
            return error_response(400, "invalid_desired",
                                  'body must be a JSON object like {"desired": 3}')
        return web.json_response(admin.scale(body["desired"]))

    async def post_terminate(request: web.Request) -> web.Response:
        return web.json_response(admin.terminate(request.match_info["instance_id"]),
                                 status=202)

    return [
        web.get(ADMIN_PREFIX, guarded(get_fleet)),
        web.post(f"{ADMIN_PREFIX}/scale", guarded(post_scale)),
        web.post(ADMIN_PREFIX + "/instances/{instance_id}/terminate", guarded(post_terminate)),
    ]


def create_admin_app(admin: FleetAdmin, token: str | None = None) -> web.Application:
    app = web.Application()
    app.add_routes(admin_routes(admin, token))
    return app
