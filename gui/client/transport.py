"""aiohttp and socket failures mapped to the client's exceptions, in one place; error
bodies and JSON answers read; the pinned TLS context."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from gui.client.errors import (
    ClientError,
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
    InvalidRequest,
    InvalidResponse,
    ReadTimeout,
    ServerError,
    TransportError,
)

_ERROR_BODY_PREVIEW = 300




@contextlib.contextmanager
def _mapped_transport_errors(what: str) -> Iterator[None]:
    """Turn aiohttp/socket failures inside the block into this module's exceptions.

    The one place where third-party exceptions are translated; ``what`` names the
    request (``"POST http://host/process"``) for the message.
    """
    try:
        yield
    except ClientError:
        raise
    except aiohttp.ConnectionTimeoutError as exc:
        raise ConnectTimeout(f"{what}: timed out while connecting") from exc
    except aiohttp.ClientConnectorCertificateError as exc:
        # Not retried (TransportError): another attempt meets the same certificate.
        cause = exc.certificate_error
        reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None) \
            or str(cause)
        raise TransportError(
            f"{what}: the server's certificate was refused: certificate verify failed: "
            f"{reason} (trusted: the pinned CA file if one is set, else the system's "
            "certificates)") from exc
    except aiohttp.ClientSSLError as exc:
        raise TransportError(f"{what}: TLS failure: {exc}") from exc
    except aiohttp.ClientConnectorError as exc:
        os_error = exc.os_error
        reason = os.strerror(os_error.errno) if os_error.errno else str(os_error)
        raise ConnectError(f"{what}: cannot connect to {exc.host}:{exc.port}: {reason}") from exc
    except TimeoutError as exc:  # sock_read (SocketTimeoutError), total, or a stalled upload
        detail = "upload stalled" if "upload stalled" in str(exc) else "no answer in time"
        raise ReadTimeout(f"{what}: {detail} ({exc or 'timeout'})") from exc
    except aiohttp.InvalidURL as exc:
        raise InvalidRequest(f"{what}: invalid URL: {exc}") from exc
    except aiohttp.ClientPayloadError as exc:
        raise ConnectionLost(f"{what}: answer body incomplete: {exc}") from exc
    except aiohttp.ClientConnectionError as exc:
        raise ConnectionLost(f"{what}: connection lost: {exc or type(exc).__name__}") from exc
    except aiohttp.ClientError as exc:
        raise TransportError(f"{what}: {type(exc).__name__}: {exc}") from exc


async def _server_error(resp: aiohttp.ClientResponse) -> ServerError:
    """Build the ServerError for an error answer from its JSON error body, if it has one."""
    raw = await resp.read()
    code, message = f"http_{resp.status}", ""
    try:
        body = json.loads(raw)
        error = body["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        message = raw.decode("utf-8", "replace").strip()[:_ERROR_BODY_PREVIEW] or (
            resp.reason or "no details"
        )
    retry_after: float | None = None
    header = resp.headers.get("Retry-After")
    if header is not None:
        with contextlib.suppress(ValueError):
            retry_after = max(0.0, float(header))
    return ServerError(resp.status, code, message, retry_after=retry_after)


async def _json_answer(resp: aiohttp.ClientResponse, what: str) -> dict[str, Any]:
    """The JSON object of a success answer; ServerError for an error status."""
    if resp.status >= 400:
        raise await _server_error(resp)
    return await _read_json(resp, what)


async def _read_json(resp: aiohttp.ClientResponse, what: str) -> dict[str, Any]:
    raw = await resp.read()
    try:
        body = json.loads(raw)
    except ValueError as exc:
        preview = raw[:80].decode("utf-8", "replace")
        raise InvalidResponse(f"{what}: answer is not JSON: {preview!r}") from exc
    if not isinstance(body, dict):
        raise InvalidResponse(f"{what}: expected a JSON object, got {type(body).__name__}")
    return body




def pinned_context(ca_file: str | os.PathLike[str]) -> ssl.SSLContext:
    """A TLS context that trusts exactly the certificate(s) in ``ca_file`` and nothing
    from the system store; host names are checked (the certificate names the endpoint)."""
    try:
        pem = Path(ca_file).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"CA file {ca_file}: {getattr(exc, 'strerror', None) or exc}") \
            from exc
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise InvalidRequest(f"CA file {ca_file} holds no PEM certificate")
    try:
        context = ssl.create_default_context(cadata=pem)
    except ssl.SSLError as exc:
        raise InvalidRequest(f"CA file {ca_file}: not a usable certificate ({exc})") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
